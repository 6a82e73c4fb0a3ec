"""Task descriptions (launcher/task.py): the Mesos task JSON and `imagefs run` options -> TaskSpec.

Pure: no files but the one read_task test, no network, no root.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from imagefs.errors import InputError
from launcher.spec import Resources, TaskSpec, Volume
from launcher.task import parse_size, parse_task, read_task, spec_from_args

MB = 1 << 20

# The example in DESIGN.md ("Task description").
DESIGN_EXAMPLE = """
{ "name": "t1", "command": {"value": "echo hi > out", "shell": true, "environment": {"variables": [{"name":"K","value":"V"}]}},
  "resources": {"cpus": 0.5, "mem": 256, "disk": 1024},
  "container": { "type": "MESOS", "hostname": "t1",
    "mesos": {"image": {"type": "DOCKER", "docker": {"name": "127.0.0.1:5000/busybox:latest"}}},
    "volumes": [{"container_path": "/tmp", "host_path": "tmp", "mode": "RW"},
                {"container_path": "/etc/hostconf", "host_path": "/etc", "mode": "RO"}] } }
"""

# The ContainerInfo from the seed (Mesos containerization talk), verbatim.
SEED_CONTAINER = """
{ "type" : "MESOS", "mesos" : { "image" : { "type" : "APPC", "appc" : { "name" : "acme.biz/appc/ubuntu1510", "labels" : { "labels": [{"key" : "version", "value" : "0.0.1"}] } } } }, "volumes": [ {"container_path" : "/tmp", "host_path" : "tmp", "mode" : "RW"}, {"container_path" : "/root", "host_path" : "/root", "mode" : "RW"}, {"container_path" : "/etc", "host_path" : "/etc", "mode" : "RO"}, {"container_path" : "/var/run", "host_path" : "/var/run", "mode" : "RW"}, {"container_path" : "/var/tmp", "host_path" : "/var/tmp", "mode" : "RW"} ] }
"""


def minimal(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "command": {"value": "true"},
        "container": {"type": "MESOS", "mesos": {"image": {"type": "DOCKER", "docker": {"name": "busybox"}}}},
    }
    doc.update(overrides)
    return doc


def parse(doc: Any) -> TaskSpec:
    return parse_task(json.dumps(doc), what="task.json")


def error(doc: Any) -> str:
    with pytest.raises(InputError) as e:
        parse_task(doc if isinstance(doc, (str, bytes)) else json.dumps(doc), what="task.json")
    return e.value.line()


# -- what parses ------------------------------------------------------------------------------------

def test_design_example_parses_exactly() -> None:
    assert parse_task(DESIGN_EXAMPLE, what="task.json") == TaskSpec(
        image="docker://127.0.0.1:5000/busybox:latest",
        argv=("echo hi > out",),
        shell=True,
        env=(("K", "V"),),
        hostname="t1",
        network="none",
        volumes=(Volume("tmp", "/tmp", read_only=False), Volume("/etc", "/etc/hostconf", read_only=True)),
        resources=Resources(cpus=0.5, mem_bytes=256 * MB, disk_bytes=1024 * MB),
        name="t1",
    )


def test_seed_appc_container() -> None:
    doc = {"name": "seed", "command": {"value": "ls /"}, "container": json.loads(SEED_CONTAINER)}
    spec = parse(doc)
    assert spec.image == "appc:acme.biz/appc/ubuntu1510,version=0.0.1"
    assert spec.volumes == (
        Volume("tmp", "/tmp"), Volume("/root", "/root"), Volume("/etc", "/etc", read_only=True),
        Volume("/var/run", "/var/run"), Volume("/var/tmp", "/var/tmp"),
    )
    assert spec.network == "none" and spec.hostname is None


def test_appc_labels_keep_their_order_and_may_be_absent() -> None:
    labels = {"labels": [{"key": "version", "value": "1"}, {"key": "arch", "value": "amd64"}]}
    doc = minimal(container={"type": "MESOS", "mesos": {"image": {"type": "APPC",
                                                                  "appc": {"name": "a.b/c", "labels": labels}}}})
    assert parse(doc).image == "appc:a.b/c,version=1,arch=amd64"
    doc["container"]["mesos"]["image"]["appc"] = {"name": "a.b/c"}
    assert parse(doc).image == "appc:a.b/c"


def test_oci_image() -> None:
    image = {"type": "OCI", "oci": {"path": "/layouts/busybox", "tag": "1.36"}}
    doc = minimal(container={"type": "MESOS", "mesos": {"image": image}})
    assert parse(doc).image == "oci:/layouts/busybox:1.36"
    del image["oci"]["tag"]
    assert parse(doc).image == "oci:/layouts/busybox"


def test_docker_name_is_always_a_docker_reference() -> None:
    doc = minimal()
    assert parse(doc).image == "docker://busybox"
    # "oci" here is a registry host, not the oci: transport.
    doc["container"]["mesos"]["image"]["docker"]["name"] = "oci:5000/x"
    assert parse(doc).image == "docker://oci:5000/x"


def test_shell_true_is_the_default() -> None:
    spec = parse(minimal(command={"value": "echo $HOME | wc -c"}))
    assert spec.shell and spec.argv == ("echo $HOME | wc -c",)


def test_shell_false_value_is_the_executable() -> None:
    spec = parse(minimal(command={"shell": False, "value": "/bin/echo", "arguments": ["echo", "a b", ""]}))
    assert not spec.shell and spec.argv == ("/bin/echo", "a b", "")
    spec = parse(minimal(command={"shell": False, "value": "/bin/true"}))
    assert spec.argv == ("/bin/true",)


def test_shell_false_without_value_runs_the_image_default() -> None:
    spec = parse(minimal(command={"shell": False}))
    assert not spec.shell and spec.argv == ()


def test_environment_and_user() -> None:
    env = {"variables": [{"name": "A", "value": "1"}, {"name": "B", "value": "", "type": "VALUE"}]}
    spec = parse(minimal(command={"value": "env", "environment": env, "user": "nobody"}))
    assert spec.env == (("A", "1"), ("B", "")) and spec.user == "nobody"


def test_both_resource_forms() -> None:
    simple = parse(minimal(resources={"cpus": 2, "mem": 0.5, "disk": 10}))
    listed = parse(minimal(resources=[
        {"name": "cpus", "type": "SCALAR", "scalar": {"value": 2}},
        {"name": "mem", "type": "SCALAR", "scalar": {"value": 0.5}},
        {"name": "disk", "type": "SCALAR", "scalar": {"value": 10}},
    ]))
    assert simple.resources == listed.resources == Resources(cpus=2.0, mem_bytes=MB // 2, disk_bytes=10 * MB)
    assert parse(minimal(resources=[{"name": "mem", "type": "SCALAR", "scalar": {"value": 64}}])).resources == \
        Resources(mem_bytes=64 * MB)
    assert parse(minimal()).resources == Resources()


def test_container_id_from_task_id_else_name() -> None:
    assert parse(minimal(name="web", task_id={"value": "web-1.a_b"})).name == "web-1.a_b"
    assert parse(minimal(name="my task", task_id={"value": "t2"})).name == "t2"   # a free-form name
    assert parse(minimal(name="web")).name == "web"
    assert parse(minimal()).name is None


def test_network() -> None:
    container = minimal()["container"]
    assert parse(minimal(container={**container, "network_infos": []})).network == "none"
    assert parse(minimal(container={**container, "network": "host"})).network == "host"


def test_bytes_input() -> None:
    assert parse_task(DESIGN_EXAMPLE.encode(), what="task.json").name == "t1"


def test_read_task(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(DESIGN_EXAMPLE)
    assert read_task(str(path)).hostname == "t1"
    with pytest.raises(InputError) as e:
        read_task(str(tmp_path / "missing.json"))
    assert e.value.line() == f"imagefs: {tmp_path}/missing.json: No such file or directory"


# -- errors name the JSON path ----------------------------------------------------------------------

def with_at(doc: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    """A copy of *doc* with the item at *path* set to *value* (deleted when value is ...)."""
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


DESIGN = json.loads(DESIGN_EXAMPLE)


@pytest.mark.parametrize(("path", "value", "message"), [
    # unknown fields, at every depth
    (["nmae"], "x", "nmae: unknown field"),
    (["container", "mesos", "image", "docker", "nmae"], "x", "container.mesos.image.docker.nmae: unknown field"),
    (["container", "volumes", 1, "mdoe"], "RO", "container.volumes[1].mdoe: unknown field"),
    (["command", "environment", "variables", 0, "vaule"], "V", "command.environment.variables[0].vaule: unknown field"),
    (["resources", "gpus"], 1, "resources.gpus: unknown field"),
    # known to Mesos, not implemented here
    (["container", "volumes", 0, "source"], {"type": "SANDBOX_PATH"},
     "container.volumes[0].source: not supported: volume sources (use host_path)"),
    (["command", "uris"], [], "command.uris: not supported"),
    (["executor"], {}, "executor: not supported"),
    (["container", "network_infos"], [{"name": "cni1"}], "container.network_infos: not supported: CNI networks"),
    # wrong types
    (["name"], 7, "name: expected a string, got number"),
    (["command", "shell"], "yes", "command.shell: expected a boolean, got string"),
    (["command", "value"], None, "command.value: expected a string, got null"),
    (["resources", "cpus"], "1", "resources.cpus: expected a number, got string"),
    (["resources", "mem"], True, "resources.mem: expected a number, got boolean"),
    (["container", "volumes"], {}, "container.volumes: expected an array, got object"),
    (["container", "mesos"], [], "container.mesos: expected an object, got array"),
    # bad values
    (["resources", "cpus"], -1, "resources.cpus: must be a finite number more than 0, got -1"),
    (["resources", "disk"], 0, "resources.disk: must be a finite number more than 0, got 0"),
    (["container", "volumes", 1, "mode"], "ro", "container.volumes[1].mode: must be one of RW, RO, got 'ro'"),
    (["container", "volumes", 0, "container_path"], "tmp", "container.volumes[0].container_path: must be absolute"),
    (["container", "volumes", 0, "host_path"], ..., "container.volumes[0].host_path: required"),
    (["container", "type"], "DOCKER", "container.type: must be one of MESOS, got 'DOCKER'"),
    (["container", "mesos", "image", "type"], "RKT", "container.mesos.image.type: must be one of DOCKER, APPC, OCI"),
    (["container", "mesos", "image", "appc"], {"name": "x"}, "container.mesos.image.appc: does not match type DOCKER"),
    (["container", "mesos", "image", "docker", "name"], "Bad Name!", "container.mesos.image.docker.name: docker://Bad Name!"),
    (["container", "hostname"], "-bad", "container.hostname: not a host name"),
    (["container", "network"], "bridge", "container.network: must be one of none, host"),
    (["name"], "../etc", "name: not a container id"),
    (["name"], "x" * 65, "name: not a container id"),
    (["task_id"], {"value": "a b"}, "task_id.value: not a container id"),
    (["command", "environment", "variables", 0, "name"], "A=B", "command.environment.variables[0].name: not an environment"),
    (["command", "arguments"], ["x"], "command.arguments: not allowed when shell is true"),
    (["command", "value"], ..., "command.value: required when shell is true"),
    (["command"], ..., "command: required"),
    (["container", "mesos", "image"], ..., "container.mesos.image: required"),
])
def test_errors_name_the_json_path(path: list[Any], value: Any, message: str) -> None:
    line = error(with_at(DESIGN, path, value))
    assert line.startswith(f"imagefs: task.json: {message}"), line


def test_more_errors() -> None:
    assert error(minimal(resources=[{"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}},
                                    {"name": "cpus", "type": "SCALAR", "scalar": {"value": 2}}])) \
        == "imagefs: task.json: resources[1].name: cpus given twice"
    assert error(minimal(resources=[{"name": "cpus", "type": "RANGES", "scalar": {"value": 1}}])).startswith(
        "imagefs: task.json: resources[0].type: must be one of SCALAR")
    assert error(minimal(resources=[{"name": "cpus", "type": "SCALAR", "scalar": {"vaule": 1}}])) \
        == "imagefs: task.json: resources[0].scalar.vaule: unknown field"
    assert error(minimal(command={"shell": False, "arguments": ["a"]})).startswith(
        "imagefs: task.json: command.arguments: not supported without command.value")
    labels = {"labels": [{"key": "a,b", "value": "1"}]}
    doc = minimal(container={"type": "MESOS", "mesos": {"image": {"type": "APPC", "appc": {"name": "x", "labels": labels}}}})
    assert error(doc).startswith("imagefs: task.json: container.mesos.image.appc.labels.labels[0]: labels cannot contain")
    assert error(minimal(resources={"mem": 1e-9})) == \
        "imagefs: task.json: resources.mem: 1e-09 MB is out of range (1 byte to 4398046511104 MB)"
    assert error(json.dumps(minimal(resources={"disk": 1})).replace('"disk": 1', '"disk": 1e400')) == \
        "imagefs: task.json: resources.disk: must be a finite number more than 0, got inf"
    assert error([]) == "imagefs: task.json: expected an object, got array"
    assert error(minimal(command={"value": "a\0b"})) == "imagefs: task.json: command.value: contains a NUL character"


@pytest.mark.parametrize(("text", "why"), [
    ('{"name": "t1",', "malformed JSON: Expecting property name enclosed in double quotes at line 1 column 15"),
    ("", "malformed JSON: Expecting value at line 1 column 1"),
    ('{"name": "a", "name": "b"}', "malformed JSON: duplicate field 'name'"),
    ('{"resources": {"cpus": NaN}}', "malformed JSON: NaN is not a JSON number"),
    (b'{"name": "\xff"}', "malformed JSON: not UTF-8 text"),
])
def test_malformed_json(text: str | bytes, why: str) -> None:
    assert error(text) == f"imagefs: task.json: {why}"


# -- imagefs run options ----------------------------------------------------------------------------

def test_spec_from_args_all_options() -> None:
    spec = spec_from_args(
        "127.0.0.1:5000/busybox:latest", ["sh", "-c", "echo hi"],
        volumes=["data:/data", "/etc:/etc/host:ro", "/srv:/srv:rw"],
        env=["A=1", "B=", "FROM_CALLER", "NOT_SET"], environ={"FROM_CALLER": "yes"},
        cpus="1.5", memory="512m", pids="64", disk="1g",
        hostname="box", network="host", backend="overlay", workdir="/work",
        name="c1", user="1000:1000", isolation="cgroups/cpu, cgroups/mem,disk/du")
    assert spec == TaskSpec(
        image="127.0.0.1:5000/busybox:latest", argv=("sh", "-c", "echo hi"),
        env=(("A", "1"), ("B", ""), ("FROM_CALLER", "yes")),
        workdir="/work", user="1000:1000", hostname="box", network="host",
        volumes=(Volume("data", "/data"), Volume("/etc", "/etc/host", read_only=True), Volume("/srv", "/srv")),
        resources=Resources(cpus=1.5, mem_bytes=512 * MB, pids=64, disk_bytes=1 << 30),
        backend="overlay", name="c1", isolation=("cgroups/cpu", "cgroups/mem", "disk/du"))


def test_spec_from_args_defaults() -> None:
    assert spec_from_args("busybox") == TaskSpec(image="busybox")


@pytest.mark.parametrize(("text", "size"), [
    ("512m", 512 * MB), ("1g", 1 << 30), ("1G", 1 << 30), ("1.5g", 3 << 29), ("100k", 102400),
    ("1048576", MB), ("64MB", 64 * MB), ("2GiB", 2 << 30), ("10b", 10), ("1t", 1 << 40),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("kwargs", "line"), [
    ({"memory": "lots"}, "imagefs: --memory lots: not a size (like 512m, 1g or a number of bytes)"),
    ({"memory": "0"}, "imagefs: --memory 0: must be more than 0 bytes"),
    ({"memory": "9999p"}, "imagefs: --memory 9999p: too large"),
    ({"disk": "9" * 400}, f"imagefs: --disk {'9' * 400}: too large"),
    ({"memory": "-1m"}, "imagefs: --memory -1m: not a size (like 512m, 1g or a number of bytes)"),
    ({"disk": "1x"}, "imagefs: --disk 1x: not a size (like 512m, 1g or a number of bytes)"),
    ({"cpus": "many"}, "imagefs: --cpus many: not a number"),
    ({"cpus": "0"}, "imagefs: --cpus 0: must be a number more than 0"),
    ({"cpus": "nan"}, "imagefs: --cpus nan: must be a number more than 0"),
    ({"pids": "1.5"}, "imagefs: --pids 1.5: must be a whole number more than 0"),
    ({"volumes": ["/a"]}, "imagefs: --volume /a: expected HOST:CONTAINER[:ro|rw]"),
    ({"volumes": [":/a"]}, "imagefs: --volume :/a: expected HOST:CONTAINER[:ro|rw]"),
    ({"volumes": ["/a:/b:rx"]}, "imagefs: --volume /a:/b:rx: mode must be ro or rw, got 'rx'"),
    ({"volumes": ["/a:/b:ro:x"]}, "imagefs: --volume /a:/b:ro:x: expected HOST:CONTAINER[:ro|rw]"),
    ({"volumes": ["/a:b"]}, "imagefs: --volume /a:b: the container path must be absolute"),
    ({"network": "bridge"}, "imagefs: --network bridge: must be one of none, host"),
    ({"backend": "zfs"}, "imagefs: --backend zfs: must be one of imagefs, overlay, copy, bind"),
    ({"env": ["=x"]}, "imagefs: --env =x: not an environment variable name"),
    ({"workdir": "rel"}, "imagefs: --workdir rel: must be an absolute path"),
    ({"name": "a/b"}, "imagefs: --name a/b: not a container id"),
    ({"hostname": "a_b"}, "imagefs: --hostname a_b: not a host name"),
    ({"user": ""}, "imagefs: --user '': must be a non-empty string"),
    ({"isolation": "cgroups/cpu,"}, "imagefs: --isolation cgroups/cpu,: '' is not an isolator name"),
    ({"isolation": "disk/du,disk/du"}, "imagefs: --isolation disk/du,disk/du: an isolator is named twice"),
])
def test_spec_from_args_errors_name_the_option(kwargs: dict[str, Any], line: str) -> None:
    with pytest.raises(InputError) as e:
        spec_from_args("busybox", **kwargs)
    assert e.value.line().startswith(line), e.value.line()


def test_spec_from_args_bad_image() -> None:
    with pytest.raises(InputError) as e:
        spec_from_args("dir:/x")
    assert e.value.line().startswith("imagefs: image dir:/x: unknown transport")
