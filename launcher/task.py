"""A `TaskSpec` from a Mesos-style task JSON (`imagefs run --task`) or from `imagefs run` options.

The JSON is the subset of Mesos' TaskInfo that a single container needs, in protobuf's JSON form,
so a file written for `mesos-execute` reads the same here:

    name, task_id.value      the container id: task_id.value if given, else name (Mesos has both;
                             the task id is the unique one). Neither: the launcher generates one.
    command                  required (as in Mesos, where a task has a command or an executor)
      .shell (default true)  true: run `/bin/sh -c VALUE`; `arguments` are not allowed.
                             false: VALUE is the executable and `arguments` the whole argv; as our
                             init execs argv[0], argv[0] becomes VALUE. No VALUE and no arguments:
                             the image's entrypoint + cmd.
      .value .arguments .user .environment.variables[{name, value, type VALUE}]
    resources                {"cpus": F, "mem": MB, "disk": MB}, or Mesos' list form
                             [{"name": "cpus", "type": "SCALAR", "scalar": {"value": F}}, ...]
    container                required: type "MESOS", hostname, mesos.image, volumes, network_infos
      .mesos.image           type DOCKER: docker.name (a Docker name, taken as docker://NAME);
                             APPC: appc.name + appc.labels.labels[{key, value}] -> appc:NAME,K=V...;
                             OCI (ours; Mesos has none): oci.path [+ oci.tag] -> oci:PATH[:TAG]
      .volumes[]             {container_path (absolute), host_path (relative: in the sandbox),
                              mode RW|RO}; Mesos' `source` and `image` volumes are not supported
      .network_infos         absent or []: an isolated network (network/none). CNI networks are
                             not supported.
      .network               our extension: "none" (default) or "host"

Mesos runs a container without network_infos on the host's network; we default to an isolated one,
as `imagefs run` does, and ask for the host's explicitly. Unknown fields anywhere are errors naming
their JSON path (`task.json: container.volumes[1].mdoe: unknown field`), so a typo never silently
changes what runs; so are fields we know but do not implement.

Pure parsing: nothing here touches the network; `read_task` reads the one file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, cast

from imagefs.errors import InputError
from launcher.spec import Resources, TaskSpec, Volume
from stores.reference import parse_reference

MB = 1024 * 1024   # Mesos' "mem" and "disk" are in MB of 2**20 bytes
_MAX_BYTES = 1 << 62   # beyond what cgroup limits take (they are int64 in the kernel)

_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,64}}$){_LABEL}(?:\.{_LABEL})*")
_ISOLATOR = re.compile(r"[a-z0-9_]+(?:/[a-z0-9_]+)?")
# Docker's RAMInBytes syntax: "512m", "1.5g", "1GiB", "100kb", "1048576".
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s?(?:([kmgtp])i?b?|b)?", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}

# The values of TaskSpec.network and TaskSpec.backend.
NETWORKS: tuple[str, ...] = ("none", "host")
BACKENDS: tuple[str, ...] = ("imagefs", "overlay", "copy", "bind")
Backend = Literal["imagefs", "overlay", "copy", "bind"]


# -- checks shared by both front ends ---------------------------------------------------------------

def check_container_id(value: str) -> str | None:
    """Why *value* is not a container id (it names directories), or None if it is one."""
    if not _CONTAINER_ID.fullmatch(value):
        return "not a container id (1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit)"
    return None


def check_hostname(value: str) -> str | None:
    if not _HOSTNAME.fullmatch(value):
        return "not a host name (dot-separated labels of A-Z a-z 0-9 -, at most 64 characters)"
    return None


def check_env_name(name: str) -> str | None:
    if not name or "=" in name or "\0" in name:
        return "not an environment variable name"
    return None


def parse_size(text: str) -> int:
    """Bytes in *text*, docker's way: a number with an optional binary unit (k, m, g, t, p, with
    optional "i"/"b": 512m, 1.5g, 1GiB) or plain bytes. ValueError if malformed or not positive."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError("not a size (like 512m, 1g or a number of bytes)")
    unit = m.group(2).lower() if m.group(2) else None
    value = float(m.group(1)) * _UNITS[unit]   # float: "1.5g"; inf for absurdly long digit strings
    if value > _MAX_BYTES:
        raise ValueError(f"too large (at most {_MAX_BYTES} bytes)")
    if int(value) <= 0:
        raise ValueError("must be more than 0 bytes")
    return int(value)


# -- the task JSON ----------------------------------------------------------------------------------

def read_task(path: str) -> TaskSpec:
    """The TaskSpec in the JSON file at *path*; errors name the file as given."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(path, e.strerror or str(e)) from e
    return parse_task(data, what=path)


def parse_task(data: bytes | str, *, what: str) -> TaskSpec:
    """Parse a task description; *what* names it in errors (`<what>: <json path>: <why>`)."""
    return _TaskParser(what).task(_load_json(data, what))


def _load_json(data: bytes | str, what: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise InputError(what, f"malformed JSON: duplicate field {key!r}")
            out[key] = value
        return out

    def no_constant(name: str) -> NoReturn:
        raise InputError(what, f"malformed JSON: {name} is not a JSON number")

    try:
        return json.loads(data, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise InputError(what, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise InputError(what, "malformed JSON: not UTF-8 text") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class _Command:
    argv: tuple[str, ...]
    shell: bool
    env: tuple[tuple[str, str], ...]
    user: str | None


@dataclass(frozen=True)
class _Container:
    image: str
    hostname: str | None
    volumes: tuple[Volume, ...]
    network: Literal["none", "host"]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _TaskParser:
    """One pass over the decoded JSON; every check knows the JSON path of what it checks."""

    def __init__(self, what: str) -> None:
        self.what = what

    def fail(self, path: str, why: str) -> NoReturn:
        raise InputError(f"{self.what}: {path}" if path else self.what, why)

    # -- typed access ---------------------------------------------------------------------------

    def obj(self, value: Any, path: str, known: Sequence[str],
            unsupported: Mapping[str, str] | None = None) -> dict[str, Any]:
        """*value* as an object whose fields are all in *known*; *unsupported* maps fields Mesos
        has and we do not implement to the reason, so the error says more than "unknown"."""
        if not isinstance(value, dict):
            self.fail(path, f"expected an object, got {_json_type(value)}")
        for key in value:
            if unsupported and key in unsupported:
                self.fail(_join(path, key), f"not supported: {unsupported[key]}")
            if key not in known:
                self.fail(_join(path, key), "unknown field")
        return value

    def array(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"expected an array, got {_json_type(value)}")
        return value

    def string(self, value: Any, path: str, *, empty: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_json_type(value)}")
        if not value and not empty:
            self.fail(path, "must not be empty")
        if "\0" in value:
            self.fail(path, "contains a NUL character")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected a boolean, got {_json_type(value)}")
        return value

    def positive(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(path, f"expected a number, got {_json_type(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number) or number <= 0:
            self.fail(path, f"must be a finite number more than 0, got {number:g}")
        return number

    def megabytes(self, value: float, path: str) -> int:
        size = int(value * MB)
        if not 0 < size <= _MAX_BYTES:
            self.fail(path, f"{value:g} MB is out of range (1 byte to {_MAX_BYTES // MB} MB)")
        return size

    def enum(self, value: Any, path: str, choices: Sequence[str]) -> str:
        text = self.string(value, path)
        if text not in choices:
            self.fail(path, f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    def required(self, obj: dict[str, Any], key: str, path: str) -> Any:
        if key not in obj:
            self.fail(_join(path, key), "required")
        return obj[key]

    # -- TaskInfo -------------------------------------------------------------------------------

    def task(self, doc: Any) -> TaskSpec:
        doc = self.obj(doc, "", ("name", "task_id", "command", "resources", "container"),
                       {"executor": "only the command executor runs tasks here (use command)"})
        cmd = self.command(self.required(doc, "command", ""), "command")
        box = self.container(self.required(doc, "container", ""), "container")
        resources = self.resources(doc["resources"], "resources") if "resources" in doc else Resources()
        return TaskSpec(image=box.image, argv=cmd.argv, shell=cmd.shell, env=cmd.env, user=cmd.user,
                        hostname=box.hostname, network=box.network, volumes=box.volumes,
                        resources=resources, name=self.name(doc))

    def name(self, doc: dict[str, Any]) -> str | None:
        name = self.string(doc["name"], "name") if "name" in doc else None
        path = "name"
        if "task_id" in doc:
            task_id = self.obj(doc["task_id"], "task_id", ("value",))
            path = "task_id.value"
            name = self.string(self.required(task_id, "value", "task_id"), path)
        if name is not None and (why := check_container_id(name)):
            self.fail(path, why)
        return name

    def command(self, value: Any, path: str) -> _Command:
        cmd = self.obj(value, path, ("value", "shell", "arguments", "environment", "user"),
                       {"uris": "the Mesos fetcher (put files in the sandbox or a volume)"})
        shell = self.boolean(cmd["shell"], f"{path}.shell") if "shell" in cmd else True
        exe = self.string(cmd["value"], f"{path}.value") if "value" in cmd else None
        args: list[str] = []
        if "arguments" in cmd:
            items = self.array(cmd["arguments"], f"{path}.arguments")
            args = [self.string(a, f"{path}.arguments[{i}]", empty=True) for i, a in enumerate(items)]
        if shell:
            if exe is None:
                self.fail(f"{path}.value", "required when shell is true (the shell command)")
            if "arguments" in cmd:
                self.fail(f"{path}.arguments", "not allowed when shell is true (Mesos ignores them)")
            argv: tuple[str, ...] = (exe,)
        elif exe is None:
            if args:
                # Mesos would append these to the image's entrypoint; TaskSpec cannot say that.
                self.fail(f"{path}.arguments", "not supported without command.value (the executable)")
            argv = ()
        else:
            argv = (exe, *args[1:])
        env = self.environment(cmd["environment"], f"{path}.environment") if "environment" in cmd else ()
        user = self.string(cmd["user"], f"{path}.user") if "user" in cmd else None
        return _Command(argv, shell, env, user)

    def environment(self, value: Any, path: str) -> tuple[tuple[str, str], ...]:
        env = self.obj(value, path, ("variables",))
        out: list[tuple[str, str]] = []
        for i, item in enumerate(self.array(env.get("variables", []), f"{path}.variables")):
            at = f"{path}.variables[{i}]"
            var = self.obj(item, at, ("name", "value", "type"), {"secret": "secrets"})
            if "type" in var:
                self.enum(var["type"], f"{at}.type", ("VALUE",))
            name = self.string(self.required(var, "name", at), f"{at}.name")
            if why := check_env_name(name):
                self.fail(f"{at}.name", why)
            out.append((name, self.string(self.required(var, "value", at), f"{at}.value", empty=True)))
        return tuple(out)

    # -- resources ------------------------------------------------------------------------------

    def resources(self, value: Any, path: str) -> Resources:
        # name -> (value, its JSON path); both forms end up here.
        scalars: dict[str, tuple[float, str]] = {}
        if isinstance(value, list):
            for i, item in enumerate(value):
                at = f"{path}[{i}]"
                res = self.obj(item, at, ("name", "type", "scalar"))
                name = self.enum(self.required(res, "name", at), f"{at}.name", ("cpus", "mem", "disk"))
                self.enum(self.required(res, "type", at), f"{at}.type", ("SCALAR",))
                scalar = self.obj(self.required(res, "scalar", at), f"{at}.scalar", ("value",))
                if name in scalars:
                    self.fail(f"{at}.name", f"{name} given twice")
                number = self.required(scalar, "value", f"{at}.scalar")
                scalars[name] = (self.positive(number, f"{at}.scalar.value"), f"{at}.scalar.value")
        else:
            res = self.obj(value, path, ("cpus", "mem", "disk"))
            scalars = {k: (self.positive(v, f"{path}.{k}"), f"{path}.{k}") for k, v in res.items()}
        cpus, mem, disk = (scalars.get(k) for k in ("cpus", "mem", "disk"))
        return Resources(cpus=cpus[0] if cpus else None,
                         mem_bytes=self.megabytes(*mem) if mem else None,
                         disk_bytes=self.megabytes(*disk) if disk else None)

    # -- ContainerInfo --------------------------------------------------------------------------

    def container(self, value: Any, path: str) -> _Container:
        c = self.obj(value, path, ("type", "hostname", "mesos", "volumes", "network_infos", "network"),
                     {"docker": "the Docker containerizer (use type MESOS with a DOCKER image)",
                      "linux_info": "Linux capabilities", "rlimit_info": "rlimits", "tty_info": "TTYs"})
        self.enum(self.required(c, "type", path), f"{path}.type", ("MESOS",))
        hostname = None
        if "hostname" in c:
            hostname = self.string(c["hostname"], f"{path}.hostname")
            if why := check_hostname(hostname):
                self.fail(f"{path}.hostname", why)
        mesos = self.obj(self.required(c, "mesos", path), f"{path}.mesos", ("image",))
        image = self.image(self.required(mesos, "image", f"{path}.mesos"), f"{path}.mesos.image")
        volumes: list[Volume] = []
        if "volumes" in c:
            items = self.array(c["volumes"], f"{path}.volumes")
            volumes = [self.volume(v, f"{path}.volumes[{i}]") for i, v in enumerate(items)]
        if "network_infos" in c and self.array(c["network_infos"], f"{path}.network_infos"):
            self.fail(f"{path}.network_infos", "not supported: CNI networks (use [] for an isolated "
                                               "network, or \"network\": \"host\")")
        network = self.enum(c["network"], f"{path}.network", NETWORKS) if "network" in c else "none"
        return _Container(image, hostname, tuple(volumes), "host" if network == "host" else "none")

    def image(self, value: Any, path: str) -> str:
        img = self.obj(value, path, ("type", "docker", "appc", "oci"), {"cached": "forced re-pulls"})
        kind = self.enum(self.required(img, "type", path), f"{path}.type", ("DOCKER", "APPC", "OCI")).lower()
        for other in ("docker", "appc", "oci"):
            if other != kind and other in img:
                self.fail(f"{path}.{other}", f"does not match type {kind.upper()}")
        at = f"{path}.{kind}"
        body = self.required(img, kind, path)
        if kind == "docker":
            name = self.string(self.required(self.obj(body, at, ("name",)), "name", at), f"{at}.name")
            # A Docker name never carries a transport; saying docker:// keeps "oci:5000/x" a host.
            return self.reference(name if name.startswith("docker://") else f"docker://{name}", f"{at}.name")
        if kind == "appc":
            appc = self.obj(body, at, ("name", "labels"), {"id": "Appc image ids (use name and labels)"})
            name = self.string(self.required(appc, "name", at), f"{at}.name")
            labels = self.appc_labels(appc["labels"], f"{at}.labels") if "labels" in appc else []
            return self.reference("appc:" + ",".join([name, *(f"{k}={v}" for k, v in labels)]), at)
        oci = self.obj(body, at, ("path", "tag"))
        ref = "oci:" + self.string(self.required(oci, "path", at), f"{at}.path")
        if "tag" in oci:
            ref += ":" + self.string(oci["tag"], f"{at}.tag")
        return self.reference(ref, at)

    def appc_labels(self, value: Any, path: str) -> list[tuple[str, str]]:
        # Mesos' Labels message: {"labels": [{"key": K, "value": V}]}.
        items = self.array(self.required(self.obj(value, path, ("labels",)), "labels", path), f"{path}.labels")
        out: dict[str, str] = {}
        for i, item in enumerate(items):
            at = f"{path}.labels[{i}]"
            label = self.obj(item, at, ("key", "value"))
            key = self.string(self.required(label, "key", at), f"{at}.key")
            val = self.string(self.required(label, "value", at), f"{at}.value")
            if "," in key or "=" in key or "," in val:   # they could not be told apart in appc:NAME,K=V
                self.fail(at, "labels cannot contain ',' (nor '=' in a key)")
            if key in out:
                self.fail(f"{at}.key", f"label {key!r} given twice")
            out[key] = val
        return list(out.items())

    def reference(self, ref: str, path: str) -> str:
        try:
            parse_reference(ref)
        except InputError as e:
            self.fail(path, f"{e.what}: {e.why}")
        return ref

    def volume(self, value: Any, path: str) -> Volume:
        vol = self.obj(value, path, ("container_path", "host_path", "mode"),
                       {"source": "volume sources (use host_path)", "image": "image volumes"})
        container_path = self.string(self.required(vol, "container_path", path), f"{path}.container_path")
        if not container_path.startswith("/"):
            self.fail(f"{path}.container_path", "must be absolute (sandbox-relative paths are not supported)")
        host_path = self.string(self.required(vol, "host_path", path), f"{path}.host_path")
        mode = self.enum(self.required(vol, "mode", path), f"{path}.mode", ("RW", "RO"))
        return Volume(host_path, container_path, read_only=mode == "RO")


# -- imagefs run options ----------------------------------------------------------------------------

def spec_from_args(image: str, argv: Sequence[str] = (), *,
                   volumes: Sequence[str] = (), env: Sequence[str] = (),
                   cpus: str | float | None = None, memory: str | int | None = None,
                   pids: str | int | None = None, disk: str | int | None = None,
                   hostname: str | None = None, network: str | None = None,
                   backend: str | None = None, workdir: str | None = None,
                   name: str | None = None, user: str | None = None,
                   isolation: str | None = None,
                   environ: Mapping[str, str] | None = None) -> TaskSpec:
    """A TaskSpec from `imagefs run` options as given on the command line (strings, None when
    absent). `--env K` without "=V" takes K from *environ* (default os.environ), as docker does,
    and is left out when K is not set there. Errors are InputErrors naming the option."""
    try:
        parse_reference(image)
    except InputError as e:
        raise InputError(f"image {e.what}", e.why) from None
    return TaskSpec(
        image=image,
        argv=tuple(argv),
        env=_env_options(env, os.environ if environ is None else environ),
        workdir=_absolute("--workdir", workdir),
        user=_nonempty("--user", user),
        hostname=_checked("--hostname", hostname, check_hostname),
        network="host" if _choice("--network", network, NETWORKS) == "host" else "none",
        volumes=tuple(parse_volume_option(v) for v in volumes),
        resources=Resources(cpus=_cpus(cpus), mem_bytes=_size("--memory", memory),
                            pids=_count("--pids", pids), disk_bytes=_size("--disk", disk)),
        backend=cast(Backend, _choice("--backend", backend, BACKENDS) or "imagefs"),
        name=_checked("--name", name, check_container_id),
        isolation=_isolation(isolation),
    )


def parse_volume_option(text: str) -> Volume:
    """`HOST:CONTAINER[:ro|rw]`; a relative HOST is inside the sandbox."""
    what = f"--volume {text}"
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts.pop()
        if mode not in ("ro", "rw"):
            raise InputError(what, f"mode must be ro or rw, got {mode!r}")
    if len(parts) != 2 or not all(parts):
        raise InputError(what, "expected HOST:CONTAINER[:ro|rw]")
    host, container = parts
    if not container.startswith("/"):
        raise InputError(what, "the container path must be absolute")
    if "\0" in text:
        raise InputError(what, "contains a NUL character")
    return Volume(host, container, read_only=mode == "ro")


def _env_options(options: Sequence[str], environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for option in options:
        name, eq, value = option.partition("=")
        if why := check_env_name(name):
            raise InputError(f"--env {option}", why)
        if "\0" in value:
            raise InputError(f"--env {option}", "contains a NUL character")
        if eq:
            out.append((name, value))
        elif name in environ:
            out.append((name, environ[name]))
    return tuple(out)


def _cpus(value: str | float | None) -> float | None:
    if value is None:
        return None
    try:
        cpus = float(value)
    except ValueError:
        raise InputError(f"--cpus {value}", "not a number") from None
    if not math.isfinite(cpus) or cpus <= 0:
        raise InputError(f"--cpus {value}", "must be a number more than 0")
    return cpus


def _size(option: str, value: str | int | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(str(value))
    except ValueError as e:
        raise InputError(f"{option} {value}", str(e)) from None


def _count(option: str, value: str | int | None) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) <= 0:
        raise InputError(f"{option} {value}", "must be a whole number more than 0")
    return int(text)


def _choice(option: str, value: str | None, choices: Sequence[str]) -> str | None:
    if value is not None and value not in choices:
        raise InputError(f"{option} {value}", f"must be one of {', '.join(choices)}")
    return value


def _nonempty(option: str, value: str | None) -> str | None:
    if value is not None and (not value or "\0" in value):
        raise InputError(f"{option} {value!r}", "must be a non-empty string")
    return value


def _absolute(option: str, value: str | None) -> str | None:
    value = _nonempty(option, value)
    if value is not None and not value.startswith("/"):
        raise InputError(f"{option} {value}", "must be an absolute path")
    return value


def _checked(option: str, value: str | None, check: Callable[[str], str | None]) -> str | None:
    if value is not None and (why := check(value)):
        raise InputError(f"{option} {value}", why)
    return value


def _isolation(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")]
    for n in names:
        if not _ISOLATOR.fullmatch(n):
            raise InputError(f"--isolation {value}", f"{n!r} is not an isolator name (like cgroups/cpu)")
    if len(set(names)) != len(names):
        raise InputError(f"--isolation {value}", "an isolator is named twice")
    return tuple(names)
