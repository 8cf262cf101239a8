"""The link job's commit protocol (step 5 of jobs/link.py): link actors stage each batch's rows
as parts (``otmel.linking.link_output.write_part``) and report them to the job's
``CommitCoordinator``, which counts every input file's rows and, the moment they add up,
starts the commit task that turns the file's parts into its one output file, atomically; a
part reported twice (a retried batch) counts once. ``_SUCCESS.json`` is written by the driver
last (jobs/link.py)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otmel.jobs.link import LinkConfig

log = logging.getLogger(__name__)

class CommitTracker:
    """Per input file, its parts' metadata and row count; commits a file (a Ray task) as soon
    as its rows add up. Holds metadata only, never rows. Lives in :class:`CommitCoordinator`.

    A part reported twice (a link task retried after its actor died: the same batch, the same
    rows, a new part file) is counted once: parts are slices of one sorted stream, so two
    parts with the same first and last sort key and row count hold the same rows; any other
    overlap is an error (rows would be duplicated)."""

    def __init__(self, cfg: "LinkConfig", file_meta: dict[str, dict], vectors=None, coherence: dict | None = None):
        import ray

        from otmel.linking.link_output import commit_output_file

        self.cfg = cfg
        self.file_meta = file_meta
        self.vectors = vectors  # ObjectRef of the KGE EntityVectors (None: no coherence)
        self.coherence = coherence
        self.parts: dict[str, dict[tuple, dict]] = {}  # file -> (first, last, rows) -> part
        self.have: Counter = Counter()
        self.total: dict[str, int] = {}
        self.pending: dict = {}  # commit ObjectRef -> input file
        self.written: dict[str, dict] = {}
        self.retried_parts = 0
        self.commit = ray.remote(commit_output_file).options(num_cpus=0.1, max_retries=3)

    def add(self, source_file: str, file_rows: int, part: dict) -> None:
        f = source_file
        if f in self.written or f in self.pending.values():
            self.retried_parts += 1  # a retried batch of a file already committed (its part is staging garbage)
            return
        key = (json.dumps(part["first_key"]), json.dumps(part["last_key"]), part["rows"])
        parts = self.parts.setdefault(f, {})
        if key in parts:
            self.retried_parts += 1
            return
        parts[key] = part
        self.have[f] += part["rows"]
        if file_rows >= 0:
            self.total[f] = file_rows
        if f in self.total and self.have[f] > self.total[f]:
            raise RuntimeError(f"{f}: {self.have[f]} output rows for {self.total[f]} input rows: rows duplicated")
        if self.have[f] == self.total.get(f):
            self._start(f)

    def _start(self, f: str) -> None:
        parts = list(self.parts.pop(f, {}).values())
        ref = self.commit.remote(parts, self.cfg.output, f, self.file_meta[f], self.cfg.s3_endpoint, self.vectors,
                                 self.coherence)
        self.pending[ref] = f

    def poll(self, timeout: float = 0) -> None:
        """Record the commits that have finished (a failed commit raises here)."""
        import ray

        if not self.pending:
            return
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in done:
            f = self.pending.pop(ref)
            self.written[f] = ray.get(ref)

    def finish(self, todo: list[str]) -> dict[str, dict]:
        """After the last batch: empty inputs get an empty output; every file must be complete."""
        for f in todo:
            if f not in self.total and f not in self.parts:  # no row at all: an empty input file
                self.total[f] = 0
                self._start(f)
        incomplete = sorted(self.parts)
        if incomplete:
            raise RuntimeError(f"rows of {len(incomplete)} input file(s) never completed: "
                               + ", ".join(f"{f} ({self.have[f]} of {self.total.get(f, '?')})" for f in incomplete[:3]))
        while self.pending:
            self.poll(timeout=5)
        return self.written


class CommitCoordinator:
    """The job's commit decisions, as a small actor on the driver's node: link actors report
    each part to it the moment the part is written (Ray Data hands a map task's outputs on
    only when the task ends, often many batches and several input files later, so counting
    from the dataset's output would commit files long after their rows are done). A commit
    failure is kept and raised to the driver, not to the link actor that happened to report."""

    def __init__(self, cfg: "LinkConfig", file_meta: dict[str, dict], vectors=None, coherence: dict | None = None):
        self.tracker = CommitTracker(cfg, file_meta, vectors, coherence)
        self.failure: BaseException | None = None
        self.announced: set[str] = set()

    def add(self, reports: list[tuple[str, int, dict]]) -> None:
        for f, file_rows, part in reports:
            self.tracker.add(f, file_rows, part)
        self._poll()

    def _poll(self) -> None:
        if self.failure is None:
            try:
                self.tracker.poll()
            except Exception as exc:  # noqa: BLE001 - kept for the driver
                self.failure = exc

    def committed(self) -> list[tuple[str, int]]:
        """Files committed since the last call, with their rows (raises a commit's failure)."""
        self._poll()
        if self.failure is not None:
            raise self.failure
        new = [(f, m["rows"]) for f, m in self.tracker.written.items() if f not in self.announced]
        self.announced.update(f for f, _ in new)
        return new

    def drain(self, timeout: float) -> list[str]:
        """The job was interrupted: wait up to ``timeout`` s for the commits in flight (each is
        whole or nothing: written aside, then moved into place), then return the files this
        coordinator committed."""
        try:
            self.tracker.poll(timeout)
        except Exception as exc:  # noqa: BLE001 - a failed commit is simply not committed
            self.failure = exc
        return list(self.tracker.written)

    def finish(self, todo: list[str]) -> tuple[dict[str, dict], int]:
        """Waits for the last commits; returns every file's footer metadata and the number of
        parts reported twice."""
        if self.failure is not None:
            raise self.failure
        return self.tracker.finish(todo), self.tracker.retried_parts


def start_commit_coordinator(cfg: "LinkConfig", file_meta: dict[str, dict], vectors=None,
                             coherence: dict | None = None, nil_threshold: float | None = None):
    """The coordinator actor, pinned to this (the driver's) node: it lives and dies with the
    driver (no restart: its counts would be lost; the re-run resumes from the committed files).
    With coherence, its commit tasks re-score each file's rows with the KGE ``vectors``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    settings = None if coherence is None else {"weight": coherence["weight"], "nil_threshold": nil_threshold}
    return ray.remote(CommitCoordinator).options(num_cpus=0, scheduling_strategy=here).remote(
        cfg, file_meta, vectors, settings)


def end_attempt(coordinator, timeout: float = 60) -> None:
    """Kill a stalled attempt's commit coordinator and wait until it is dead: its commit tasks
    in flight die with it (Ray kills the tasks of a dead owner), so none of them can finish a
    file, or delete the file's staging dir, while the next attempt stages that file's parts."""
    import ray

    ray.kill(coordinator, no_restart=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(coordinator.__ray_ready__.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)


def report_commits(committed: list[tuple[str, int]], progress) -> None:
    for f, rows in committed:
        log.info("committed %s (%d rows)", f, rows)
        if progress:
            progress(f"committed {f} ({rows} rows)")


def _vectors_and_summary(uri: str, s3_endpoint: str | None):
    from otmel.linking.coherence import load_entity_vectors

    vectors = load_entity_vectors(uri, s3_endpoint)
    return vectors, {"entities": len(vectors), "dim": int(vectors.vectors.shape[1]), "version": vectors.version}


def load_coherence_vectors(coherence: dict | None, s3_endpoint: str | None):
    """The KGE vectors read by a task into the object store (the driver never holds them;
    commit tasks on every node read them without a copy); None without coherence. Fails
    the job here, in one line, on an unusable file or one changed since it was planned."""
    if coherence is None:
        return None
    import ray

    from otmel.linking.coherence import EmbeddingsError

    vectors, summary = ray.remote(_vectors_and_summary).options(num_cpus=0.1, num_returns=2).remote(
        coherence["embeddings"], s3_endpoint)
    try:
        info = ray.get(summary)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc
        raise EmbeddingsError(str(cause).strip().splitlines()[-1]) from None
    if info["version"] != coherence["version"]:
        raise EmbeddingsError(f"{coherence['embeddings']} changed while the job started (version {coherence['version']} "
                              f"-> {info['version']})")
    coherence.update(entities=info["entities"], dim=info["dim"])
    log.info("coherence: %d KGE entity vectors (dim %d) from %s, weight %s", info["entities"], info["dim"],
             coherence["embeddings"], coherence["weight"])
    return vectors
