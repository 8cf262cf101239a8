"""Bulk entity linking on Ray Data (``otmel link``).

    otmel link --model MODEL_URI --index INDEX_URI --input INPUT_URI --output OUTPUT_URI
               [--top-k k] [--candidates K] [--nil-threshold T] [--workers auto|N|MIN-MAX]
               [--link-actors N|MIN-MAX] [--shard-replicas R] [--batch-size B]
               [--detect-mentions alias] [--address ADDR]

Pipeline (DESIGN.md "Data flow"); no row passes through the driver:

1. read: one task per input file (``otmel.linking.link_input``), streamed in chunks of
   ``read_chunk_rows`` rows or ``read_chunk_bytes`` of input, whichever is less (Parquet by
   row-group batches, JSONL line by line): posts are exploded
   into one row per mention (given spans, or alias detection), bad rows become ``error`` rows,
   nothing dropped;
2. preprocess (CPU tasks): tokenise, fetch (``image_uri``) and decode/resize images;
3. encode (actor pool of ``--workers`` actors: auto, one per GPU or one single-thread actor
   per CPU; N; or MIN-MAX autoscaling): mention features + stage-1 queries;
4. link (a pool of ``--link-actors`` light actors, one batch in flight each, so several
   batches are always queued at the shard actors): a batch's features are put in the object
   store once and sent to one replica of every index shard (``ShardServer``: its FAISS
   shard, memory-mapped features and the matcher; ``--shard-replicas`` actors per shard,
   taken in turn; restarted by Ray if one dies, its calls retried; they load while steps
   1-3 start, and one that cannot fails the job at once), which retrieves K and
   reranks them with the full S_O; the per-shard top-k are merged into the global top-k,
   NIL decided; the link actor writes the batch's rows of each input file as a staged part
   (``otmel.linking.link_output``) and reports the part's metadata (no rows) to the commit
   coordinator right away;
5. commit: the coordinator (a small actor on the driver's node, ``CommitCoordinator``)
   counts each input file's rows and, the moment they add up, starts a commit task that
   turns the file's parts into its one output file, atomically (a driver killed mid-job
   keeps every file committed so far; a re-run skips them and restages the rest). The
   driver cross-checks the committed row counts against the rows the dataset says were
   linked; ``_SUCCESS.json`` last.

Job-level problems (no input files, index/model mismatch, unreadable model) fail before any
work, in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from otmel.linking.link_input import DEFAULT_CHUNK_ROWS, READ_CHUNK_BYTES

log = logging.getLogger(__name__)

#: CPUs of a preprocess task (distinct from the actors' so Ray Data does not fuse the two steps)
PREPROCESS_CPUS = 0.25
#: CPUs of a read task, distinct from PREPROCESS_CPUS: fused into the preprocess step, the
#: read would take a preprocess batch's worth of FILE PATHS per task (64 files read one
#: after the other by one task); unfused, every input file is a read task of its own
READ_CPUS = 0.2


@dataclass
class LinkConfig:
    """One link job; flat and serialisable."""

    model: str  # ONNX export dir or checkpoint dir (local or s3://)
    index: str  # index dir (local or s3://) built with the same model
    input: str  # Parquet/JSONL file, directory or glob (local or s3://)
    output: str  # output dir (local or s3://)
    top_k: int = 5  # candidates written per mention
    candidates: int = 20  # K retrieved per shard before reranking
    nil_threshold: float | None = None  # None = the calibrated value in export.json / the checkpoint
    workers: int | str = "auto"  # encode actors: auto (a GPU each, or one 1-thread actor per CPU), N, or MIN-MAX
    link_actors: int | str = 2  # link-stage actors (batches in flight at the shard actors): N or MIN-MAX
    shard_replicas: int = 1  # actors per index shard, each with its own copy (queries spread over them)
    shard_gpus: float | None = None  # GPU share of a shard actor (None: 0.25 on a GPU cluster, else 0)
    batch_size: int = 64
    read_chunk_rows: int = DEFAULT_CHUNK_ROWS  # input rows read at a time (a file is streamed, never held whole)
    read_chunk_bytes: int = READ_CHUNK_BYTES  # ... and at most about this much input (rows with inline images)
    detect_mentions: str | None = None  # None | "alias": find mentions in posts without spans
    context_chars: int = 200  # context window around a span (posts)
    min_alias_length: int = 3  # mention detection filters
    max_alias_entities: int = 20
    bad_image: str = "error"  # error | text: what a given-but-unusable image does to its row
    image_transform: str = "auto"  # cpu | device (resize/normalise on the encoder's GPU) | auto: device with GPUs
    allow_image_prefix: list[str] = field(default_factory=list)  # local image_uri roots allowed
    allow_private_hosts: bool = False  # http(s) image_uri on private/loopback/link-local hosts
    image_timeout_s: float = 10.0
    max_image_bytes: int = 20 * 1024 * 1024
    kge_embeddings: str | None = None  # entity_id + vector Parquet (`otmel kge embed`): collective disambiguation
    coherence_weight: float | None = None  # W of otmel.linking.coherence (None = the weight calibrated for these embeddings)
    force: bool = False  # recompute inputs whose output is already complete
    stall_timeout_s: float = 600.0  # no block moved for this long: the pipeline is restarted (see run); 0 = never
    cpus_per_actor: float = 0.25  # Ray CPUs an encode actor holds (fractional: read tasks must still get CPUs)
    gpu: bool | None = None  # None = a GPU per encode actor when the cluster has one
    address: str | None = None
    s3_endpoint: str | None = None

    def __post_init__(self):
        if self.top_k < 1 or self.candidates < 1:
            raise ValueError("--top-k and --candidates must be >= 1")
        if self.top_k > self.candidates:
            raise ValueError(f"--top-k {self.top_k} > --candidates {self.candidates}: the top-k is taken from the K reranked")
        if self.detect_mentions not in (None, "alias"):
            raise ValueError(f"--detect-mentions must be alias, got {self.detect_mentions!r}")
        if self.bad_image not in ("error", "text"):
            raise ValueError(f"--bad-image must be error or text, got {self.bad_image!r}")
        from otmel.jobs.common import image_transform, parse_pool

        image_transform(self.image_transform, False)  # a clear error for an unknown value

        parse_pool(self.workers, "--workers", allow_auto=True)
        parse_pool(self.link_actors, "--link-actors")
        if self.read_chunk_rows < 1 or self.read_chunk_bytes < 1:
            raise ValueError("read_chunk_rows and read_chunk_bytes must be >= 1")
        if self.shard_replicas < 1:
            raise ValueError(f"--shard-replicas must be >= 1, got {self.shard_replicas}")
        if not (self.stall_timeout_s >= 0 and np.isfinite(self.stall_timeout_s)):
            raise ValueError(f"--stall-timeout must be a number of seconds >= 0 (0: never), got {self.stall_timeout_s}")
        if self.shard_gpus is not None and not 0 <= self.shard_gpus <= 1:
            raise ValueError(f"--shard-gpus must be a share of one GPU in [0, 1], got {self.shard_gpus}")
        if self.coherence_weight is not None and self.kge_embeddings is None:
            raise ValueError("--coherence-weight needs --kge-embeddings (the entity vectors coherence is computed from)")
        if self.coherence_weight is not None and not (self.coherence_weight >= 0 and np.isfinite(self.coherence_weight)):
            raise ValueError(f"--coherence-weight must be a finite number >= 0, got {self.coherence_weight}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def result_settings(self) -> dict:
        """The settings that change output rows (a re-run with other values recomputes)."""
        keys = ("top_k", "candidates", "detect_mentions", "context_chars", "min_alias_length", "max_alias_entities",
                "bad_image", "allow_image_prefix", "allow_private_hosts", "image_timeout_s", "max_image_bytes",
                "image_transform")
        return {k: getattr(self, k) for k in keys}


@dataclass
class LinkResult:
    output: str
    summary: dict
    success_uri: str


# ---------------------------------------------------------------------------- shard actors
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


# ---------------------------------------------------------------------------- pipeline steps
def read_inputs(batch: dict[str, np.ndarray], s3_endpoint: str | None, detector, context_chars: int,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, chunk_bytes: int = READ_CHUNK_BYTES):
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
        for table in iter_mention_rows(str(path), s3_endpoint, detector, context_chars, chunk_rows, chunk_bytes):
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

    return Preprocess(preprocessor, "mention", image_policy, bad_image, transform)(batch)


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
                reason = batch["error"][i] if batch["error"][i] else "unusable: the row cannot be encoded"
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
        text = lambda name: [None if v is None else str(v) for v in batch[name]]  # noqa: E731
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
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "index_version": pa.array([self.index_version] * n, pa.string()),
            "source_file": pa.array(text("source_file"), pa.string()),
            "source_row": pa.array([int(v) for v in batch["source_row"]], pa.int64()),
            "file_rows": pa.array([int(v) for v in batch["file_rows"]], pa.int64()),
            "file_seq": pa.array([int(v) for v in batch["file_seq"]], pa.int64()),
        })


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


# ---------------------------------------------------------------------------- driver
def load_detector(cfg: LinkConfig, index_dir_uri: str, manifest: dict):
    """The alias matcher over the index's aliases.parquet (None without --detect-mentions)."""
    if cfg.detect_mentions is None:
        return None
    from otmel.linking.entity_index import ALIASES_FILE
    from otmel.linking.mention_detection import AliasFilter, AliasMatcher
    from otmel.io.storage import join, read_parquet

    pairs = read_parquet(join(index_dir_uri, manifest.get("aliases", ALIASES_FILE)), cfg.s3_endpoint)
    counts = pairs.group_by("alias").aggregate([("entity_id", "count_distinct")])
    alias_counts = dict(zip(counts.column("alias").to_pylist(), counts.column("entity_id_count_distinct").to_pylist()))
    matcher = AliasMatcher(alias_counts, AliasFilter(min_length=cfg.min_alias_length,
                                                     max_entities_per_alias=cfg.max_alias_entities))
    log.info("mention detection: %d aliases kept, dropped %s", matcher.kept, dict(matcher.dropped))
    return matcher


def preflight(cfg: LinkConfig) -> dict:
    """Everything that can fail the whole job, checked before any work."""
    from otmel.linking.entity_index import check_compatible, index_version_of, load_manifest
    from otmel.jobs.common import driver_model
    from otmel.linking.link_input import list_input_files

    files = list_input_files(cfg.input, cfg.s3_endpoint)
    manifest = load_manifest(cfg.index, cfg.s3_endpoint)
    backend, dims = driver_model(cfg.model, cfg.s3_endpoint)
    check_compatible(manifest, backend.model_version, dims["retrieval_query"][0], where=f"index {cfg.index}")
    indexed_with = manifest.get("encoder", {}).get("precision")
    if indexed_with and indexed_with != backend.precision:  # one checkpoint, one model_version: allowed, said
        log.info("mentions are encoded in %s, the index's entities were encoded in %s (the same checkpoint): "
                 "scores mix the two precisions", backend.precision, indexed_with)
    threshold = cfg.nil_threshold if cfg.nil_threshold is not None else backend.nil_threshold
    coherence = None
    if cfg.kge_embeddings is not None:
        coherence, threshold = resolve_coherence(cfg, backend)
    if threshold is None:
        log.warning("no NIL threshold (none given, none calibrated in the model): every mention with a candidate "
                    "is linked; run `otmel calibrate` to calibrate one")
    return {"files": files, "backend": backend, "manifest": manifest, "index_version": index_version_of(manifest),
            "nil_threshold": threshold, "coherence": coherence, "detector": load_detector(cfg, cfg.index, manifest)}


def resolve_coherence(cfg: LinkConfig, backend) -> tuple[dict, float | None]:
    """(coherence settings, NIL threshold on the coherence-adjusted score) for
    ``--kge-embeddings``: W is ``--coherence-weight`` or the weight ``otmel calibrate
    --kge-embeddings`` stored in the model for THESE embeddings (their content hash); the
    threshold is ``--nil-threshold`` or the one calibrated with that W."""
    from otmel.linking.coherence import embeddings_version

    version = embeddings_version(cfg.kge_embeddings, cfg.s3_endpoint)
    stored = backend.coherence if (backend.coherence or {}).get("embeddings_version") == version else None
    if cfg.coherence_weight is None and stored is None:
        raise ValueError(f"no coherence weight calibrated for {cfg.kge_embeddings} (version {version}) in the "
                         f"model: run `otmel calibrate --kge-embeddings {cfg.kge_embeddings}` or pass --coherence-weight")
    weight = cfg.coherence_weight if cfg.coherence_weight is not None else stored["weight"]
    if cfg.nil_threshold is not None:
        threshold = cfg.nil_threshold
    elif stored is not None and stored["weight"] == weight:
        threshold = stored["nil_threshold"]
    else:
        threshold = None
        log.warning("no NIL threshold calibrated for coherence weight %s: every mention with a candidate is linked "
                    "(pass --nil-threshold, or calibrate with --kge-embeddings)", weight)
    if stored is not None and stored.get("top_k") not in (None, cfg.top_k):
        log.warning("the coherence weight was calibrated re-ordering the top %s candidates; this job writes the top %d",
                    stored["top_k"], cfg.top_k)
    return {"embeddings": cfg.kge_embeddings, "version": version, "weight": float(weight)}, threshold


def _settings_hash(cfg: LinkConfig, nil_threshold: float | None, coherence: dict | None = None) -> str:
    settings = dict(cfg.result_settings(), nil_threshold=nil_threshold)
    if coherence is not None:  # the embeddings by content, not by URI
        settings["coherence"] = {"version": coherence["version"], "weight": coherence["weight"]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def plan_inputs(cfg: LinkConfig, files: list[str], model_version: str, index_version: str,
                nil_threshold: float | None,
                coherence: dict | None = None) -> tuple[list[str], dict[str, dict], dict[str, dict]]:
    """Which input files this run links: ``(todo, done, file_meta)``. An input is done when
    its committed output was written for THIS input (same path, size and mtime), model,
    index and result settings (``LinkConfig.result_settings`` + the NIL threshold + the
    coherence embeddings' version and weight);
    ``file_meta`` is what each output records to be recognised by a re-run."""
    from otmel.linking.link_input import input_stamps
    from otmel.linking.link_output import is_complete, output_name
    from otmel.io.storage import join

    stamps = input_stamps(files, cfg.s3_endpoint)
    expected = {"model_version": model_version, "index_version": index_version,
                "settings": _settings_hash(cfg, nil_threshold, coherence)}
    file_meta = {f: dict(expected, input=f, input_stamp=stamps[f]) for f in files}
    todo, done = [], {}
    for f in files:
        meta = None if cfg.force else is_complete(join(cfg.output, output_name(f)), file_meta[f], cfg.s3_endpoint)
        if meta is None:
            todo.append(f)
        else:
            done[f] = meta
    return todo, done, file_meta


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
                                   "chunk_bytes": cfg.read_chunk_bytes})
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


def _link_files(cfg: LinkConfig, files: list[str], pre: dict, backend, shards: ShardActors, coordinator,
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

    def consume():
        for meta in ds.iter_batches(batch_size=None, batch_format="numpy"):  # row counts only
            for f, rows in zip(meta["source_file"], meta["rows"]):
                linked[str(f)] += int(rows)
            _report_commits(ray.get(coordinator.committed.remote()), progress)
        finished = ray.get(coordinator.finish.remote(files))
        _report_commits(ray.get(coordinator.committed.remote()), progress)
        return finished

    try:
        # the dataset runs in a thread while this one watches the shard actors load: one that
        # cannot fails the job at once, in one line, not when the first batch reaches it
        written, retried = _while_loading(consume, shards)
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


def run(cfg: LinkConfig, progress=None) -> LinkResult:
    from otmel.jobs.common import PipelineStalled, encode_pool, gpu_count, init_ray
    from otmel.linking.link_output import STAGING_DIR, SUCCESS_FILE, output_name, write_success
    from otmel.io.storage import delete_dir, delete_file, join

    t0 = time.perf_counter()
    pre = preflight(cfg)
    backend, manifest = pre["backend"], pre["manifest"]
    todo, done, file_meta = plan_inputs(cfg, pre["files"], backend.model_version, pre["index_version"],
                                        pre["nil_threshold"], pre["coherence"])
    log.info("linking %d input file(s) (%d already complete, skipped) against index %s (%d entities, %d shard(s)) "
             "-> %s", len(todo), len(done), pre["index_version"][:12], manifest["count"], manifest["num_shards"], cfg.output)
    written: dict[str, dict] = {}
    shard_batches: dict[str, list[int]] = {}
    t_work = time.perf_counter()
    startup = 0.0
    encoders = str(cfg.workers)  # the encode pool, as sized at the start when there is work
    if todo:
        delete_file(join(cfg.output, SUCCESS_FILE), cfg.s3_endpoint)  # a stale one must not vouch for this run
        # parts an interrupted run staged belong to inputs not committed, i.e. to this run's todo
        delete_dir(join(cfg.output, STAGING_DIR), cfg.s3_endpoint)
        init_ray(cfg.address)
        import ray
        from ray.data.exceptions import ExecutionTimeoutError

        vectors = load_coherence_vectors(pre["coherence"], cfg.s3_endpoint)
        coordinator = shards = None
        try:
            use_gpu = (gpu_count() > 0) if cfg.gpu is None else cfg.gpu
            shards = ShardActors(cfg, manifest, use_gpu)  # loading while the pipeline starts
            encoders = encode_pool(cfg.workers, use_gpu)
            pending = todo  # the input files the next pipeline attempt links
            for attempt in range(1, PIPELINE_ATTEMPTS + 1):
                coordinator = start_commit_coordinator(cfg, file_meta, vectors, pre["coherence"], pre["nil_threshold"])
                try:
                    written.update(_link_files(cfg, pending, pre, backend, shards, coordinator, use_gpu, encoders,
                                               progress))
                    break
                except ExecutionTimeoutError as exc:
                    _end_attempt(coordinator)
                    coordinator = None
                    # what the stalled attempt committed is done; the rest is linked again, from
                    # its first row (its staged parts stay unused and go with the staging dir)
                    pending, now_done, _ = plan_inputs(dataclasses.replace(cfg, force=False), pending,
                                                       backend.model_version, pre["index_version"],
                                                       pre["nil_threshold"], pre["coherence"])
                    written.update(now_done)
                    stalled = f"the link pipeline moved no block for {cfg.stall_timeout_s:g} s"
                    if attempt == PIPELINE_ATTEMPTS:
                        raise PipelineStalled(
                            f"{stalled} in each of {PIPELINE_ATTEMPTS} attempts: {len(written)} of {len(todo)} input "
                            f"file(s) committed in {cfg.output} and kept; rerun the same command to link the other "
                            f"{len(pending)} (more CPUs, or a larger --stall-timeout if a step is that slow)") from None
                    log.warning("%s; %d input file(s) committed so far; restarting it for the %d not committed "
                                "(attempt %d of %d). Ray Data: %s", stalled, len(written), len(pending), attempt + 1,
                                PIPELINE_ATTEMPTS, " | ".join(str(exc).splitlines()[1:-1]))
                    if not pending:
                        break
            shards.wait()  # loaded (an attempt waits for it; all may have stalled before any batch)
            startup = shards.loaded_at - t_work
            delete_dir(join(cfg.output, STAGING_DIR), cfg.s3_endpoint)

            # batches each replica served: shows whether --shard-replicas spreads the load
            shard_batches = {e["name"]: ray.get([a.served.remote() for a in reps])
                             for e, reps in zip(manifest["shards"], shards.actors)}
        finally:
            # the job's own actors go with it, whatever ended it: left to Python's garbage
            # collector (the dataset's plan holds their handles in reference cycles), a
            # library caller's next job found the last ones' shard actors still holding CPUs
            _release(coordinator, shards)
    seconds = time.perf_counter() - t_work
    processed = sum(m["rows"] for m in written.values())
    totals, reasons = Counter(), Counter()
    for meta in list(written.values()) + list(done.values()):
        totals.update(meta["counts"])
        reasons.update(meta.get("errors_by_reason", {}))
    counts = {"in": int(sum(m["rows"] for m in written.values()) + sum(m["rows"] for m in done.values())),
              **{s: int(totals.get(s, 0)) for s in ("ok", "nil", "no_mention", "error")}}
    summary = {
        "input": cfg.input,
        "output": cfg.output,
        "counts": counts,
        "errors_by_reason": dict(reasons),
        "files": {f: output_name(f) for f in pre["files"]},
        "files_processed": len(written),
        "files_skipped_complete": len(done),
        "rows_processed": processed,
        "seconds": round(time.perf_counter() - t0, 2),
        "link_seconds": round(seconds, 2),
        # until every shard actor had loaded its shard (they load while the pipeline starts:
        # at real model size its encode actors take longer)
        "startup_seconds": round(startup, 2),
        # throughput after the shard actors had loaded
        "mentions_per_second": round(processed / (seconds - startup), 2) if processed and seconds > startup else None,
        "model_version": backend.model_version,
        "model": {"kind": backend.kind, "precision": backend.precision},
        "index_version": pre["index_version"],
        "nil_threshold": pre["nil_threshold"],
        "settings": dict(cfg.result_settings(), nil_threshold=pre["nil_threshold"]),
        "coherence": pre["coherence"],
        "pools": {"encode": encoders, "link": str(cfg.link_actors), "shard_replicas": cfg.shard_replicas},
        "shard_batches": shard_batches,
    }
    success = write_success(cfg.output, summary, cfg.s3_endpoint)
    log.info("link output in %s (%s)", cfg.output, success)
    return LinkResult(cfg.output, summary, success)


def _release(coordinator, shards: ShardActors | None) -> None:
    """The job's own actors end, the shard servers' local copies of remote shards with them."""
    from otmel.jobs.common import end_actors

    shard_actors = [a for replicas in shards.actors for a in replicas] if shards else []
    end_actors(([coordinator] if coordinator else []) + shard_actors)


def _end_attempt(coordinator, timeout: float = 60) -> None:
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


def _while_loading(work, shards: ShardActors):
    """``work()`` in a thread (its result, or its exception raised here) while this thread
    waits for the ``shards`` to load: a shard's load error is raised as soon as it happens.
    The job then ends with it; the dataset left running in the thread fails at its next link
    call (the shard actor is dead) or ends with the driver."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="otmel-link-pipeline", daemon=True)
    thread.start()
    while thread.is_alive():
        if shards.wait(timeout=0.5):  # loaded: only the pipeline is left to wait for
            break
    thread.join()
    if "error" in box:
        shards.wait(timeout=5)  # a pipeline failed by a shard that did not load: that shard's error
        raise box["error"]
    shards.wait()
    return box["result"]


def _report_commits(committed: list[tuple[str, int]], progress) -> None:
    for f, rows in committed:
        log.info("committed %s (%d rows)", f, rows)
        if progress:
            progress(f"committed {f} ({rows} rows)")


def summary_line(result: LinkResult) -> str:
    s = result.summary
    c = s["counts"]
    rate = f", {s['mentions_per_second']:.1f} mentions/s" if s["mentions_per_second"] else ""
    if s.get("coherence"):
        rate += f", coherence weight {s['coherence']['weight']:.4g} ({s['coherence']['embeddings']})"
    rate += f", {s['model']['kind']} {s['model']['precision']} encoder"
    return (f"linked {c['in']} mention rows: ok {c['ok']}, nil {c['nil']}, no_mention {c['no_mention']}, "
            f"error {c['error']} ({s['files_processed']} file(s) processed, {s['files_skipped_complete']} skipped as "
            f"complete{rate}); output: {s['output']} ({result.success_uri})")
