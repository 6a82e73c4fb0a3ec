"""Serve an ImageView at a mount point with pyfuse3 on trio, in the foreground.

`serve` mounts, calls `ready()` once the event loop is answering, and returns when the file system
is unmounted (by `imagefs umount`, `fusermount3 -u`, or SIGTERM/SIGINT, which unmount cleanly).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import pyfuse3
import trio

from imagefs.fuse.ops import ImageOperations
from imagefs.view import ImageView

log = logging.getLogger(__name__)

FSNAME = "imagefs"


def mount_options(fsname: str = FSNAME) -> set[str]:
    # ro: the kernel refuses writes before they reach us. allow_other: tasks run as any uid, and
    # default_permissions (in pyfuse3's defaults) makes the kernel enforce the image's mode bits.
    return set(pyfuse3.default_options) | {"ro", f"fsname={fsname}", "subtype=imagefs", "allow_other",
                                           "default_permissions"}


def serve(view: ImageView, mountpoint: str, *, ready: Callable[[], None] | None = None,
          debug: bool = False, background: Callable[[threading.Event], None] | None = None) -> None:
    """Serve until unmounted. *background(stop)* runs in a thread once the mount answers (the
    prefetcher); it is asked to stop, and given a moment to, when the mount ends."""
    ops = ImageOperations(view)
    options = mount_options()
    if debug:
        options.add("debug")
    pyfuse3.init(ops, mountpoint, options)
    stop = threading.Event()
    worker = None
    if background is not None:
        worker = threading.Thread(target=background, args=(stop,), name="imagefs-background", daemon=True)

    def announce() -> None:
        if worker is not None:
            worker.start()
        if ready is not None:
            ready()

    try:
        trio.run(_main, announce)
    except BaseException:
        log.exception("imagefs server failed")
        raise
    finally:
        stop.set()
        pyfuse3.close(unmount=True)
        if worker is not None and worker.is_alive():
            worker.join(10)  # a fetch in flight ends within the source's timeouts


async def _main(ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals)
        if ready is not None:
            # pyfuse3.main starts taking requests as soon as it runs; requests sent before that wait
            # in the kernel queue, so announcing readiness just before is safe.
            ready()
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


async def _signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return
