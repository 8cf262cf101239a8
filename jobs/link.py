"""Bulk entity linking on Ray Data (``otmel link``).

    otmel link --model MODEL_URI --index INDEX_URI --input INPUT_URI --output OUTPUT_URI
               [--top-k k] [--candidates K] [--nil-threshold T] [--workers N] [--batch-size B]
               [--detect-mentions alias] [--address ADDR]

Pipeline (DESIGN.md "Data flow"):

1. read: one task per input file (``otmel.link_input``), streamed in chunks of
   ``read_chunk_rows`` (Parquet by row-group batches, JSONL line by line): posts are exploded
   into one row per mention (given spans, or alias detection), bad rows become ``error`` rows,
   nothing dropped;
2. preprocess (CPU tasks): tokenise, fetch (``image_uri``) and decode/resize images;
3. encode (actor pool, a GPU per actor when present): mention features + stage-1 queries;
4. link (a small actor pool): the batch's features are put in the object store once and sent to
   every index-shard actor (``ShardServer``: its FAISS shard, its memory-mapped features and a
   matcher; restarted by Ray if it dies, its calls retried), which retrieves K and reranks them
   with the full S_O; the per-shard top-k are merged into the global top-k, NIL decided;
5. write: the driver collects each input file's rows and writes them as ONE Parquet file named
   by a hash of the input path (``otmel.link_output``) as soon as the file is complete, so an
   interrupted job keeps what it finished and a re-run skips it. ``_SUCCESS.json`` last.

Job-level problems (no input files, index/model mismatch, unreadable model) fail before any
work, in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: test hook: if set to a path that does not exist yet, a shard actor creates it and dies in
#: its next link call (exercises Ray's actor restart + task retry)
KILL_SHARD_ONCE_ENV = "OTMEL_TEST_KILL_SHARD_ONCE_FILE"
#: CPUs of a preprocess task (distinct from the actors' so Ray Data does not fuse the two steps)
PREPROCESS_CPUS = 0.25


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
    workers: int = 1  # encode actors
    batch_size: int = 64
    read_chunk_rows: int = 1024  # input rows read at a time (a file is streamed, never held whole)
    detect_mentions: str | None = None  # None | "alias": find mentions in posts without spans
    context_chars: int = 200  # context window around a span (posts)
    min_alias_length: int = 3  # mention detection filters
    max_alias_entities: int = 20
    bad_image: str = "error"  # error | text: what a given-but-unusable image does to its row
    allow_image_prefix: list[str] = field(default_factory=list)  # local image_uri roots allowed
    allow_private_hosts: bool = False  # http(s) image_uri on private/loopback/link-local hosts
    image_timeout_s: float = 10.0
    max_image_bytes: int = 20 * 1024 * 1024
    force: bool = False  # recompute inputs whose output is already complete
    cpus_per_actor: float = 0.5  # fractional: on small machines read tasks must still get CPUs
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def result_settings(self) -> dict:
        """The settings that change output rows (a re-run with other values recomputes)."""
        keys = ("top_k", "candidates", "detect_mentions", "context_chars", "min_alias_length", "max_alias_entities",
                "bad_image", "allow_image_prefix", "allow_private_hosts", "image_timeout_s", "max_image_bytes")
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

        import torch

        from otmel.backend import load_backend
        from otmel.entity_index import Shard
        from otmel.linking import ShardLinker
        from otmel.storage import download_dir, is_remote, join, scratch_dir

        torch.set_num_threads(threads)
        uri = join(index_uri, entry["dir"])
        if is_remote(uri):  # to local disk once (features are memory-mapped), removed at exit
            self.local_dir = download_dir(uri, scratch_dir(f"otmel-{entry['name']}-"), s3_endpoint)
        else:
            self.local_dir = Path(uri)
        shard = Shard(self.local_dir, entry, manifest, verify=True)
        # the matcher only (an ONNX export's encoder is not loaded; a checkpoint loads whole)
        self.linker = ShardLinker(shard, load_backend(model_uri, s3_endpoint, threads=threads, encoder=False))
        self.name = entry["name"]

    def ready(self) -> tuple[str, int]:
        return self.name, self.linker.shard.count

    def link(self, mentions: dict[str, np.ndarray], candidates: int, top_k: int):
        marker = os.environ.get(KILL_SHARD_ONCE_ENV)
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # a crash, as an OOM kill would be: Ray restarts the actor and retries
        return self.linker.link(mentions, candidates, top_k)


def start_shard_actors(cfg: LinkConfig, manifest: dict, use_gpu: bool = False) -> list:
    """One actor per shard (restarted on death, calls retried); waits until all are loaded.

    With GPUs in the cluster each shard actor takes a share of one (its FAISS index goes to
    the GPU when faiss-gpu is installed); without a GPU share Ray hides the devices from it.
    """
    import ray

    from otmel.jobs.common import worker_env

    remote = ray.remote(ShardServer).options(num_cpus=0.25, num_gpus=0.25 if use_gpu else 0, max_restarts=-1,
                                             max_task_retries=3, runtime_env={"env_vars": worker_env()})
    actors = [remote.remote(cfg.index, entry, manifest, cfg.model, cfg.s3_endpoint) for entry in manifest["shards"]]
    loaded = ray.get([a.ready.remote() for a in actors])
    log.info("index shards loaded: %s", ", ".join(f"{n} ({c} entities)" for n, c in loaded))
    return actors


# ---------------------------------------------------------------------------- pipeline steps
def read_inputs(batch: dict[str, np.ndarray], s3_endpoint: str | None, detector, context_chars: int,
                chunk_rows: int = 1024):
    """Input file paths -> mention rows, streamed in chunks (a file is never held whole).

    ``file_rows`` is -1 on every chunk but a file's last, which carries the file's total: the
    driver writes the file's output once it holds that many rows, in whatever order they came.
    """
    from otmel.link_input import iter_mention_rows

    for path in batch["path"]:
        total, previous = 0, None
        for table in iter_mention_rows(str(path), s3_endpoint, detector, context_chars, chunk_rows):
            if table.num_rows == 0:
                continue
            if previous is not None:
                yield previous.append_column("file_rows", pa.array([-1] * previous.num_rows, pa.int64()))
            total += table.num_rows
            previous = table
        if previous is not None:
            yield previous.append_column("file_rows", pa.array([total] * previous.num_rows, pa.int64()))


def preprocess_mentions(batch: dict, preprocessor, image_policy, bad_image: str) -> dict:
    from otmel.jobs.common import Preprocess

    return Preprocess(preprocessor, "mention", image_policy, bad_image)(batch)


def _int_or_none(v) -> int | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else int(f)


class LinkStage:
    """Scatter a batch's mention features to every shard actor, gather, merge, decide NIL."""

    def __init__(self, shard_actors: list, candidates: int, top_k: int, nil_threshold: float | None,
                 model_version: str, index_version: str):
        self.actors = shard_actors
        self.candidates = candidates
        self.top_k = top_k
        self.nil_threshold = nil_threshold
        self.model_version = model_version
        self.index_version = index_version

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import ray

        from otmel.linking import LINK_MENTION_FEATURES, merge_topk, nil_decision
        from otmel.schemas import CANDIDATE

        n = len(batch["mention_id"])
        preset = [str(p or "") for p in batch["preset"]]
        ok = np.asarray(batch["ok"], dtype=bool)
        linkable = np.array([ok[i] and preset[i] == "" for i in range(n)], dtype=bool)
        sel = np.flatnonzero(linkable)
        merged = None
        if len(sel):
            feats = {name: np.ascontiguousarray(np.asarray(batch[name])[sel]) for name in LINK_MENTION_FEATURES}
            ref = ray.put(feats)  # one copy in the object store, read by every shard
            parts = ray.get([a.link.remote(ref, self.candidates, self.top_k) for a in self.actors])
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
        })


# ---------------------------------------------------------------------------- driver
def load_detector(cfg: LinkConfig, index_dir_uri: str, manifest: dict):
    """The alias matcher over the index's aliases.parquet (None without --detect-mentions)."""
    if cfg.detect_mentions is None:
        return None
    from otmel.entity_index import ALIASES_FILE
    from otmel.mention_detection import AliasFilter, AliasMatcher
    from otmel.storage import join, read_parquet

    pairs = read_parquet(join(index_dir_uri, manifest.get("aliases", ALIASES_FILE)), cfg.s3_endpoint)
    counts = pairs.group_by("alias").aggregate([("entity_id", "count_distinct")])
    alias_counts = dict(zip(counts.column("alias").to_pylist(), counts.column("entity_id_count_distinct").to_pylist()))
    matcher = AliasMatcher(alias_counts, AliasFilter(min_length=cfg.min_alias_length,
                                                     max_entities_per_alias=cfg.max_alias_entities))
    log.info("mention detection: %d aliases kept, dropped %s", matcher.kept, dict(matcher.dropped))
    return matcher


def preflight(cfg: LinkConfig) -> dict:
    """Everything that can fail the whole job, checked before any work."""
    from otmel.backend import load_backend
    from otmel.entity_index import check_compatible, index_version_of, load_manifest
    from otmel.jobs.common import probe_model
    from otmel.link_input import list_input_files

    files = list_input_files(cfg.input, cfg.s3_endpoint)
    manifest = load_manifest(cfg.index, cfg.s3_endpoint)
    backend = load_backend(cfg.model, cfg.s3_endpoint)
    dims = probe_model(backend)
    check_compatible(manifest, backend.model_version, dims["retrieval_query"][0], where=f"index {cfg.index}")
    threshold = cfg.nil_threshold if cfg.nil_threshold is not None else backend.nil_threshold
    if threshold is None:
        log.warning("no NIL threshold (none given, none calibrated in the model): every mention with a candidate "
                    "is linked; run `otmel calibrate` to calibrate one")
    return {"files": files, "backend": backend, "manifest": manifest, "index_version": index_version_of(manifest),
            "nil_threshold": threshold, "detector": load_detector(cfg, cfg.index, manifest)}


def _settings_hash(cfg: LinkConfig, nil_threshold: float | None) -> str:
    settings = dict(cfg.result_settings(), nil_threshold=nil_threshold)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def encoded_mentions(cfg: LinkConfig, files: list[str], preprocessor, detector, use_gpu: bool):
    """Steps 1-3 of the pipeline: read (one task per file) -> preprocess -> encode (actor pool)."""
    import ray.data

    from otmel.image_fetch import ImagePolicy
    from otmel.jobs.common import Encode
    from otmel.linking import LINK_MENTION_FEATURES

    policy = ImagePolicy(allowed_prefixes=tuple(cfg.allow_image_prefix), allow_private_hosts=cfg.allow_private_hosts,
                         timeout_s=cfg.image_timeout_s, max_bytes=cfg.max_image_bytes, s3_endpoint=cfg.s3_endpoint)
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(read_inputs, batch_size=1, num_cpus=0.25,
                        fn_kwargs={"s3_endpoint": cfg.s3_endpoint, "detector": detector,
                                   "context_chars": cfg.context_chars, "chunk_rows": cfg.read_chunk_rows})
    # preprocessing stays on CPU tasks (its own resources keep Ray Data from fusing it into the actors)
    ds = ds.map_batches(preprocess_mentions, batch_size=cfg.batch_size, num_cpus=PREPROCESS_CPUS,
                        fn_kwargs={"preprocessor": preprocessor, "image_policy": policy, "bad_image": cfg.bad_image})
    return ds.map_batches(Encode, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.workers),
                          num_cpus=cfg.cpus_per_actor,
                          num_gpus=1 if use_gpu else 0,
                          fn_constructor_kwargs={"model_uri": cfg.model, "feature_names": LINK_MENTION_FEATURES,
                                                 "s3_endpoint": cfg.s3_endpoint, "threads": None if use_gpu else 1})


def run(cfg: LinkConfig, progress=None) -> LinkResult:
    import ray.data

    from otmel.jobs.common import gpu_count, init_ray
    from otmel.link_input import input_stamps
    from otmel.link_output import SUCCESS_FILE, error_reasons, is_complete, output_name, write_output_file, write_success
    from otmel.schemas import LINK_OUTPUT_SCHEMA
    from otmel.storage import delete_file, join

    t0 = time.perf_counter()
    pre = preflight(cfg)
    backend, manifest = pre["backend"], pre["manifest"]
    # an output is complete for THIS input (same path, size and mtime), model, index and settings
    stamps = input_stamps(pre["files"], cfg.s3_endpoint)
    expected = {"model_version": backend.model_version, "index_version": pre["index_version"],
                "settings": _settings_hash(cfg, pre["nil_threshold"])}
    file_meta = {f: dict(expected, input=f, input_stamp=stamps[f]) for f in pre["files"]}
    todo, done = [], {}
    for f in pre["files"]:
        meta = None if cfg.force else is_complete(join(cfg.output, output_name(f)), file_meta[f], cfg.s3_endpoint)
        if meta is None:
            todo.append(f)
        else:
            done[f] = meta
    log.info("linking %d input file(s) (%d already complete, skipped) against index %s (%d entities, %d shard(s)) "
             "-> %s", len(todo), len(done), pre["index_version"][:12], manifest["count"], manifest["num_shards"], cfg.output)
    written: dict[str, dict] = {}
    t_work = time.perf_counter()
    startup = 0.0
    if todo:
        delete_file(join(cfg.output, SUCCESS_FILE), cfg.s3_endpoint)  # a stale one must not vouch for this run
        init_ray(cfg.address)
        use_gpu = (gpu_count() > 0) if cfg.gpu is None else cfg.gpu
        actors = start_shard_actors(cfg, manifest, use_gpu)
        startup = time.perf_counter() - t_work
        ds = encoded_mentions(cfg, todo, backend.preprocessor, pre["detector"], use_gpu)
        ds = ds.map_batches(LinkStage, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.2,
                            fn_constructor_kwargs={"shard_actors": actors, "candidates": cfg.candidates,
                                                   "top_k": cfg.top_k, "nil_threshold": pre["nil_threshold"],
                                                   "model_version": backend.model_version,
                                                   "index_version": pre["index_version"]})
        pending: dict[str, list[pa.Table]] = {}
        have: Counter = Counter()
        total_rows: dict[str, int] = {}  # known once the file's last chunk has arrived
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for f in set(block.column("source_file").to_pylist()):
                part = block.filter(pc.equal(block.column("source_file"), f))
                pending.setdefault(f, []).append(part)
                have[f] += part.num_rows
                last = pc.max(part.column("file_rows")).as_py()
                if last is not None and last >= 0:
                    total_rows[f] = last
                if have[f] == total_rows.get(f):
                    table = pa.concat_tables(pending.pop(f))
                    out_uri = join(cfg.output, output_name(f))
                    meta = dict(file_meta[f], errors_by_reason=error_reasons(table))
                    written[f] = write_output_file(table, out_uri, meta, cfg.s3_endpoint)
                    if progress:
                        progress(f"wrote {out_uri} ({table.num_rows} rows from {f})")
        if pending:
            raise RuntimeError(f"rows of {len(pending)} input file(s) never completed: {sorted(pending)[:3]}")
        for f in todo:  # an empty input (e.g. an empty part file) still gets its (empty) output
            if f not in written:
                written[f] = write_output_file(LINK_OUTPUT_SCHEMA.empty_table(), join(cfg.output, output_name(f)),
                                               dict(file_meta[f], errors_by_reason={}), cfg.s3_endpoint)
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
        "startup_seconds": round(startup, 2),  # until every shard actor had loaded its shard
        # throughput of the linking itself (after the shard actors have loaded)
        "mentions_per_second": round(processed / (seconds - startup), 2) if processed and seconds > startup else None,
        "model_version": backend.model_version,
        "index_version": pre["index_version"],
        "nil_threshold": pre["nil_threshold"],
        "settings": dict(cfg.result_settings(), nil_threshold=pre["nil_threshold"]),
    }
    success = write_success(cfg.output, summary, cfg.s3_endpoint)
    log.info("link output in %s (%s)", cfg.output, success)
    return LinkResult(cfg.output, summary, success)


def summary_line(result: LinkResult) -> str:
    s = result.summary
    c = s["counts"]
    rate = f", {s['mentions_per_second']:.1f} mentions/s" if s["mentions_per_second"] else ""
    return (f"linked {c['in']} mention rows: ok {c['ok']}, nil {c['nil']}, no_mention {c['no_mention']}, "
            f"error {c['error']} ({s['files_processed']} file(s) processed, {s['files_skipped_complete']} skipped as "
            f"complete{rate}); output: {s['output']} ({result.success_uri})")
