"""1. Cold start over the slow link: the pull half, and the whole start when `imagefs run` exists.

Per link rate and workload, each run from an empty store / empty directory, caches dropped:

    imagefs              pull REF; mount REF MNT; replay the workload's reads on MNT
    imagefs, index local mount + replay from a store that already holds the indexes (only the
                         lazy data reads cross the link)
    peer                 skopeo copy REF oci:DIR; umoci unpack; the same reads on the rootfs;
                         then crun run of the workload in that bundle (the cold-start peer)
    imagefs run          imagefs run REF -- CMD (when the command exists; else the row is pending)

When the CLI can publish indexes (`imagefs index --push`), a second phase publishes them once
(untimed) and measures pull + mount + reads and `imagefs run` again, now finding the indexes in
the registry instead of streaming the layers; the peer's samples are the first phase's. A third
phase records an access profile (one untimed `imagefs run` per workload on a store of its own),
publishes it with the indexes, and measures `imagefs run` once more: a fresh store now fetches
the profiled files at mount time, all at once. A fourth phase runs the image with its layers
rewritten as eStargz (no index at all: each layer's own TOC), plain and with the recorded profile
as prioritized files. The start rows of the last phases are also set against the floor (floor as
the peer: the ratio is how many floors the start took). When the CLI has `imagefs agent`, the
published-index, index+profile and eStargz-with-prioritized-files starts are measured a second
time through an agent started on the fresh store before the caches are dropped: a resident agent,
as a Mesos agent is, whose own start is no part of a task's (rows "through a resident `imagefs
agent`").

Bytes are what the proxy carried from the registry to the client. The floor is computed, not
measured: the bytes of the files the task reads, scaled by their layer's compression, plus the
manifest and config, over the link rate, plus four round trips (connect, manifest, config, data).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time

from bench.context import Context
from bench.index_bench import _where
from bench.link import rate_bits
from bench.peers import Crun, crun_config, missing_tools, skopeo_copy, umoci_unpack
from bench.results import Row
from bench.system import Imagefs, has_agent, has_imagefs_run, has_index_push, mount_prefetch_default
from bench.workload import Trace, Workload

log = logging.getLogger("bench")

PENDING_RUN = "pending: needs imagefs run"
FLOOR_RTTS = 4


def floor(ctx: Context, trace: Trace, rate: str | None) -> tuple[float, float]:
    """(seconds, bytes) a perfect lazy start needs over the link: see the module docstring."""
    image = ctx.image()
    by_layer = trace.read_bytes_by_layer(ctx.cache, image)
    data = sum(n * layer.size / layer.tar_size for n, layer in zip(by_layer, image.layers))
    data += 4096  # manifest and config, about
    bits = rate_bits(rate)
    seconds = (data * 8 / bits if bits else 0.0) + FLOOR_RTTS * ctx.mode.rtt
    return seconds, data


def run(ctx: Context) -> None:
    missing = missing_tools("skopeo", "umoci", "crun")
    if missing:
        ctx.note("cold", f"not installed: {', '.join(missing)}; cold-start rows skipped.")
        return
    image = ctx.image()
    link = ctx.get_link()
    ctx.pushed(image.tag)
    merged = ctx.cache.merged(image)
    can_run, can_publish = has_imagefs_run(), has_index_push()
    crun = Crun(ctx.workdir / "crun-state")

    # A store with the indexes only, copied for each "index local" sample.
    template = ctx.fresh_imagefs("template")
    link.set_rate(None)
    template("pull", link.ref(image.tag))

    peers: dict[tuple[str | None, str], dict] = {}
    for published in (False, True) if can_publish else (False,):
        if published:  # once, untimed: from now on pulls find the indexes in the registry
            link.set_rate(None)
            ctx.fresh_imagefs("publish")("index", "--push", link.ref(image.tag))
        for rate in ctx.mode.rates:
            link.set_rate(rate)
            for workload in ctx.workloads():
                trace = Trace.load_or_make(ctx.cache, image, merged, workload)
                if not published:
                    peers[(rate, workload.name)] = _phase_unpublished(ctx, crun, template, image.tag, trace,
                                                                      workload, rate, can_run)
                else:
                    _phase_published(ctx, image.tag, trace, workload, rate, can_run, peers[(rate, workload.name)])
    profiles: dict[str, list[str]] = {}  # per workload: the access profile recorded below
    if can_publish and can_run:
        for workload in ctx.workloads():
            # A repository of its own per workload: a profile is published per image repository,
            # and each workload's start should be led by its own.
            repo = f"{image.tag}-profiled-{workload.name}"
            link.set_rate(None)
            link.push(ctx.cache.layout, image.tag, repo=repo)
            recorder = ctx.fresh_imagefs("record")  # untimed: one run records, its store publishes
            recorder("run", "--network", "none", link.ref(repo), "--", *workload.argv)
            ctx.unmount_below(recorder.store.parent)  # the shared mount goes: its profile is written
            recorder("index", "--push", link.ref(repo))
            profiles[workload.name] = _recorded_profile(recorder)
            ctx.discard(recorder.store.parent)
            trace = Trace.load_or_make(ctx.cache, image, merged, workload)
            for rate in ctx.mode.rates:
                link.set_rate(rate)
                _phase_profile(ctx, repo, image.tag, trace, workload, rate, peers[(rate, workload.name)])
    if can_run:
        _phases_estargz(ctx, image, merged, profiles, peers)
    files = {w.name: len(Trace.load_or_make(ctx.cache, image, merged, w).files()) for w in ctx.workloads()}
    ctx.note("cold", "Reads: the workload was traced once with `strace -f -e trace=%file` in a chroot of the "
                     "unpacked image; every file it opened is read whole, every path it looked up is stat'ed "
                     f"(files read: {', '.join(f'{k} {v}' for k, v in files.items())}).")
    ctx.note("cold", "Without a published index `imagefs pull` downloads each layer whole to index it and then "
                     "drops it, so the reads fetch their chunks again; the 'indexes already local' rows show the "
                     "lazy part alone" + (", and the 'index published' rows a pull that finds the indexes in the "
                                          "registry (published once, untimed, by `imagefs index --push`)."
                                          if can_publish else "."))
    prefetch = mount_prefetch_default()
    if can_publish and prefetch not in (None, "none"):
        ctx.note("cold", f"`imagefs mount` prefetches by default (`--prefetch={prefetch}`): the rest of the image "
                         "is fetched in the background, so the bytes counted (until the reads are done and the "
                         "mount is gone) include whatever that fetched by then; the `--prefetch=none` rows show "
                         "the reads' own cost.")
    ctx.note("cold", f"Floor: the bytes of the files read, times their layer's gzip ratio, plus ~4 KB of "
                     f"manifest and config, over the link rate, plus {FLOOR_RTTS} round trips.")


PEER = "skopeo copy + umoci unpack + reads"
AGENT = "through a resident `imagefs agent`"
START_PEER = "skopeo copy + umoci unpack + crun run"


def _phase_unpublished(ctx: Context, crun: Crun, template: Imagefs, tag: str, trace: Trace, workload: Workload,
                       rate: str | None, can_run: bool) -> dict:
    where = _where(ctx, rate)
    s: dict[str, list[float]] = {k: [] for k in ("ifs_t", "ifs_b", "lazy_t", "lazy_b", "peer_t", "peer_b",
                                                 "start_t", "run_t", "run_b")}
    for i in range(ctx.mode.runs):
        _imagefs_pull_half(ctx, tag, trace, s)
        _imagefs_lazy(ctx, template, tag, trace, s)
        _peer(ctx, crun, tag, trace, workload, s)
        if can_run:
            _imagefs_run(ctx, tag, workload, s)
        log.info("cold %s %s run %d: imagefs %.2f s %.1f MB; index local %.2f s %.1f MB; "
                 "skopeo+umoci %.2f s %.1f MB; +crun %.2f s", where, workload.name, i + 1,
                 s["ifs_t"][-1], s["ifs_b"][-1] / 1e6, s["lazy_t"][-1], s["lazy_b"][-1] / 1e6,
                 s["peer_t"][-1], s["peer_b"][-1] / 1e6, s["start_t"][-1])
    f_seconds, f_bytes = floor(ctx, trace, rate)
    what = f"`{workload.label}` on `{tag}`, {where}"
    for subject, t, b in (("imagefs pull + mount + reads", "ifs_t", "ifs_b"),
                          ("imagefs mount + reads, indexes already local", "lazy_t", "lazy_b")):
        ctx.add(Row("cold", f"{what}: time", subject, s[t], PEER, s["peer_t"]))
        ctx.add(Row("cold", f"{what}: bytes transferred", subject, s[b], PEER, s["peer_b"], unit="B"))
    ctx.add(Row("cold", f"{what}: time", "floor (computed)", [f_seconds], PEER, s["peer_t"], note="not measured"))
    ctx.add(Row("cold", f"{what}: bytes transferred", "floor (computed)", [f_bytes], PEER, s["peer_b"],
                unit="B", note="not measured"))
    start_what = f"cold start to task exit: {what}"
    if can_run:
        ctx.add(Row("launch", f"{start_what}: time", "imagefs run", s["run_t"], START_PEER, s["start_t"]))
        ctx.add(Row("launch", f"{start_what}: bytes transferred", "imagefs run", s["run_b"], START_PEER,
                    s["peer_b"], unit="B"))
    else:
        ctx.add(Row("launch", f"{start_what}: time", "imagefs run", [], START_PEER, s["start_t"], pending=PENDING_RUN))
    ctx.add(Row("launch", f"{start_what}: time", "floor (computed)", [f_seconds], START_PEER, s["start_t"],
                note="not measured; the task's own run time not included"))
    return s


def _phase_published(ctx: Context, tag: str, trace: Trace, workload: Workload, rate: str | None, can_run: bool,
                     peer: dict) -> None:
    where = _where(ctx, rate)
    s: dict[str, list[float]] = {k: [] for k in ("ifs_t", "ifs_b", "none_t", "none_b", "run_t", "run_b")}
    no_prefetch = mount_prefetch_default() not in (None, "none")
    can_agent = has_agent()
    for i in range(ctx.mode.runs):
        _imagefs_pull_half(ctx, tag, trace, s)
        if no_prefetch:
            _imagefs_pull_half(ctx, tag, trace, s, "--prefetch=none", keys=("none_t", "none_b"))
        if can_run:
            _imagefs_run(ctx, tag, workload, s)
            if can_agent:
                _imagefs_run(ctx, tag, workload, s, agent=True)
        log.info("cold %s %s, index published, run %d: imagefs %.2f s %.1f MB", where, workload.name, i + 1,
                 s["ifs_t"][-1], s["ifs_b"][-1] / 1e6)
    what = f"`{workload.label}` on `{tag}`, {where}"
    subject = "imagefs pull + mount + reads, index published"
    ctx.add(Row("cold", f"{what}: time", subject, s["ifs_t"], PEER, peer["peer_t"]))
    ctx.add(Row("cold", f"{what}: bytes transferred", subject, s["ifs_b"], PEER, peer["peer_b"], unit="B"))
    if no_prefetch:
        subject = "imagefs pull + mount --prefetch=none + reads, index published"
        ctx.add(Row("cold", f"{what}: time", subject, s["none_t"], PEER, peer["peer_t"]))
        ctx.add(Row("cold", f"{what}: bytes transferred", subject, s["none_b"], PEER, peer["peer_b"], unit="B"))
    if can_run:
        _start_rows(ctx, trace, rate, what, "imagefs run, index published", s, peer)
    if can_run and can_agent:
        _start_rows(ctx, trace, rate, what, f"imagefs run, index published, {AGENT}", s, peer, agent=True)


def _phase_profile(ctx: Context, repo: str, tag: str, trace: Trace, workload: Workload, rate: str | None,
                   peer: dict) -> None:
    where = _where(ctx, rate)
    s: dict[str, list[float]] = {"run_t": [], "run_b": []}
    for i in range(ctx.mode.runs):
        _imagefs_run(ctx, repo, workload, s)
        if has_agent():
            _imagefs_run(ctx, repo, workload, s, agent=True)
        log.info("cold %s %s, index and profile published, run %d: imagefs run %.2f s %.1f MB", where,
                 workload.name, i + 1, s["run_t"][-1], s["run_b"][-1] / 1e6)
    what = f"`{workload.label}` on `{tag}`, {where}"
    _start_rows(ctx, trace, rate, what, "imagefs run, index and profile published", s, peer)
    if has_agent():
        _start_rows(ctx, trace, rate, what, f"imagefs run, index and profile published, {AGENT}", s, peer,
                    agent=True)


def _recorded_profile(recorder: Imagefs) -> list[str]:
    from stores.store import Store

    store = Store(recorder.store)
    return next((p for i in store.image_ids() if (p := store.read_profile(i))), [])


def _phases_estargz(ctx: Context, image, merged, profiles: dict[str, list[str]], peers: dict) -> None:
    """4. The same image with its layers rewritten as eStargz (imagefs/estargz_writer.py): read
    through each layer's own TOC, no index anywhere; then with the workload's recorded profile as
    the layers' prioritized files (eStargz's own way to carry a profile)."""
    link = ctx.get_link()
    plain = ctx.cache.estargz(image, f"{image.tag}-estargz")
    link.set_rate(None)
    link.push(ctx.cache.layout, plain.tag)
    grown = plain.compressed_size / image.compressed_size
    for workload in ctx.workloads():
        trace = Trace.load_or_make(ctx.cache, image, merged, workload)
        variants = [(plain.tag, "imagefs run, eStargz layers")]
        if profiles.get(workload.name):
            tag = f"{image.tag}-estargz-{workload.name}"
            ctx.cache.estargz(image, tag, profiles[workload.name])
            link.set_rate(None)
            link.push(ctx.cache.layout, tag)
            variants.append((tag, "imagefs run, eStargz layers with prioritized files"))
        for tag, subject in variants:
            for rate in ctx.mode.rates:
                link.set_rate(rate)
                s: dict[str, list[float]] = {"run_t": [], "run_b": []}
                with_agent = has_agent() and tag != plain.tag   # the agent's rows: prioritized files
                for i in range(ctx.mode.runs):
                    _imagefs_run(ctx, tag, workload, s)
                    if with_agent:
                        _imagefs_run(ctx, tag, workload, s, agent=True)
                    log.info("cold %s %s, %s, run %d: %.2f s %.1f MB", _where(ctx, rate), workload.name, subject,
                             i + 1, s["run_t"][-1], s["run_b"][-1] / 1e6)
                what = f"`{workload.label}` on `{image.tag}`, {_where(ctx, rate)}"
                _start_rows(ctx, trace, rate, what, subject, s, peers[(rate, workload.name)])
                if with_agent:
                    _start_rows(ctx, trace, rate, what, f"{subject}, {AGENT}", s, peers[(rate, workload.name)],
                                agent=True)
    ctx.note("cold", f"eStargz rows: the image's layers rewritten by imagefs/estargz_writer.py (chunks of 4 MiB, "
                     f"{grown:.3f}x the gzip layers' size); the peer is still skopeo+umoci+crun on the plain gzip "
                     "image. 'with prioritized files': the workload's recorded profile put first in each layer, "
                     "before a .prefetch.landmark; a pull takes those files as the image's profile.")


def _start_rows(ctx: Context, trace: Trace, rate: str | None, what: str, subject: str, s: dict,
                peer: dict, *, agent: bool = False) -> None:
    t, b = ("agent_t", "agent_b") if agent else ("run_t", "run_b")
    start_what = f"cold start to task exit: {what}"
    ctx.add(Row("launch", f"{start_what}: time", subject, s[t], START_PEER, peer["start_t"]))
    ctx.add(Row("launch", f"{start_what}: bytes transferred", subject, s[b], START_PEER, peer["peer_b"],
                unit="B"))
    f_seconds, f_bytes = floor(ctx, trace, rate)
    ctx.add(Row("launch", f"{start_what}: time", subject, s[t], "floor (computed)", [f_seconds],
                note="the floor leaves out the task's own run time"))
    ctx.add(Row("launch", f"{start_what}: bytes transferred", subject, s[b], "floor (computed)", [f_bytes],
                unit="B"))


def _counted(ctx: Context, fn) -> tuple[float, int]:
    link = ctx.get_link()
    ctx.cold()
    before = link.counters()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return elapsed, (link.counters() - before).down


def _imagefs_pull_half(ctx: Context, tag: str, trace: Trace, s: dict, *mount_options: str,
                       keys: tuple[str, str] = ("ifs_t", "ifs_b")) -> None:
    link = ctx.get_link()
    cli = ctx.fresh_imagefs("cold-imagefs")
    mp = cli.store.parent / "mnt"

    def go() -> None:
        cli("pull", link.ref(tag))
        ctx.mounts.imagefs(cli, link.ref(tag), mp, *mount_options)
        trace.replay(mp)
    try:
        t, b = _counted(ctx, go)
    finally:
        if mp.exists():
            ctx.mounts.umount(mp)
    s[keys[0]].append(t)
    s[keys[1]].append(b)
    ctx.discard(cli.store.parent)


def _imagefs_lazy(ctx: Context, template: Imagefs, tag: str, trace: Trace, s: dict) -> None:
    link = ctx.get_link()
    cli = ctx.fresh_imagefs("cold-lazy")
    shutil.copytree(template.store, cli.store, ignore=shutil.ignore_patterns("chunks", "tmp", "locks"))
    mp = cli.store.parent / "mnt"

    def go() -> None:
        ctx.mounts.imagefs(cli, link.ref(tag), mp)
        trace.replay(mp)
    try:
        t, b = _counted(ctx, go)
    finally:
        if mp.exists():
            ctx.mounts.umount(mp)
    s["lazy_t"].append(t)
    s["lazy_b"].append(b)
    ctx.discard(cli.store.parent)


def _peer(ctx: Context, crun: Crun, tag: str, trace: Trace, workload: Workload, s: dict) -> None:
    link = ctx.get_link()
    d = ctx.fresh_dir("cold-peer")
    marks: dict[str, float] = {}

    def go() -> None:
        skopeo_copy(link.ref(tag), d / "oci")
        umoci_unpack(d / "oci", d / "bundle")
        marks["unpacked"] = time.perf_counter()
        trace.replay(d / "bundle" / "rootfs")
        marks["read"] = time.perf_counter()
    t, b = _counted(ctx, go)
    crun_config(d / "bundle", list(workload.argv))
    start = time.perf_counter()
    crun.run(d / "bundle")
    crun_t = time.perf_counter() - start
    s["peer_t"].append(t)
    s["peer_b"].append(b)
    s["start_t"].append(t - (marks["read"] - marks["unpacked"]) + crun_t)
    ctx.discard(d)


def _imagefs_run(ctx: Context, tag: str, workload: Workload, s: dict, *, agent: bool = False) -> None:
    """One cold `imagefs run`; with *agent*, through an `imagefs agent` started (untimed, as a
    resident agent is) on the fresh store before the caches are dropped."""
    link = ctx.get_link()
    cli = ctx.fresh_imagefs("cold-run")
    with cli.agent() if agent else contextlib.nullcontext():
        t, b = _counted(ctx, lambda: cli("run", "--network", "none", link.ref(tag), "--", *workload.argv))
    keys = ("agent_t", "agent_b") if agent else ("run_t", "run_b")
    s.setdefault(keys[0], []).append(t)
    s.setdefault(keys[1], []).append(b)
    ctx.unmount_below(cli.store.parent)  # whatever shared mount `imagefs run` left behind
    ctx.discard(cli.store.parent)

