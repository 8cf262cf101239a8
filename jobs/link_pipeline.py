"""The link job's pipeline (``otmel link``, steps 1-4 of jobs/link.py): read, preprocess and
encode on Ray Data, the index shard actors (``ShardServer``) and the link stage that scatters each
batch to them, merges the per-shard top-k and stages the rows; one attempt of it
(:func:`link_files`), which the driver restarts when it stalls (``PIPELINE_ATTEMPTS``)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from otmel.jobs.link_commit import report_commits
from otmel.linking.link_input import DEFAULT_CHUNK_ROWS, READ_CHUNK_BYTES

if TYPE_CHECKING:
    from otmel.jobs.link import LinkConfig

log = logging.getLogger(__name__)

#: CPUs of a preprocess task (distinct from the actors' so Ray Data does not fuse the two steps)
PREPROCESS_CPUS = 0.25


#: CPUs of a read task, distinct from PREPROCESS_CPUS: fused into the preprocess step, the
#: read would take a preprocess batch's worth of FILE PATHS per task (64 files read one
#: after the other by one task); unfused, every input file is a read task of its own
READ_CPUS = 0.2


class ShardServer:
    """One index shard behind a Ray actor: its files copied to local disk at start (features
    memory-mapped from there), FAISS in RAM (GPU when present), a matcher backend."""

    def __init__(self, index_uri: str, entry: dict, manifest: dict, model_uri: str, s3_endpoint: str | None = None,
                 threads: int = 1):
        from pathlib import Path

        from otmel.backend import load_backend
        from otmel.linking.entity_index import Shard
        from otmel.linking.linker import ShardLinker
        from otmel.io.storage import actor_scratch_key, download_dir, is_remote, join, scratch_dir

        uri = join(index_uri, entry["dir"])
        if is_remote(uri):  # to local disk once (features are memory-mapped), removed at exit
            self.local_dir = download_dir(uri, scratch_dir(f"otmel-{entry['name']}-", actor_scratch_key()),
                                          s3_endpoint)
        else:
            self.local_dir = Path(uri)
        shard = Shard(self.local_dir, entry, manifest, verify=True)
        # the matcher only (an ONNX export's encoder is not loaded; a checkpoint loads whole)
        backend = load_backend(model_uri, s3_endpoint, threads=threads, encoder=False)
        if backend.kind == "torch":  # torch is imported only for a checkpoint (ONNX shards run without it)
            import torch

            torch.set_num_threads(threads)
        self.linker = ShardLinker(shard, backend)
        self.name = entry["name"]
        self.queries = 0  # batches served (since this actor started: a restarted one counts anew)

    def ready(self) -> tuple[str, int]:
        return self.name, self.linker.shard.count

    def link(self, mentions: dict[str, np.ndarray], candidates: int, top_k: int):
        self.queries += 1
        return self.linker.link(mentions, candidates, top_k)

    def served(self) -> int:
        return self.queries


class ShardActors:
    """The job's index shard actors, ``--shard-replicas`` per shard (``actors[shard][replica]``;
    restarted on death, their calls retried), launched at the job's start and loading while
    the pipeline starts: the link stage needs only their handles, and at real model size an
    encode actor takes longer to load than a shard (ViT-B/32: ~20 s against ~7 s,
    bench/results/pipeline.md), so the job no longer waits for one before starting the other.
    :meth:`wait` turns a shard that could not load into the job's one-line error.

    With GPUs in the cluster each shard actor takes a share of one (``--shard-gpus``, default
    0.25: its FAISS index goes to the GPU when faiss-gpu is installed); without a GPU share Ray
    hides the devices from it.
    """

    def __init__(self, cfg: LinkConfig, manifest: dict, use_gpu: bool = False):
        import ray

        gpus = cfg.shard_gpus if cfg.shard_gpus is not None else (0.25 if use_gpu else 0)
        remote = ray.remote(ShardServer).options(num_cpus=0.25, num_gpus=gpus, max_restarts=-1, max_task_retries=3)
        self.started = time.perf_counter()
        self.replicas = cfg.shard_replicas
        self.actors = [[remote.remote(cfg.index, entry, manifest, cfg.model, cfg.s3_endpoint)
                        for _ in range(cfg.shard_replicas)] for entry in manifest["shards"]]
        self.ready_refs = [a.ready.remote() for replicas in self.actors for a in replicas]
        self.loaded_at: float | None = None  # time.perf_counter() when every actor had loaded

    def wait(self, timeout: float | None = None) -> bool:
        """True once every shard actor has loaded (logged once), False if some are still
        loading after ``timeout`` seconds; raises the one-line error of one that could not."""
        import ray

        if self.loaded_at is not None:
            return True
        done, pending = ray.wait(self.ready_refs, num_returns=len(self.ready_refs), timeout=timeout,
                                 fetch_local=False)
        try:
            loaded = ray.get(done)  # a failed load is done too: raise it now, not when all are done
        except ray.exceptions.ActorDiedError as exc:
            raise shard_load_error(exc) from None
        if pending:
            return False
        self.loaded_at = time.perf_counter()
        log.info("index shards loaded in %.1f s (%d replica(s) each): %s", self.loaded_at - self.started, self.replicas,
                 ", ".join(f"{n} ({c} entities)" for n, c in loaded[::self.replicas]))
        return True


def shard_load_error(exc: Exception) -> Exception:
    """A shard actor that could not load (a tampered or partial shard file, a modified model
    file, unreadable storage) as the one-line error of its cause; Ray keeps only the
    traceback's text of an actor's creation error."""
    import re

    from otmel.linking.entity_index import IndexFormatError

    found = re.findall(r"^\s*(?:[\w.]+\.)?(IndexFormatError|IntegrityError|StorageError|FileNotFoundError|OSError): (.+)$",
                       str(exc), flags=re.M) if getattr(exc, "actor_init_failed", False) else []
    if not found:
        return exc
    kind, message = found[-1]
    return IndexFormatError(f"an index shard actor could not start: {kind}: {message.strip()}")


def read_inputs(batch: dict[str, np.ndarray], s3_endpoint: str | None, detector, context_chars: int,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, chunk_bytes: int = READ_CHUNK_BYTES, **row_rules):
    """Input file paths -> mention rows, streamed in chunks (a file is never held whole).

    ``file_rows`` is -1 on every chunk but a file's last, which carries the file's total: the
    driver commits the file's output once its parts hold that many rows, in whatever order
    they came. Each chunk is in output order (input row, span start, mention id) and
    ``file_seq`` numbers a file's rows 0..N-1 in that order: Ray Data forms batches from
    blocks in arrival order (a batch may hold the end of one chunk and the start of an
    earlier one), so the link stage writes a batch's rows as runs of consecutive
    ``file_seq``, each a slice of the file's sorted output (:func:`consecutive_runs`).
    """
    from otmel.linking.link_output import sort_rows

    from otmel.linking.link_input import iter_mention_rows

    for path in batch["path"]:
        total, previous = 0, None
        for table in iter_mention_rows(str(path), s3_endpoint, detector, context_chars, chunk_rows, chunk_bytes,
                                       **row_rules):
            if table.num_rows == 0:
                continue
            table = sort_rows(table)
            table = table.append_column("file_seq", pa.array(np.arange(total, total + table.num_rows), pa.int64()))
            if previous is not None:
                yield previous.append_column("file_rows", pa.array([-1] * previous.num_rows, pa.int64()))
            total += table.num_rows
            previous = table
        if previous is not None:
            yield previous.append_column("file_rows", pa.array([total] * previous.num_rows, pa.int64()))


def preprocess_mentions(batch: dict, preprocessor, image_policy, bad_image: str, transform: str = "cpu") -> dict:
    from otmel.jobs.common import Preprocess

    out = Preprocess(preprocessor, "mention", image_policy, bad_image, transform)(batch)
    # the warning column as strings in every block ("" = none): a block whose column was all
    # null came through NumPy as float NaN, and Ray Data then could not put it in one batch
    # with a block holding a warning (float vs string); the link stage turns "" back into null
    out["warning"] = np.array([w if isinstance(w, str) else "" for w in out["warning"]], dtype=object)
    return out


def _int_or_none(v) -> int | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else int(f)


def consecutive_runs(rows: pa.Table) -> list[pa.Table]:
    """One input file's rows of a batch -> runs of consecutive ``file_seq``, in order. Each run
    is a slice of the file's sorted output, so staged parts never interleave and the commit
    can stream them one after the other."""
    seq = rows.column("file_seq").to_numpy()
    order = np.argsort(seq, kind="stable")
    rows, seq = rows.take(pa.array(order)), seq[order]
    bounds = [0, *(np.flatnonzero(np.diff(seq) != 1) + 1).tolist(), len(seq)]
    return [rows.slice(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]


class LinkStage:
    """One link-stage actor: a batch's features to one replica of every shard actor, the
    per-shard top-k merged, NIL decided, the rows written as staged parts (one per input
    file in the batch), each part reported to the commit coordinator at once; returns only
    the row count per input file."""

    def __init__(self, shard_actors: list[list], coordinator, candidates: int, top_k: int,
                 nil_threshold: float | None, model_version: str, index_version: str, output: str,
                 s3_endpoint: str | None):
        import random

        self.actors = shard_actors  # [shard][replica]
        self.coordinator = coordinator
        self.candidates = candidates
        self.top_k = top_k
        self.nil_threshold = nil_threshold
        self.model_version = model_version
        self.index_version = index_version
        self.output = output
        self.s3_endpoint = s3_endpoint
        self.turn = random.randrange(1 << 20)  # replicas in turn, from a different start per actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        from otmel.linking.link_output import write_part

        table = self.link_rows(batch)
        reports = []
        for f in dict.fromkeys(table.column("source_file").to_pylist()):  # files of this batch, in order
            for rows in consecutive_runs(table.filter(pc.equal(table.column("source_file"), f))):
                total = int(pc.max(rows.column("file_rows")).as_py())  # -1 unless the file's last chunk
                reports.append((f, total, write_part(rows, self.output, f, self.s3_endpoint)))
        ray.get(self.coordinator.add.remote(reports))  # before this batch counts as done
        return {"source_file": np.array([f for f, _, _ in reports], dtype=object),
                "rows": np.array([p["rows"] for _, _, p in reports], dtype=np.int64)}

    def link_rows(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The output rows of a batch (``PART_SCHEMA`` + ``source_file`` / ``file_rows`` / ``file_seq``)."""
        import ray

        from otmel.linking.linker import LINK_MENTION_FEATURES, merge_topk, nil_decision
        from otmel.data.schemas import CANDIDATE

        n = len(batch["mention_id"])
        preset = [str(p or "") for p in batch["preset"]]
        ok = np.asarray(batch["ok"], dtype=bool)
        linkable = np.array([ok[i] and preset[i] == "" for i in range(n)], dtype=bool)
        sel = np.flatnonzero(linkable)
        merged = None
        if len(sel):
            feats = {name: np.ascontiguousarray(np.asarray(batch[name])[sel]) for name in LINK_MENTION_FEATURES}
            ref = ray.put(feats)  # one copy in the object store, read by every shard
            replicas = [reps[(self.turn + i) % len(reps)] for i, reps in enumerate(self.actors)]
            self.turn += 1
            parts = ray.get([a.link.remote(ref, self.candidates, self.top_k) for a in replicas])
            merged = merge_topk(parts, self.top_k)
            linked = nil_decision(merged.scores[:, 0] if merged.scores.shape[1] else np.full(len(sel), -np.inf),
                                  self.nil_threshold)
        pos = {int(i): j for j, i in enumerate(sel)}
        status, entity, score, cands, error = [], [], [], [], []
        for i in range(n):
            if preset[i] == "no_mention":
                status.append("no_mention"); entity.append(None); score.append(None); cands.append(None); error.append(None)  # noqa: E702
            elif not linkable[i]:
                reason = batch["error"][i] if isinstance(batch["error"][i], str) and batch["error"][i] \
                    else "unusable: the row cannot be encoded"
                status.append("error"); entity.append(None); score.append(None); cands.append(None); error.append(str(reason))  # noqa: E702
            else:
                j = pos[i]
                row = [{"entity_id": e, "score": float(s)} for e, s in zip(merged.entity_ids[j], merged.scores[j])
                       if e is not None]
                top = row[0] if row else None
                is_linked = bool(linked[j])
                status.append("ok" if is_linked else "nil")
                entity.append(top["entity_id"] if (top and is_linked) else None)
                score.append(top["score"] if top else None)
                cands.append(row)
                error.append(None)
        # a null can reach here as float NaN (NumPy's form of a column of nulls): null, not "nan"
        text = lambda name: [None if v is None or (isinstance(v, float) and v != v) else str(v)  # noqa: E731
                             for v in batch[name]]
        # only strings are warnings: a column of nulls can come back from NumPy as NaN
        warning = [w if isinstance(w, str) and w and preset[i] != "no_mention" else None
                   for i, w in enumerate(batch["warning"])]
        return pa.table({
            "mention_id": pa.array(text("mention_id"), pa.string()),
            "post_id": pa.array(text("post_id"), pa.string()),
            "mention": pa.array(text("mention"), pa.string()),
            "start": pa.array([_int_or_none(v) for v in batch["start"]], pa.int32()),
            "end": pa.array([_int_or_none(v) for v in batch["end"]], pa.int32()),
            "entity_id": pa.array(entity, pa.string()),
            "score": pa.array(score, pa.float32()),
            "candidates": pa.array(cands, pa.list_(CANDIDATE)),
            "status": pa.array(status, pa.string()),
            "error": pa.array(error, pa.string()),
            "warning": pa.array(warning, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "index_version": pa.array([self.index_version] * n, pa.string()),
            "source_file": pa.array(text("source_file"), pa.string()),
            "source_row": pa.array([int(v) for v in batch["source_row"]], pa.int64()),
            "file_rows": pa.array([int(v) for v in batch["file_rows"]], pa.int64()),
            "file_seq": pa.array([int(v) for v in batch["file_seq"]], pa.int64()),
        })


def encoded_mentions(cfg: LinkConfig, files: list[str], preprocessor, detector, use_gpu: bool,
                     pool: str | None = None):
    """Steps 1-3 of the pipeline: read (one task per file) -> preprocess -> encode (actor pool:
    ``pool``, or ``--workers`` sized now)."""
    import ray.data

    from otmel.linking.image_fetch import ImagePolicy
    from otmel.jobs.common import encode_step, image_transform
    from otmel.linking.linker import LINK_MENTION_FEATURES

    transform = image_transform(cfg.image_transform, use_gpu)

    policy = ImagePolicy(allowed_prefixes=tuple(cfg.allow_image_prefix), allow_private_hosts=cfg.allow_private_hosts,
                         timeout_s=cfg.image_timeout_s, max_bytes=cfg.max_image_bytes, s3_endpoint=cfg.s3_endpoint)
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(read_inputs, batch_size=1, num_cpus=READ_CPUS,
                        fn_kwargs={"s3_endpoint": cfg.s3_endpoint, "detector": detector,
                                   "context_chars": cfg.context_chars, "chunk_rows": cfg.read_chunk_rows,
                                   "chunk_bytes": cfg.read_chunk_bytes, "require_text": cfg.require_text,
                                   "max_text_bytes": cfg.max_text_bytes, "truncate_text": cfg.truncate_text,
                                   "max_image_bytes": cfg.max_image_bytes})
    # preprocessing stays on CPU tasks, never fused into the encode actors (encode_step)
    ds = ds.map_batches(preprocess_mentions, batch_size=cfg.batch_size, num_cpus=PREPROCESS_CPUS,
                        fn_kwargs={"preprocessor": preprocessor, "image_policy": policy, "bad_image": cfg.bad_image,
                                   "transform": transform})
    return encode_step(ds, cfg, LINK_MENTION_FEATURES, use_gpu, transform, pool)


#: Pipeline attempts of one link job. On Ray 2.60 a pipeline can stop for good after a node is
#: lost: Ray core rebuilds the lost blocks itself (lineage reconstruction), restarting for that
#: the encode actors Ray Data had just removed from its pool, and those, unknown to Ray Data's
#: budget, hold the CPUs the re-run read and preprocess tasks they wait for need (seen on a
#: 3-node test cluster losing 2 nodes: 4 shard actors x 0.25, 3 encode actors x 0.25 and 2 link
#: actors x 0.1 CPU on the last 2 CPUs, 0.05 free, for 10 minutes; Ray's developers describe
#: that blind spot in ray-project/ray#65519). Ray Data's no-progress guard ends such an attempt
#: after ``--stall-timeout`` seconds in which no block moved; its actors go with it, which frees
#: their CPUs, and the job restarts the pipeline for the input files not committed yet, each
#: from its first row (committed files are never redone: the same check as a re-run's).
PIPELINE_ATTEMPTS = 3


def link_files(cfg: LinkConfig, files: list[str], pre: dict, backend, shards: ShardActors, coordinator,
                use_gpu: bool, encoders: str, progress=None) -> dict[str, dict]:
    """One pipeline attempt: ``files`` read, encoded and linked, each committed by
    ``coordinator`` as soon as its rows are in; returns every file's footer metadata. Raises
    Ray Data's ExecutionTimeoutError when no block moved for ``--stall-timeout`` seconds."""
    import ray
    from ray.data.exceptions import ExecutionTimeoutError

    from otmel.jobs.common import actor_pool
    from otmel.io.storage import StorageError, storage_failure

    ds = encoded_mentions(cfg, files, backend.preprocessor, pre["detector"], use_gpu, encoders)
    ds = ds.map_batches(LinkStage, batch_size=cfg.batch_size, compute=actor_pool(cfg.link_actors, "--link-actors"),
                        num_cpus=0.1,
                        fn_constructor_kwargs={"shard_actors": shards.actors, "coordinator": coordinator,
                                               "candidates": cfg.candidates,
                                               "top_k": cfg.top_k, "nil_threshold": pre["nil_threshold"],
                                               "model_version": backend.model_version,
                                               "index_version": pre["index_version"], "output": cfg.output,
                                               "s3_endpoint": cfg.s3_endpoint})
    # Ray Data's own guard: no block moved through any step for this long ends the attempt
    # with ExecutionTimeoutError (see PIPELINE_ATTEMPTS for why and what next)
    ds.context.execution_no_progress_timeout_s = cfg.stall_timeout_s or -1
    linked: Counter = Counter()  # rows per input file, from the dataset's output (a cross-check)

    stopped = threading.Event()

    def consume():
        for meta in ds.iter_batches(batch_size=None, batch_format="numpy"):  # row counts only
            for f, rows in zip(meta["source_file"], meta["rows"]):
                linked[str(f)] += int(rows)
            report_commits(ray.get(coordinator.committed.remote()), progress)
        if stopped.is_set():
            # cut short (an interrupt): the end of this iteration is not the end of the input,
            # and finish() would commit every file without rows so far as an EMPTY input
            raise RuntimeError("the link pipeline was stopped")
        finished = ray.get(coordinator.finish.remote(files))
        report_commits(ray.get(coordinator.committed.remote()), progress)
        return finished

    try:
        # the dataset runs in a thread while this one watches the shard actors load: one that
        # cannot fails the job at once, in one line, not when the first batch reaches it
        written, retried = while_loading(consume, shards, stop=lambda: (stopped.set(), stop_datasets()))
    except ExecutionTimeoutError:
        raise  # a stall: run() decides
    except Exception as exc:
        # storage that still fails after every retry ends the job in one line; the files
        # committed so far stay valid and the re-run resumes from them
        failure = storage_failure(exc)
        if failure is None:
            raise
        raise StorageError(f"storage failed after retries while linking into {cfg.output}: "
                           f"{type(failure).__name__}: {str(failure).strip().splitlines()[0]}") from None
    lost = {f: (linked[f], m["rows"]) for f, m in written.items() if m["rows"] != linked[f]}
    if lost:  # never: the coordinator committed what the link actors reported
        raise RuntimeError(f"committed row counts differ from the linked rows (linked, committed): {lost}")
    if retried:
        log.info("%d part(s) reported twice by retried link tasks were counted once", retried)
    return written


def stop_datasets() -> None:
    """End every Ray Data execution of this process now (the job's driver runs only its own):
    their tasks and actors stop, and an iteration over them in another thread ends. Ray 2.60
    has no public call for this; each execution is a ``StreamingExecutor`` thread with a
    ``shutdown(force)`` of its own, which Ray Data calls itself when a dataset is garbage
    collected. Without it, an interrupted job's pipeline outlived the job's end and Ray Data
    printed tracebacks after the CLI's last line."""

    for thread in threading.enumerate():
        if type(thread).__name__ == "StreamingExecutor" and hasattr(thread, "shutdown"):
            thread.shutdown(force=True)


#: how long an interrupted job waits for its pipeline thread to end after stopping its dataset
STOP_WAIT_S = 30.0


def while_loading(work, shards: ShardActors, stop=None):
    """``work()`` in a thread (its result, or its exception raised here) while this thread
    waits for the ``shards`` to load: a shard's load error is raised as soon as it happens.
    The job then ends with it; the dataset left running in the thread fails at its next link
    call (the shard actor is dead) or ends with the driver. When this thread is interrupted
    (SIGINT/SIGTERM: :class:`otmel.jobs.common.JobInterrupted`), ``stop()`` ends the work
    and the thread is given :data:`STOP_WAIT_S` to finish before the interrupt goes on."""

    box: dict = {}

    def target():
        try:
            box["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="otmel-link-pipeline", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            if shards.wait(timeout=0.5):  # loaded: only the pipeline is left to wait for
                break
        thread.join()
    except BaseException:
        if stop is not None:
            stop()
            thread.join(STOP_WAIT_S)
        raise
    if "error" in box:
        shards.wait(timeout=5)  # a pipeline failed by a shard that did not load: that shard's error
        raise box["error"]
    shards.wait()
    return box["result"]
