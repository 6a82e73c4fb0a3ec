"""The `imagefs` command line: argument parsing and output only; the work lives in the packages.

Every ImagefsError becomes one line on stderr (`imagefs: <what>: <why>`) and its exit status;
anything unexpected is logged with its traceback only under -v and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from imagefs.errors import EXIT_RUNTIME, EXIT_USAGE, ImagefsError, InputError, NotFound

# The stores, the launcher and the rest are imported where a command needs them: an `imagefs run`
# that an agent serves (launcher/agent_client.py) needs none of them.

if TYPE_CHECKING:
    from collections.abc import Mapping
    from concurrent.futures import Future

    from imagefs.fuse.daemon import Standby
    from launcher.agent import StandbyPool
    from launcher.run import TaskIO
    from stores.model import Layer
    from stores.pull import SourceOptions
    from stores.source import Source
    from stores.store import ImageRecord, Store

log = logging.getLogger("imagefs")

DEFAULT_STORE = "/var/lib/imagefs/store"
DEFAULT_WORK = "/var/lib/imagefs/work"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other bad input
        raise InputError(self.prog.removeprefix("imagefs").strip() or "usage", message)


def _source_arguments(p: argparse.ArgumentParser) -> None:
    """Options saying how to reach sources; accepted before or after the command. Their defaults
    are applied in `source_options` (argparse lets a subcommand's defaults clobber the main
    parser's values, so both leave them unset)."""
    p.add_argument("--insecure-registry", action="append", default=argparse.SUPPRESS, metavar="HOST",
                   help="use plain HTTP for HOST (repeatable; also $IMAGEFS_INSECURE_REGISTRIES)")
    p.add_argument("--ca-file", default=argparse.SUPPRESS, help="extra CA bundle for registries ($IMAGEFS_CA_FILE)")
    p.add_argument("--auth-file", default=argparse.SUPPRESS,
                   help="docker config.json with credentials ($IMAGEFS_AUTH_FILE, else ~/.docker/config.json)")
    p.add_argument("--appc-discovery", default=argparse.SUPPRESS, metavar="PREFIX",
                   help="directory or http(s) URL prefix for Appc simple discovery ($IMAGEFS_APPC_DISCOVERY)")
    p.add_argument("--platform", default=argparse.SUPPRESS, metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from multi-platform images (default: this host's)")


def _mount_job_arguments(p: argparse.ArgumentParser) -> None:
    """What a mount server is to serve: the `mount` command's arguments, which a standby server
    (imagefs/fuse/daemon.py) gets over its pipe instead of on its command line."""
    p.add_argument("ref")
    p.add_argument("mountpoint")
    p.add_argument("--prefetch", choices=("none", "profile", "all"), default="all",
                   help="fetch the rest of the image in the background: the files of its access "
                        "profile first, then (all) everything (default: all)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="imagefs", description="Lazy-pulling container image filesystem and launcher.")
    p.add_argument("--store", default=os.environ.get("IMAGEFS_STORE", DEFAULT_STORE), help="image store directory")
    p.add_argument("--work-dir", default=os.environ.get("IMAGEFS_WORK_DIR", DEFAULT_WORK), help="containers and mounts")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--cgroup-root", default=os.environ.get("IMAGEFS_CGROUP_ROOT"),
                   help="where container cgroups go (default: imagefs/ below this process's cgroup)")
    _source_arguments(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sources = _Parser(add_help=False)
    _source_arguments(sources)
    s = sub.add_parser("pull", help="fetch manifest, config and layer indexes", parents=[sources])
    s.add_argument("ref")
    s.add_argument("--all-layers", action="store_true", help="keep whole layers locally too")
    s.add_argument("--push-index", action="store_true",
                   help="publish the layer indexes to the image's registry (an OCI artifact referring to it)")
    s = sub.add_parser("index", help="build an image's layer indexes; --push publishes them to its registry",
                       parents=[sources])
    s.add_argument("ref")
    s.add_argument("--push", action="store_true",
                   help="publish them as an OCI artifact referring to the image (found by later pulls)")
    sub.add_parser("images", help="list images in the store")
    s = sub.add_parser("inspect", help="manifest, config, layers, index status")
    s.add_argument("ref")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("rmi", help="forget image references")
    s.add_argument("refs", nargs="+", metavar="REF")
    sub.add_parser("gc", help="delete unreferenced blobs, indexes and chunks")
    s = sub.add_parser("mount", help="lazily mount an image's merged rootfs read-only", parents=[sources])
    s.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    _mount_job_arguments(s)   # a standby server gets "-" for ref and mountpoint: see cmd_mount
    s.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--standby-fd", type=int, default=None, help=argparse.SUPPRESS)  # daemon.spawn_standby
    s = sub.add_parser("umount", help="unmount and stop the serving process")
    s.add_argument("mountpoint")

    s = sub.add_parser("run", help="run a command in a container of an image", parents=[sources])
    s.add_argument("--task", metavar="FILE.json", help="a Mesos-style task description instead of REF CMD")
    s.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CONTAINER[:ro|rw]")
    s.add_argument("--cpus", metavar="F")
    s.add_argument("-m", "--memory", metavar="SIZE")
    s.add_argument("--pids", metavar="N")
    s.add_argument("--disk", metavar="SIZE", help="sandbox disk quota (killed when exceeded)")
    s.add_argument("--hostname")
    s.add_argument("--network", choices=("none", "host"), default=None)
    s.add_argument("--backend", choices=("imagefs", "overlay", "copy", "bind"), default=None)
    s.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    s.add_argument("-w", "--workdir")
    s.add_argument("-u", "--user")
    s.add_argument("--name", metavar="ID", help="container id (default: generated)")
    s.add_argument("--isolation", metavar="A,B,...", help="isolators (default: all)")
    s.add_argument("-d", "--detach", action="store_true", help="print the container id and return")
    s.add_argument("--no-agent", action="store_true",
                   help="launch from this process even when an `imagefs agent` serves the work dir")
    s.add_argument("ref", nargs="?")
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    sub.add_parser("ps", help="containers known to this work dir")
    s = sub.add_parser("kill", help="send a signal to a container (default KILL)")
    s.add_argument("id")
    s.add_argument("signal", nargs="?", default="KILL")
    s = sub.add_parser("wait", help="wait for a container to end; exit with its status")
    s.add_argument("id")
    s = sub.add_parser("stats", help="resource usage of a container")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    sub.add_parser("recover", help="clean up after a launcher that died: destroy ended containers, remove orphans")
    sub.add_parser("agent", parents=[sources],
                   help="serve `imagefs run` for this store and work dir from a resident process "
                        "(as the Mesos agent): runs start without paying for Python's start-up")
    return p


def source_options(args: argparse.Namespace):
    from stores.pull import SourceOptions

    insecure = set(getattr(args, "insecure_registry", []))
    insecure.update(h for h in os.environ.get("IMAGEFS_INSECURE_REGISTRIES", "").split(",") if h)
    return SourceOptions(appc_discovery=getattr(args, "appc_discovery", os.environ.get("IMAGEFS_APPC_DISCOVERY")),
                         auth_file=getattr(args, "auth_file", os.environ.get("IMAGEFS_AUTH_FILE")),
                         insecure=frozenset(insecure),
                         ca_file=getattr(args, "ca_file", os.environ.get("IMAGEFS_CA_FILE")),
                         cache_dir=os.path.join(args.store, "tmp", "appc"))


def _platform(args: argparse.Namespace):
    from stores.manifest import parse_platform

    text = getattr(args, "platform", None)
    return parse_platform(text) if text else None


def find_image(store: Store, ref: str) -> ImageRecord:
    from stores.reference import parse_reference

    try:
        name = str(parse_reference(ref))
    except InputError:
        name = ref
    image_id = store.lookup(name) or store.lookup(ref)
    if image_id is None:
        raise NotFound(ref, "no such image in the store (imagefs pull it first)")
    return store.load(image_id)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cmd_pull(args: argparse.Namespace) -> int:
    from imagefs.progress import progress_for
    from stores.pull import pull
    from stores.store import Store

    store = Store(args.store)
    with progress_for(sys.stderr, quiet=args.quiet) as progress:
        record = pull(store, args.ref, options=source_options(args), platform=_platform(args),
                      all_layers=args.all_layers, progress=progress, push_index=args.push_index)
    if not args.quiet:
        print(f"{record.refs[0] if record.refs else args.ref} {record.id[:12]}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Index every layer (reusing the store's indexes, never looking for published ones: this is
    what produces them; an index the store took from one earlier is fetched whole) and, with
    --push, publish them with the image's access profile if the store has one (the layers
    holding its files re-indexed first, with a seek point at each: imagefs/profile_points.py);
    prints each layer's index size."""
    from imagefs.progress import progress_for
    from imagefs.publish import publish
    from stores.pull import pull
    from stores.reference import DockerReference, parse_reference
    from stores.registry import RegistrySource
    from stores.store import Store

    if args.push and not isinstance(parse_reference(args.ref), DockerReference):
        raise InputError(args.ref, "indexes can only be published to a registry (docker://...)")
    store = Store(args.store)
    options = source_options(args)
    with progress_for(sys.stderr, quiet=args.quiet) as progress:
        record = pull(store, args.ref, options=options, platform=_platform(args), progress=progress,
                      use_published=False)
    image = record.image
    layers = {layer.digest: layer for layer in image.layers}
    if not all(store.has_full_index(d) for d in layers):
        # Indexes an earlier pull took from a published artifact are held as metadata only:
        # made whole from that (verified) artifact rather than rebuilt from the layers. An
        # eStargz layer has its TOC only: its index is built from the layer.
        from imagefs.publish import fetch_full_index
        from stores.pull import index_whole_layer

        with options.open(record.source) as source:
            for layer in layers.values():
                if store.has_full_index(layer.digest):
                    continue
                if store.has_toc(layer.digest):
                    index_whole_layer(store, source, layer)
                else:
                    fetch_full_index(store, source, layer)
    if args.push:  # seek points at the files of the access profile the artifact carries
        from imagefs.profile_points import add_profile_points

        add_profile_points(store, image, lambda: options.open(record.source))
    index_sizes = {d: store.index_path(d).stat().st_size for d in layers}
    total_layers, total_indexes = sum(l.size for l in layers.values()), sum(index_sizes.values())
    if not args.quiet:
        print(f"{record.refs[0] if record.refs else args.ref} {record.id[:12]}")
        for digest, layer in layers.items():
            print(f"  {digest}  layer {_human(layer.size):>10}  index {_human(index_sizes[digest]):>10}"
                  f"  {100 * index_sizes[digest] / max(layer.size, 1):.2f}%")
        print(f"indexes {_human(total_indexes)} for {_human(total_layers)} of layers "
              f"({100 * total_indexes / max(total_layers, 1):.2f}%)")
    if args.push:
        with options.open(record.source) as source:
            if not isinstance(source, RegistrySource):
                raise InputError(record.source, "indexes can only be published to a registry")
            done = publish(store, source, image)
        if not args.quiet:
            profile = f", access profile of {done.profile_paths} file(s)" if done.profile else ""
            print(f"pushed {done.artifact} ({_human(done.total_bytes)}, "
                  f"{100 * done.total_bytes / max(total_layers, 1):.2f}% of the layers{profile}) "
                  f"to {record.source.rsplit('@', 1)[0]} ({done.how})")
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from stores.store import Store

    store = Store(args.store)
    by_image: dict[str, list[str]] = {}
    for ref, image_id in store.refs().items():
        by_image.setdefault(image_id, []).append(ref)
    rows = []
    for image_id in store.image_ids():
        try:
            record = store.load(image_id)
        except ImagefsError as e:
            log.warning("%s: %s", e.what, e.why)
            continue
        local = store.local_bytes(record.image)
        for ref in by_image.get(image_id, ["<none>"]):
            rows.append((ref, image_id[:12], _human(record.size), _human(local)))
    header = ("REFERENCE", "IMAGE ID", "SIZE", "LOCAL")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def inspect_doc(store: Store, record: ImageRecord) -> dict:
    image = record.image
    return {
        "id": record.id,
        "refs": list(record.refs),
        "source": record.source,
        "manifest_digest": image.manifest_digest,
        "config_digest": image.config_digest,
        "config": {"entrypoint": list(image.runtime.entrypoint), "cmd": list(image.runtime.cmd),
                   "env": list(image.runtime.env), "workdir": image.runtime.workdir,
                   "user": image.runtime.user, "labels": image.runtime.labels,
                   "os": image.runtime.os, "architecture": image.runtime.architecture},
        "layers": [_layer_doc(store, layer) for layer in image.layers],
        "size": record.size,
        "local_bytes": store.local_bytes(image),
    }


def _layer_doc(store: Store, layer: Layer) -> dict:
    return {"digest": layer.digest, "media_type": layer.media_type, "size": layer.size,
            "compression": layer.compression, "root": layer.root,
            "indexed": store.has_index(layer.digest), "index": _index_kind(store, layer),
            "blob_local": store.has_blob(layer.digest)}


def _index_kind(store: Store, layer: Layer) -> str:
    """Where the layer's index came from, in the order a mount prefers them (imagefs/view.py)."""
    if layer.toc_digest and store.has_toc(layer.digest):
        return "estargz-toc"  # the layer's own TOC
    if store.has_full_index(layer.digest):
        return "whole"        # built here, or a published one fetched whole
    if store.has_index(layer.digest):
        return "published"    # a published index's metadata part; windows read remotely
    return "none"


def cmd_inspect(args: argparse.Namespace) -> int:
    from stores.store import Store

    store = Store(args.store)
    doc = inspect_doc(store, find_image(store, args.ref))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"Image:     {doc['id']}")
    print(f"Refs:      {', '.join(doc['refs']) or '<none>'}")
    print(f"Source:    {doc['source']}")
    print(f"Manifest:  {doc['manifest_digest']}")
    print(f"Config:    {doc['config_digest']}")
    cfg = doc["config"]
    print(f"Platform:  {cfg['os']}/{cfg['architecture']}")
    print(f"Entrypoint: {json.dumps(cfg['entrypoint'])}  Cmd: {json.dumps(cfg['cmd'])}")
    print(f"Env:       {json.dumps(cfg['env'])}")
    if cfg["workdir"] or cfg["user"]:
        print(f"Workdir:   {cfg['workdir'] or '/'}  User: {cfg['user'] or 'root'}")
    print(f"Size:      {_human(doc['size'])} ({_human(doc['local_bytes'])} local)")
    print("Layers:")
    for layer in doc["layers"]:
        state = (f"index: {layer['index']}" if layer["indexed"] else "no index") + (
            ", local" if layer["blob_local"] else ", lazy")
        print(f"  {layer['digest']}  {_human(layer['size']):>10}  {layer['compression']:<5} {state}")
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from stores.reference import parse_reference
    from stores.store import Store

    store = Store(args.store)
    status = 0
    for ref in args.refs:
        try:
            name = str(parse_reference(ref))
        except InputError:
            name = ref
        if name not in store.refs() and ref in store.refs():
            name = ref
        try:
            image_id = store.remove_ref(name)
        except ImagefsError as e:
            print(e.line(), file=sys.stderr)
            status = e.status
            continue
        print(f"untagged {name} ({image_id[:12]})")
    return status


def images_in_use(work_dir: str) -> set[str]:
    """Image ids that containers (not yet terminated) and shared mounts of this work dir use."""
    from launcher.state import TERMINATED, ContainerDirs

    used = set()
    mounts = os.path.join(work_dir, "mounts")
    if os.path.isdir(mounts):
        used.update(os.listdir(mounts))
    dirs = ContainerDirs(work_dir)
    for container_id in dirs.ids():
        try:
            state = dirs.load(container_id)
        except ImagefsError:
            continue
        if state.status != TERMINATED and state.image_id:
            used.add(state.image_id)
    return used


def cmd_gc(args: argparse.Namespace) -> int:
    from stores.store import Store

    removed = Store(args.store).gc(images_in_use(args.work_dir))
    print(f"removed {removed['images']} images, {removed['blobs']} blobs, {removed['indexes']} indexes, "
          f"{removed['chunks']} chunk caches, {removed['layers']} extracted layers ({_human(removed['bytes'])})")
    return 0


def image_or_pull(store: Store, args: argparse.Namespace) -> ImageRecord:
    """The image *args.ref* names, pulled (lazily: indexes only) if the store lacks it."""
    from stores.pull import find_or_pull

    return find_or_pull(store, args.ref, source_options(args), _platform(args))


def _source_flags(args: argparse.Namespace) -> list[str]:
    """The source options of *args* as flags, for a child process that must reach the same source."""
    flags = [f"--insecure-registry={h}" for h in getattr(args, "insecure_registry", [])]
    for name in ("ca_file", "auth_file", "appc_discovery"):
        value = getattr(args, name, None)
        if value:
            local = "://" not in value  # the child runs elsewhere: make paths absolute
            flags.append(f"--{name.replace('_', '-')}={os.path.abspath(value) if local else value}")
    return flags + ["-v"] * args.verbose


def _await_mount_job(args: argparse.Namespace) -> bool:
    """A standby server (daemon.spawn_standby): import what serving takes, then wait for the job
    and take its arguments, and its mount point's log. False: dismissed, nothing to serve."""
    import select

    import imagefs.fuse.server  # noqa: F401  (importing is the point: before the job comes)
    import imagefs.prefetch  # noqa: F401
    import imagefs.view  # noqa: F401
    import stores.pull  # noqa: F401
    from imagefs.fuse import daemon

    if not select.select([args.standby_fd], [], [], 0)[0]:
        # Still idle: import what the first read from a registry takes, too (_SourceAhead).
        import stores.registry  # noqa: F401
    job = daemon.Job.read(args.standby_fd)
    if job is None:
        return False
    daemon.redirect_output(daemon.log_path(args.work_dir, job.mountpoint))
    job_parser = _Parser(prog="imagefs mount", add_help=False)
    _mount_job_arguments(job_parser)
    job_parser.parse_args([*job.mount_options, job.ref, job.mountpoint], namespace=args)
    return True


def cmd_mount(args: argparse.Namespace) -> int:
    from imagefs.fuse import daemon
    from stores.store import Store

    if args.standby_fd is not None and not _await_mount_job(args):
        return 0
    store = Store(args.store)
    mountpoint = os.path.realpath(args.mountpoint)
    daemon.prepare_mountpoint(mountpoint)
    if not args.foreground:
        prefix = daemon.cli_prefix(os.path.abspath(args.store), os.path.abspath(args.work_dir), _source_flags(args))
        standby = daemon.spawn_standby(prefix, args.work_dir)   # its start-up overlaps the pull
        try:
            record = image_or_pull(store, args)
            daemon.start(prefix, record.id, mountpoint, args.work_dir, record.id, [f"--prefetch={args.prefetch}"],
                         standby=standby)
        finally:
            if standby is not None:
                standby.dismiss()
        return 0
    record = image_or_pull(store, args)
    from imagefs.fuse.server import serve
    from imagefs.prefetch import Prefetcher, ProfileRecorder, load_profile
    from imagefs.view import ImageView

    source = _SourceAhead(source_options(args), record.source)
    if "stores.registry" in sys.modules:
        # Imported already (a standby server): opening the source now costs the mount little,
        # the SSL context's loading runs without the GIL. Otherwise it starts once the mount
        # answers (ready below), not to slow the mount down with httpx's import.
        source.start()
    log.debug("image %s: opening its view", record.id[:12])
    view = ImageView.open(store, record, source.get)
    log.debug("image %s: view open; mounting at %s", record.id[:12], mountpoint)
    recorder = None if load_profile(store, record.id) else ProfileRecorder(store, view)
    if recorder is not None:
        view.on_read = recorder.read

    def prefetch(stop) -> None:
        Prefetcher(store, view, args.prefetch, stop=stop).run()

    def ready() -> None:
        log.debug("image %s: mounted", record.id[:12])
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready")
            os.close(args.ready_fd)
        source.start()

    try:
        serve(view, mountpoint, ready=ready, background=prefetch)
    finally:
        if recorder is not None:
            recorder.save()
        view.close()
        source.close_unused()
    return 0


class _SourceAhead:
    """The mount server's source (the view opens it on its first remote read), opened ahead in a
    thread once the mount answers. A registry source costs ~80 ms to open (httpx's import, an
    SSL context), which the task's first read would otherwise wait for; opening it dials nothing.
    Other sources are opened on first use, as the view would (Appc discovery may reach out)."""

    def __init__(self, options: SourceOptions, reference: str) -> None:
        import threading

        self._options = options
        self._reference = reference
        self._ahead: Future[Source] | None = None
        self._lock = threading.Lock()
        self._taken = False

    def start(self) -> None:
        """Open the source in a thread now (idempotent)."""
        import concurrent.futures
        import threading

        from stores.reference import DockerReference, parse_reference

        try:
            if not isinstance(parse_reference(self._reference), DockerReference):
                return
        except InputError:
            return
        future: Future[Source] = concurrent.futures.Future()

        def open_source() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self._options.open(self._reference))
            except BaseException as e:  # raised where the view asks for the source
                future.set_exception(e)

        with self._lock:
            if self._taken or self._ahead is not None:
                return   # the view has opened it, or it is being opened
            self._ahead = future
        threading.Thread(target=open_source, name="imagefs-source-ahead", daemon=True).start()

    def get(self) -> Source:
        """The source: the one opened ahead, or opened now. The view calls it at most once."""
        with self._lock:
            self._taken = True
            ahead = self._ahead
        return ahead.result() if ahead is not None else self._options.open(self._reference)

    def close_unused(self) -> None:
        """Close the source opened ahead if the view never took it (the view closes its own)."""
        with self._lock:
            ahead, taken = self._ahead, self._taken
        if ahead is not None and not taken:
            try:
                ahead.result().close()
            except Exception:
                pass


def cmd_umount(args: argparse.Namespace) -> int:
    from imagefs.fuse import daemon

    daemon.stop(args.work_dir, os.path.realpath(args.mountpoint))
    return 0


def _containerizer(args: argparse.Namespace, mount_standby: Standby | None = None):
    from launcher.containerizer import Containerizer
    from stores.store import Store

    return Containerizer(Store(args.store), args.work_dir, source_options=source_options(args),
                         source_flags=_source_flags(args), cgroup_root=args.cgroup_root,
                         mount_standby=mount_standby)


# `imagefs run` starts two things before it imports the launcher (trio and the containerizer, the
# better part of its own start-up), so that they overlap that: the image's pull, and a standby mount
# server (imagefs/fuse/daemon.py), which imports what serving takes meanwhile.

def _pull_ahead(args: argparse.Namespace, image: str, lazy: bool = True) -> Future[ImageRecord]:
    """find_or_pull(*image*) in a thread, started now; the containerizer takes its result.
    *lazy*: the container will read the image through its imagefs mount (the imagefs backend),
    so the files it will read first are worth fetching ahead; other backends fetch layers whole."""
    import concurrent.futures
    import threading

    from stores.pull import find_or_pull
    from stores.store import Store

    future: Future[ImageRecord] = concurrent.futures.Future()
    store, options = Store(args.store), source_options(args)

    def pull() -> None:
        future.set_running_or_notify_cancel()
        from imagefs.prioritized import PrioritizedFetch

        early = PrioritizedFetch(store, lambda: options.open(image))  # imagefs/prioritized.py
        try:
            try:
                # Only a registry's layers are read through the chunk cache; a local source's
                # are read where they are, so there is nothing to fetch ahead.
                ahead = lazy and _is_registry(image)
                record = find_or_pull(store, image, options, on_toc=early.layer if ahead else None)
            except BaseException as e:  # handed to the launch that awaits it, raised there
                future.set_exception(e)
                return
            future.set_result(record)
            if ahead:   # the files of a published access profile, while the mount starts
                early.profile(record)
        finally:
            early.finish()

    # A daemon thread: a run that fails before it needs the image does not wait for the pull.
    threading.Thread(target=pull, name="imagefs-pull-ahead", daemon=True).start()
    return future


def _is_registry(image: str) -> bool:
    from stores.reference import DockerReference, parse_reference

    try:
        return isinstance(parse_reference(image), DockerReference)
    except InputError:
        return False  # an image id: found in the store, not pulled


def _mount_standby(args: argparse.Namespace, image: str, backend: str | None,
                   standbys: StandbyPool | None = None) -> Standby | None:
    """A standby mount server for the container's image, or None where none will be needed: the
    backend is not imagefs, or the image's shared mount is up already. *standbys*: an agent's,
    taken from when its servers are started as this run's would be."""
    from imagefs.fuse import daemon
    from launcher.backends.imagefs import is_served
    from stores.reference import parse_reference
    from stores.store import Store

    if (backend or "imagefs") != "imagefs":
        return None
    work = os.path.realpath(args.work_dir)
    store = Store(args.store)
    try:
        image_id = store.lookup(str(parse_reference(image))) or store.lookup(image)
    except InputError:
        image_id = store.lookup(image)
    if image_id is not None and is_served(work, image_id):
        return None
    prefix = daemon.cli_prefix(os.path.realpath(args.store), work, _source_flags(args))
    if standbys is not None and _quiet(standbys.prefix) == _quiet(prefix):   # -v only changes what it logs
        return standbys.take()
    try:
        return daemon.spawn_standby(prefix, work)
    except OSError as e:   # only a head start: the launch starts a server as it always did
        log.debug("no standby mount server: %s", e)
        return None


def _quiet(prefix: list[str]) -> list[str]:
    return [a for a in prefix if a != "-v"]


def cmd_run(args: argparse.Namespace) -> int:
    if not args.no_agent:
        from launcher.agent_client import delegate

        code = delegate(args.work_dir, args.store, args.cgroup_root, args.argv)
        if code is not None:
            return code
    return _run_here(args)


def _run_here(args: argparse.Namespace, io: TaskIO | None = None, *, environ: Mapping[str, str] | None = None,
              cwd: str | None = None, standbys: StandbyPool | None = None) -> int:
    """`imagefs run` in this process: with its console (*io* None), or for an agent's client (its
    output, signals, environment and working directory; the agent's standby mount servers)."""
    import contextlib

    from launcher.task import parse_task, spec_from_args

    def say(line: str) -> None:
        if io is None:
            print(line, file=sys.stderr)
        else:
            io.say(line)
    try:
        if args.task:
            if args.ref or args.cmd:
                raise InputError("run", "--task takes no image or command")
            try:
                data = open(os.path.join(cwd or "", args.task), "rb").read()
            except OSError as e:
                raise InputError(args.task, e.strerror or str(e)) from None
            spec = parse_task(data, what=args.task)
        else:
            if not args.ref:
                raise InputError("run", "an image reference (or --task FILE) is required")
            command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            spec = spec_from_args(args.ref, command, volumes=args.volume, cpus=args.cpus, memory=args.memory,
                                  pids=args.pids, disk=args.disk, hostname=args.hostname, network=args.network,
                                  backend=args.backend, env=args.env, workdir=args.workdir, user=args.user,
                                  name=args.name, isolation=args.isolation,
                                  environ=os.environ if environ is None else environ)
        with contextlib.ExitStack() as stack:
            image = _pull_ahead(args, spec.image, lazy=(spec.backend or "imagefs") == "imagefs")
            standby = _mount_standby(args, spec.image, spec.backend, standbys)
            if standby is not None:
                stack.enter_context(standby)   # dismissed if unused
            from launcher.run import run_task   # only now: see _pull_ahead

            return run_task(_containerizer(args, standby), spec, detach=args.detach, image=image, io=io)
    except ImagefsError as e:  # run's own failures are 125, like docker's and podman's
        say(e.line())
        return getattr(e, "exit_code", 125)


def cmd_agent(args: argparse.Namespace) -> int:
    import trio

    from imagefs.fuse import daemon
    from launcher.agent import Agent, StandbyPool

    store, work = os.path.realpath(args.store), os.path.realpath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    prefix = daemon.cli_prefix(store, work, _source_flags(args))
    standbys = StandbyPool(prefix, lambda: daemon.spawn_standby(prefix, work, wait=True))

    def start() -> None:   # once this agent holds the work dir
        report = trio.run(_containerizer(args).recover)   # as the Mesos agent does when it starts
        if report.destroyed or report.orphans:
            log.info("agent: recovered: %d destroyed, %d orphans removed", len(report.destroyed),
                     len(report.orphans))
        _warm_up()

    def ready() -> None:
        print(f"imagefs agent: serving {work} (pid {os.getpid()})", flush=True)

    return Agent(work, lambda request: _agent_task(args, request, standbys), standbys).serve(ready, start)


def _warm_up() -> None:
    """Import now what a run takes, so that no run waits for it (measured with
    PYTHONPROFILEIMPORTTIME on an agent: these were ~0.1 s of a start)."""
    import encodings.idna  # noqa: F401  (host names in URLs)

    import httpx

    import imagefs.estargz  # noqa: F401
    import imagefs.prioritized  # noqa: F401
    import imagefs.publish  # noqa: F401
    import launcher.linux.cgroups  # noqa: F401
    import launcher.run  # noqa: F401
    import launcher.task  # noqa: F401
    import stores.pull  # noqa: F401
    import stores.registry

    httpx.HTTPTransport().close()   # imports httpcore and h11, which httpx leaves to the first client
    stores.registry.system_tls_context()


def _agent_task(agent_args: argparse.Namespace, request: dict, standbys: StandbyPool):
    """An agent's client's `imagefs run` (launcher/agent_client.py): the function running it, or
    Refused when it is not this agent's to run (the client then runs it itself, as it would
    with no agent): another store or work dir, other source settings, or paths relative to the
    client's directory in what the sources open."""
    from launcher.agent import Refused
    from launcher.agent_client import SOURCE_ENV

    try:
        argv, env, cwd = list(request["run"]), dict(request["env"]), str(request["cwd"])
        store, work = str(request["store"]), str(request["work_dir"])
        cgroup_root = request.get("cgroup_root")
    except (KeyError, TypeError, ValueError):
        raise Refused("malformed request") from None
    if (store, work) != (os.path.realpath(agent_args.store), os.path.realpath(agent_args.work_dir)):
        raise Refused("this agent serves another store or work dir")
    if any(env.get(k) != os.environ.get(k) for k in SOURCE_ENV):
        raise Refused("the client's source settings ($IMAGEFS_*, $HOME) differ from the agent's")
    try:
        args = build_parser().parse_args(argv)
    except ImagefsError as e:
        raise Refused(e.line()) from None
    if args.command != "run":
        raise Refused("not a run")
    relative = [v for v in (getattr(args, n, None) for n in ("ca_file", "auth_file", "appc_discovery"))
                if v and "://" not in v and not os.path.isabs(v)]
    if args.ref and args.ref.startswith(("oci:", "docker-archive:")) and not os.path.isabs(args.ref.split(":", 1)[1]):
        relative.append(args.ref)
    if relative:
        raise Refused(f"{relative[0]}: a path relative to the client's directory")
    args.store, args.work_dir, args.cgroup_root = store, work, cgroup_root
    return lambda io: _run_here(args, io, environ=env, cwd=cwd, standbys=standbys)


def cmd_ps(args: argparse.Namespace) -> int:
    from launcher.run import format_ps

    print(format_ps(_containerizer(args)), end="")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from launcher.run import parse_signal

    _containerizer(args).kill(args.id, parse_signal(args.signal))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from launcher.run import wait_task

    return wait_task(_containerizer(args), args.id)


def cmd_stats(args: argparse.Namespace) -> int:
    stats = _containerizer(args).usage(args.id)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        for key in sorted(stats):
            print(f"{key:<28} {stats[key]:g}")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    import trio

    report = trio.run(_containerizer(args).recover)
    print(f"running: {len(report.running)}  destroyed: {len(report.destroyed)}  orphans removed: {len(report.orphans)}")
    for cid in report.destroyed:
        print(f"destroyed {cid}")
    return 0


COMMANDS = {"run": cmd_run, "ps": cmd_ps, "kill": cmd_kill, "wait": cmd_wait, "stats": cmd_stats,
            "recover": cmd_recover, "agent": cmd_agent, "mount": cmd_mount, "umount": cmd_umount, "pull": cmd_pull, "index": cmd_index, "images": cmd_images, "inspect": cmd_inspect, "rmi": cmd_rmi, "gc": cmd_gc}


def main(argv: Sequence[str] | None = None) -> int:
    verbose = 0
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)   # as given: an agent parses it again
        verbose = args.verbose
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
                            datefmt="%H:%M:%S",
                            # -vv: milliseconds since start, to see where a start's time goes
                            # and the wall clock, to line up an agent's, a client's and a mount server's
                            format="imagefs %(asctime)s.%(msecs)03d %(relativeCreated)5.0fms %(threadName)s: "
                                   "%(message)s" if verbose > 1
                            else "imagefs: %(message)s")
        return COMMANDS[args.command](args)
    except ImagefsError as e:
        print(e.line(), file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("imagefs: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, the traceback only when asked for
        if verbose:
            log.exception("unexpected error")
        print(f"imagefs: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        logging.shutdown()
    return EXIT_USAGE
