"""Memory of the Ray worker processes on this machine, measured from outside them.

Used by the memory tests and benchmarks (``tests/test_driver_memory.py``,
``bench/stream.py``): every Ray worker process started since a given time is sampled, and
its peak **private** RSS (``RssAnon``) is kept under what it runs AT THAT SAMPLE (its process
title: ``ray::ShardServer.link`` -> ``ShardServer``, ``ray::MapWorker(MapBatches(Encode))``
-> ``MapWorker(MapBatches(Encode))``). Ray reuses a task worker for tasks of other kinds: the
worker that ran a file's read task goes on to run preprocess tasks, so filing its samples
under the first kind seen would charge the preprocessing's memory to the read. Not the total
RSS or VmHWM: those count the object store's shared pages a worker has read, which grow with
the data that passed through it whatever the worker keeps.
"""

from __future__ import annotations

import os
import time


def worker_kind(cmdline: list[str] | None) -> str | None:
    """What a Ray worker process runs, from its process title; None when idle or not Ray."""
    title = (cmdline or [""])[0]
    if not title.startswith("ray::") or title.startswith("ray::IDLE"):
        return None
    return title[5:].split(".")[0].split(" ")[0]


def private_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return None


def descends_from(process, root_pid: int) -> bool:
    """Whether a ``psutil.Process`` runs under ``root_pid``: a Ray worker of the instance that
    process started (its raylet is a child of it), not of another Ray on the machine."""
    import psutil

    try:
        return any(q.pid == root_pid for q in process.parents())
    except psutil.Error:
        return False


def ray_workers(kinds: tuple[str, ...] | None = None, root_pid: int | None = None) -> list:
    """The Ray worker processes running ``kinds`` (all busy ones if None) on this machine, as
    ``(psutil.Process, kind)``; with ``root_pid``, only those under it (:func:`descends_from`)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        kind = worker_kind(p.info["cmdline"])
        if kind is None or (kinds is not None and kind not in kinds):
            continue
        if root_pid is None or descends_from(p, root_pid):
            found.append((p, kind))
    return found


#: how often to sample: a read task of a small file runs for a few hundred ms; sampled every
#: 0.25 s, one such task went unseen in a run of the memory test
SAMPLE_EVERY_S = 0.05


class WorkerMemory:
    """Peak private RSS of the Ray workers started after ``since`` (default: now), by kind;
    with ``root_pid``, only of the processes descending from it (the Ray instance a driver
    started, not another one running on the machine)."""

    def __init__(self, since: float | None = None, root_pid: int | None = None):
        self.since = time.time() if since is None else since
        self.root_pid = root_pid
        self.peaks: dict[tuple[int, str], float] = {}  # (pid, kind) -> MB
        self.ours: set[int] = set()  # processes of this instance started since ``since``
        self.skip: set[int] = set()  # older processes, or another instance's

    def _classify(self, pid: int) -> bool:
        """Once per process: whether it is one to sample (started since ``since``, of this
        instance). A Ray worker starts as ``python default_worker.py`` and takes its ``ray::``
        title a moment later, so the title is read at every sample, the rest only here."""
        import psutil

        try:
            p = psutil.Process(pid)
            ours = p.create_time() >= self.since - 0.5 and (self.root_pid is None or descends_from(p, self.root_pid))
        except psutil.Error:
            return False
        (self.ours if ours else self.skip).add(pid)
        return ours

    def sample(self) -> None:
        """One pass over the machine's processes: cheap enough to run every 50 ms, which a
        short task (a small file's read) needs to be seen at all."""
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in self.skip:
                continue
            pid = int(name)
            if pid not in self.ours and not self._classify(pid):
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().split(b"\0", 1)[0].decode(errors="replace")
            except OSError:
                continue
            kind = worker_kind([title])
            if kind is None:  # idle (between tasks) or not a Ray worker
                continue
            mb = private_rss_mb(pid)
            if mb is not None:
                self.peaks[pid, kind] = max(self.peaks.get((pid, kind), 0.0), mb)

    def by_kind(self) -> dict[str, float]:
        """The largest peak of each kind of work, MB (over the workers that ran it)."""
        out: dict[str, float] = {}
        for (_, kind), mb in self.peaks.items():
            out[kind] = max(out.get(kind, 0.0), mb)
        return out
