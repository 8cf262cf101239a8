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

This module is the job's config and driver; steps 1-4 live in ``link_pipeline.py``, the commit
protocol (step 5) in ``link_commit.py``, and which files a run links (resume) in ``link_resume.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from otmel.jobs.link_commit import end_attempt, load_coherence_vectors, start_commit_coordinator
from otmel.jobs.link_pipeline import PIPELINE_ATTEMPTS, ShardActors, link_files
from otmel.jobs.link_resume import plan_inputs
from otmel.linking.link_input import (DEFAULT_CHUNK_ROWS, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_TEXT_BYTES,
                                      READ_CHUNK_BYTES)

log = logging.getLogger(__name__)


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
    require_text: bool = False  # a mentions row without text: an error row (else linked, warning no_context)
    image_transform: str = "auto"  # cpu | device (resize/normalise on the encoder's GPU) | auto: device with GPUs
    allow_image_prefix: list[str] = field(default_factory=list)  # local image_uri roots allowed
    allow_private_hosts: bool = False  # http(s) image_uri on private/loopback/link-local hosts
    image_timeout_s: float = 10.0
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # a larger image (inline or fetched) is refused for its row
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES  # a longer text: a text_too_long error row (or cut: truncate_text)
    truncate_text: bool = False  # cut a text at max_text_bytes (warning text_truncated) instead of an error row
    kge_embeddings: str | None = None  # entity_id + vector Parquet (`otmel kge embed`): collective disambiguation
    coherence_weight: float | None = None  # W of otmel.linking.coherence (None = the weight calibrated for these embeddings)
    force: bool = False  # recompute inputs whose output is already complete
    skip_unsupported: bool = False  # input files no reader claims: skipped and listed (else the job is refused)
    dry_run: bool = False  # plan only (:func:`dry_run_plan`): every check, then nothing started or written
    stall_timeout_s: float = 600.0  # no block moved for this long: the pipeline is restarted (see run); 0 = never
    cpus_per_actor: float = 0.25  # Ray CPUs an encode actor holds (fractional: read tasks must still get CPUs)
    gpu: bool | None = None  # None = a GPU per encode actor when the cluster has one
    address: str | None = None
    s3_endpoint: str | None = None

    def __post_init__(self):
        # numbers that key a re-run as the CLI parses them: a library caller's 600 and the CLI's
        # 600.0 are one setting (else the re-run keys differ and every file is linked again)
        self.image_timeout_s = float(self.image_timeout_s)
        if self.nil_threshold is not None:
            self.nil_threshold = float(self.nil_threshold)
        # the CLI checks every flag while parsing; these hold for library callers too
        if self.nil_threshold is not None and not np.isfinite(self.nil_threshold):
            raise ValueError(f"--nil-threshold must be a finite number, got {self.nil_threshold}")
        if self.batch_size < 1 or self.context_chars < 0:
            raise ValueError(f"--batch-size must be >= 1 and --context-chars >= 0, got {self.batch_size}, "
                             f"{self.context_chars}")
        if not (self.image_timeout_s > 0 and np.isfinite(self.image_timeout_s)) or not self.cpus_per_actor > 0:
            raise ValueError(f"--image-timeout and --cpus-per-actor must be > 0, got {self.image_timeout_s}, "
                             f"{self.cpus_per_actor}")
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
        if self.max_text_bytes < 1 or self.max_image_bytes < 1:
            raise ValueError(f"--max-text-bytes and --max-image-bytes must be >= 1, got {self.max_text_bytes}, "
                             f"{self.max_image_bytes}")
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
                "image_transform", "require_text", "max_text_bytes", "truncate_text")
        return {k: getattr(self, k) for k in keys}


@dataclass
class LinkResult:
    output: str
    summary: dict
    success_uri: str


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
    from otmel.io.storage import probe_writable
    from otmel.linking.link_input import check_output_apart, classify_input_files, unsupported_error

    check_output_apart(cfg.input, cfg.output)
    listing = classify_input_files(cfg.input, cfg.s3_endpoint)
    if listing.unsupported and not cfg.skip_unsupported:
        raise unsupported_error(cfg.input, listing)
    for f, reason in listing.skipped.items():
        (log.warning if f in listing.unsupported else log.info)("not read: %s: %s", f, reason)
    files = listing.files
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
    detector = load_detector(cfg, cfg.index, manifest)
    if not cfg.dry_run:  # a dry run writes nothing, not even a probe
        probe_writable(cfg.output, cfg.s3_endpoint, "--output")  # last: every other check is side-effect free
    return {"files": files, "skipped_files": listing.skipped, "backend": backend, "manifest": manifest,
            "index_version": index_version_of(manifest), "nil_threshold": threshold, "coherence": coherence,
            "detector": detector}


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


def run(cfg: LinkConfig, progress=None) -> LinkResult:
    from otmel.jobs.common import JobInterrupted, PipelineStalled, encode_pool, gpu_count, init_ray
    from otmel.io.lease import OutputLease
    from otmel.linking.link_output import STAGING_DIR, SUCCESS_FILE, output_name, write_success
    from otmel.io.storage import delete_dir, delete_file, join

    t0 = time.perf_counter()
    pre = preflight(cfg)
    backend, manifest = pre["backend"], pre["manifest"]
    todo, done, file_meta = plan_inputs(cfg, pre["files"], backend.model_version, pre["index_version"],
                                        pre["nil_threshold"], pre["coherence"])
    if cfg.dry_run:
        return LinkResult(cfg.output, dry_run_plan(cfg, pre, todo, done, file_meta), "")
    # one writer per output: a second job into it is refused here, before it deletes anything
    lease = OutputLease(cfg.output, cfg.s3_endpoint)
    written: dict[str, dict] = {}  # input file -> its committed output's metadata, this run
    lease.acquire()
    try:
        log.info("linking %d input file(s) (%d already complete, skipped; %d not read, listed in _SUCCESS.json) against "
                 "index %s (%d entities, %d shard(s)) -> %s", len(todo), len(done), len(pre["skipped_files"]),
                 pre["index_version"][:12], manifest["count"], manifest["num_shards"], cfg.output)
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
                        written.update(link_files(cfg, pending, pre, backend, shards, coordinator, use_gpu, encoders,
                                                   progress))
                        break
                    except ExecutionTimeoutError as exc:
                        end_attempt(coordinator)
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
            except JobInterrupted as exc:
                raise _interrupted(exc, len(set(done) | set(written) | set(_drain(coordinator))), cfg, pre) from None
            finally:
                # the job's own actors go with it, whatever ended it: left to Python's garbage
                # collector (the dataset's plan holds their handles in reference cycles), a
                # library caller's next job found the last ones' shard actors still holding CPUs
                _release(coordinator, shards)
                if sys.exc_info()[1] is not None:  # failed or interrupted: its commit tasks died with it
                    _remove_staging(cfg)
        seconds = time.perf_counter() - t_work
        processed = sum(m["rows"] for m in written.values())
        totals, reasons, warnings = Counter(), Counter(), Counter()
        for meta in list(written.values()) + list(done.values()):
            totals.update(meta["counts"])
            reasons.update(meta.get("errors_by_reason", {}))
            warnings.update(meta.get("warnings", {}))
        counts = {"in": int(sum(m["rows"] for m in written.values()) + sum(m["rows"] for m in done.values())),
                  **{s: int(totals.get(s, 0)) for s in ("ok", "nil", "no_mention", "error")}}
        summary = {
            "input": cfg.input,
            "output": cfg.output,
            "counts": counts,
            "errors_by_reason": dict(reasons),
            "warnings": dict(warnings),  # rows linked with less than the model expects (no_context: no text)
            "files": {f: output_name(f) for f in pre["files"]},
            "skipped_files": pre["skipped_files"],  # every input file not read, with its reason
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
    except JobInterrupted as exc:  # before or after the pipeline: what was complete before the run is kept
        raise exc if exc.kept is not None else _interrupted(exc, len(set(done) | set(written)), cfg, pre) from None
    finally:
        lease.release()


def _interrupted(exc, kept: int, cfg: LinkConfig, pre: dict):
    """The one line of an interrupted link job: what it kept and what to do."""
    from otmel.jobs.common import JobInterrupted

    return JobInterrupted(exc.signum, f"interrupted by {exc.signal_name}: {kept} of {len(pre['files'])} input file(s) "
                          f"committed in {cfg.output} and kept; re-run the same command to link the rest", kept=kept)


#: how long an interrupted job waits for the commits in flight (each is whole or nothing)
INTERRUPT_COMMIT_WAIT_S = 10.0


def _drain(coordinator) -> list[str]:
    """The files the current attempt's coordinator committed, once the commits in flight are
    done (up to INTERRUPT_COMMIT_WAIT_S); none when it cannot say."""
    import ray

    if coordinator is None:
        return []
    try:
        return list(ray.get(coordinator.drain.remote(INTERRUPT_COMMIT_WAIT_S), timeout=2 * INTERRUPT_COMMIT_WAIT_S))
    except Exception:  # noqa: BLE001 - the coordinator died with the work: its files are not counted
        return []


def _remove_staging(cfg: LinkConfig) -> None:
    """A job that failed (a full disk, a storage error) or was interrupted removes what it
    staged for the inputs it did not commit (parts, half-written commit files) and says so:
    they were never output (a re-run relinks those inputs from their first row), and on a
    full disk they kept it full. Committed files stay. Best effort: the storage that failed
    the job may fail this too, and the re-run removes them then."""
    from otmel.io.storage import delete_dir, join, resolve
    from otmel.linking.link_output import STAGING_DIR

    staging = join(cfg.output, STAGING_DIR)
    try:
        fs, path = resolve(staging, cfg.s3_endpoint)
        infos = [i for i in fs.get_file_info(_selector(path)) if i.type.name == "File"]
        if not infos:
            return
        delete_dir(staging, cfg.s3_endpoint)
    except Exception as exc:  # noqa: BLE001 - the job's own error is the one to report
        log.warning("could not remove %s (the re-run removes it): %s", staging, str(exc).splitlines()[0] if str(exc)
                    else type(exc).__name__)
        return
    inputs = {i.path.rstrip("/").rsplit("/", 2)[-2] for i in infos}
    log.warning("removed %d staged file(s) (%.1f MB) of %d input file(s) not committed, under %s; committed files "
                "are kept", len(infos), sum(i.size or 0 for i in infos) / 1e6, len(inputs), staging)


def _selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True, allow_not_found=True)


def _release(coordinator, shards: ShardActors | None) -> None:
    """The job's own actors end, the shard servers' local copies of remote shards with them."""
    from otmel.jobs.common import end_actors

    shard_actors = [a for replicas in shards.actors for a in replicas] if shards else []
    end_actors(([coordinator] if coordinator else []) + shard_actors)


def dry_run_plan(cfg: LinkConfig, pre: dict, todo: list[str], done: dict, file_meta: dict[str, dict]) -> dict:
    """What a run would do, from the checks alone (``--dry-run``): each input file read, with
    its size (and rows, for Parquet: from its footer) and whether it would be linked or skipped
    (its complete output already there); each file not read, with the reason."""
    import pyarrow.parquet as pq

    from otmel.io.storage import resolve
    from otmel.linking.link_output import output_name

    # the sizes plan_inputs read (each file's input stamp is "size:mtime"): no second listing
    sizes = {f: int(file_meta[f]["input_stamp"].split(":")[0]) for f in pre["files"]}
    files = []
    for f in pre["files"]:
        rows = None
        if f.lower().endswith(".parquet"):
            fs, path = resolve(f, cfg.s3_endpoint)
            with fs.open_input_file(path) as handle:
                rows = pq.ParquetFile(handle).metadata.num_rows
        files.append({"input": f, "bytes": sizes[f], "rows": rows, "output": output_name(f),
                      "action": "link" if f in todo else "skip: its complete output is there"})
    return {"dry_run": True, "input": cfg.input, "output": cfg.output, "files": files,
            "not_read": pre["skipped_files"], "to_link": len(todo), "complete": len(done),
            "index_version": pre["index_version"], "model_version": pre["backend"].model_version}


def plan_lines(plan: dict) -> list[str]:
    """A dry run's plan as lines for a terminal."""
    lines = [f"dry run: {plan['to_link']} input file(s) to link, {plan['complete']} complete (skipped), "
             f"{len(plan['not_read'])} not read; output {plan['output']}; nothing was started or written"]
    for f in plan["files"]:
        size = f"{f['bytes']:,} bytes" + (f", {f['rows']:,} rows" if f["rows"] is not None else "")
        lines.append(f"  {f['action'].split(':')[0]:<5} {f['input']} ({size}) -> {f['output']}"
                     + ("" if f["action"] == "link" else f" [{f['action'].split(': ', 1)[1]}]"))
    lines += [f"  not read {f}: {reason}" for f, reason in plan["not_read"].items()]
    return lines


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
