"""Build or update the sharded entity index (``otmel index``) on Ray Data. One cohesive thing over
~500 lines: the build and the update share their pipeline, shard builders and manifest commit.

    otmel index --model MODEL_URI --kb KB_URI --out INDEX_URI --shards S [--factory FAISS_FACTORY]
                [--feature-dtype fp16|fp32] [--workers auto|N|MIN-MAX] [--address ADDR]
    otmel index --update INDEX_URI --kb CHANGED_KB_URI --model MODEL_URI

Build: Ray Data reads the KB (Parquet: a file, a directory or a glob), preprocesses it on CPU
tasks and encodes the entities in an actor pool (ONNX Runtime or PyTorch, a GPU per actor on
a GPU cluster). A routing step sends each encoded row to the **shard builder** actor of its
shard (``hash(entity_id) mod S``); each builder streams its shard to its own node's disk
(``otmel.linking.entity_index.ShardWriter``: features appended as they come, rows put in entity-id
order at close, FAISS over the stage-1 keys, trained on a GPU when there is one), uploads it
straight to the index URI and reads it back to verify every file's sha256. No feature passes
through the driver: it counts rows, checks every shard's files on storage (names and sizes
against the checksummed entries the builders report) and writes ``manifest.json`` LAST: an
interrupted build leaves no manifest, so nothing will ever load half an index.

Update: the changed KB holds new entities and new versions of existing ones (by entity_id);
a boolean ``deleted`` column marks removals. Only the shards those ids hash to are rebuilt:
their builders copy the old shard, keep the rows not changed, take the newly encoded rows,
and write new shard directories; the new manifest then switches to them, and the replaced
directories are deleted afterwards. Shards not touched keep their files and checksums; the
result equals a full rebuild (the same files).

Lost builders: a builder whose node dies is restarted by Ray with none of its rows; each
builder counts the rows it took (rows re-sent by a retried routing task are kept once), and
a shard whose count falls short of what was routed to it is rebuilt from its own KB rows by
a new builder (``build_shards``), so the index equals an undisturbed build.

KB rows that cannot be indexed (empty name) are skipped and counted in the manifest; an image
that cannot be fetched or decoded indexes the entity on its text (counted). The driver reads
three small KB columns (entity_id, name, aliases: ~50 B per entity) to check ids before any
work and to write the alias table for mention detection.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    """One index build or update; flat and serialisable (rebuilt inside Ray workers)."""

    model: str  # ONNX export dir or checkpoint dir (local or s3://)
    kb: str  # KB Parquet: file, directory or glob (local or s3://); for --update, the changes
    out: str  # index URI (local dir or s3://); for --update, the index to update in place
    shards: int = 1
    factory: str = "auto"  # FAISS index factory string (inner product); auto: by entities per shard (auto_factory)
    feature_dtype: str = "fp16"  # fp16 | fp32 for the reranking features
    update: bool = False
    overwrite: bool = False  # replace an existing index at OUT
    workers: int | str = "auto"  # encode actors: auto (a GPU each, or one 1-thread actor per CPU), N, or MIN-MAX
    batch_size: int = 64
    cpus_per_actor: float = 0.25  # Ray CPUs an encode actor holds (fractional: read tasks must still get CPUs)
    gpu: bool | None = None  # None = use a GPU per encode actor when the cluster has one
    train_size: int = 100_000  # vectors sampled to train IVF/PQ factories
    nprobe: int = 32  # IVF lists scanned per query (stored in the manifest; ignored by Flat/HNSW)
    address: str | None = None
    s3_endpoint: str | None = None
    allow_image_prefix: list[str] = field(default_factory=list)  # local image_uri roots allowed
    allow_private_hosts: bool = False  # http(s) image_uri on private/loopback addresses
    image_transform: str = "auto"  # cpu | device (resize/normalise on the encoder's GPU) | auto: device with GPUs

    def __post_init__(self):
        from otmel.jobs.common import image_transform, parse_pool

        image_transform(self.image_transform, False)  # a clear error for an unknown value

        if self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        parse_pool(self.workers, "--workers", allow_auto=True)
        if self.feature_dtype not in ("fp16", "fp32"):
            raise ValueError(f"--feature-dtype must be fp16 or fp32, got {self.feature_dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class IndexResult:
    uri: str
    index_version: str
    manifest: dict
    shards_written: list[str]
    seconds: float


@dataclass(frozen=True)
class KeyPlan:
    """How a build stores the stage-1 keys: the FAISS factory (``auto`` resolved), the stored
    features' dtype, the model's key layout and whether FAISS keeps the keys exactly (then the
    key's features get no files: ``otmel.linking.entity_index``)."""

    factory: str
    feature_dtype: str
    missing_image: str
    in_faiss: bool

    @classmethod
    def plan(cls, factory: str, feature_dtype: str, missing_image: str, key_dim: int, rows_per_shard: int,
             gpu: bool = False) -> "KeyPlan":
        from otmel.linking.entity_index import auto_factory, check_factory, keeps_keys_exactly

        if factory == "auto":
            factory = auto_factory(rows_per_shard, key_dim, feature_dtype, gpu)
        check_factory(factory, key_dim, rows_per_shard)
        return cls(factory, feature_dtype, missing_image, keeps_keys_exactly(factory, key_dim, feature_dtype))

    @classmethod
    def of(cls, manifest: dict) -> "KeyPlan":
        key = manifest["retrieval_key"]
        return cls(manifest["factory"], manifest["feature_dtype"], key["layout"], bool(key["in_faiss"]))


# ---------------------------------------------------------------------------- KB input
def kb_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """The Parquet files of a KB URI (file, directory or glob); clear error if none."""
    from otmel.linking.link_input import list_input_files

    try:
        files = [f for f in list_input_files(uri, s3_endpoint) if f.endswith(".parquet")]
    except FileNotFoundError:
        files = []
    if not files:
        raise FileNotFoundError(f"{uri}: no KB Parquet file (*.parquet) found")
    return files


def read_kb_identity(files: list[str], s3_endpoint: str | None, update: bool = False) -> pa.Table:
    """entity_id, name, aliases (+ deleted) of the whole KB, checked: required columns, unique
    non-null ids (a driver-side pass over three small columns, before any work)."""
    import pyarrow.parquet as pq

    from otmel.data.schemas import REQUIRED, SchemaError, bad_utf8_rows, check_unique_ids, without_rows
    from otmel.io.storage import resolve

    tables = []
    for uri in files:
        fs, path = resolve(uri, s3_endpoint)
        schema = pq.read_schema(path, filesystem=fs)
        missing = [c for c in REQUIRED["KB"] if c not in schema.names]
        if missing:
            raise SchemaError(f"{uri}: the KB table lacks required column(s) {', '.join(missing)} "
                              f"(it has: {', '.join(schema.names)})")
        cols = [c for c in ("entity_id", "name", "aliases", "deleted") if c in schema.names]
        t = pq.read_table(path, filesystem=fs, columns=cols)
        if "aliases" not in t.column_names:
            t = t.append_column("aliases", pa.nulls(t.num_rows, pa.list_(pa.string())))
        if "deleted" not in t.column_names:
            t = t.append_column("deleted", pa.array([False] * t.num_rows))
        t = t.select(["entity_id", "name", "aliases", "deleted"]).cast(pa.schema([
            ("entity_id", pa.string()), ("name", pa.string()), ("aliases", pa.list_(pa.string())), ("deleted", pa.bool_())]))
        for column in ("name", "aliases"):  # undecodable text: the entity is skipped by the build (mark_bad_text)
            rows = bad_utf8_rows(t.column(column))
            if rows:
                log.warning("%s: %d KB row(s) with a %s that is not valid UTF-8 (first: row %d): left out of the "
                            "aliases%s", uri, len(rows), column, rows[0], " and the index" if column == "name" else "")
                t = t.set_column(t.column_names.index(column), column, without_rows(t.column(column), rows))
        tables.append(t)
    table = pa.concat_tables(tables)
    check_unique_ids(table, "KB", files[0] if len(files) == 1 else f"{len(files)} KB files")
    if not update and table.num_rows == 0:
        raise ValueError(f"{files[0]}: the KB is empty")
    return table


def alias_pairs(identity: pa.Table) -> pa.Table:
    """(alias, entity_id) rows: each entity's normalised name and aliases (for mention detection)."""
    from otmel.linking.mention_detection import normalize

    aliases, ids = [], []
    for eid, name, extra in zip(identity.column("entity_id").to_pylist(), identity.column("name").to_pylist(),
                                identity.column("aliases").to_pylist()):
        seen = set()
        for a in [name, *(extra or [])]:
            n = normalize(a or "")
            if n and n not in seen:
                seen.add(n)
                aliases.append(n)
                ids.append(eid)
    return pa.table({"alias": pa.array(aliases, pa.string()), "entity_id": pa.array(ids, pa.string())})


# ---------------------------------------------------------------------------- encoding
def preprocess_entities(batch: dict, preprocessor, image_policy, bad_image: str, transform: str = "cpu") -> dict:
    from otmel.jobs.common import Preprocess

    return Preprocess(preprocessor, "entity", image_policy, bad_image, transform)(batch)


def mark_bad_text(batch: pa.Table) -> pa.Table:
    """Ray Data step on Arrow batches, before any value becomes a Python string: a KB row whose
    name or attributes are not valid UTF-8 (Parquet stores what its writer gave it) keeps its id,
    loses that text and carries the reason in ``error``; the preprocess step then skips it and
    the build counts it in the manifest (``skipped``: ``bad_text``), as it does empty names.
    One such row used to fail the whole build."""
    from otmel.data.schemas import bad_utf8_rows, without_rows

    bad: dict[int, list[str]] = {}
    for name in ("name", "attributes"):
        if name in batch.column_names:
            rows = bad_utf8_rows(batch.column(name))
            for i in rows:
                bad.setdefault(i, []).append(name)
            if rows:
                batch = batch.set_column(batch.column_names.index(name), name, without_rows(batch.column(name), rows))
    reasons = [f"bad_text: {' and '.join(bad[i])} not valid UTF-8" if i in bad else None for i in range(batch.num_rows)]
    return batch.append_column("error", pa.array(reasons, pa.string()))


def rows_of_shards(batch: pa.Table, shards: frozenset, num_shards: int) -> pa.Table:
    """The KB rows that hash to ``shards`` (a rebuild of lost shards encodes only theirs), on
    Arrow batches: the columns keep their types (through NumPy, a column of nulls came back
    as NaN, which the next step read as an error on every row, and the rebuilt shard was empty)."""
    from otmel.linking.entity_index import shard_of

    keep = np.isin(shard_of(batch.column("entity_id").to_pylist(), num_shards), list(shards))
    return batch.filter(pa.array(keep))


#: Parquet footers one of Ray Data's footer-reader actors has in flight at once (Ray's default
#: I/O concurrency per reader, RAY_DATA_PARQUET_FOOTER_IO_CONCURRENCY)
FOOTERS_PER_READER = 128
#: Ray Data's own number of footer readers, the most asked
MAX_FOOTER_READERS = 32
#: the one way to size Ray Data's footer-reader pool, read when ``read_parquet`` is called
FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def footer_readers(n_files: int) -> int:
    """Footer-reader actors to list ``n_files`` KB files: one per FOOTERS_PER_READER files, at
    most Ray Data's default."""
    return max(1, min(MAX_FOOTER_READERS, -(-n_files // FOOTERS_PER_READER)))


@contextlib.contextmanager
def footer_readers_for(n_files: int):
    """Size the footer-reader pool of the ``ray.data.read_parquet`` called inside to the KB.

    Ray Data 2.60 lists Parquet files through a pool of footer-reader actors, 32 of them
    whatever the number of files, each a Ray worker process that imports Ray Data. A KB is a
    few files: on one machine the 32 made an index build of a one-file KB take 6 s and 12
    CPU-s against 3 s and 6 with one (same-time runs, tests/README.md). It is set through
    FOOTER_READERS_ENV for the call only; a value the user set is kept."""
    if FOOTER_READERS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_READERS_ENV] = str(footer_readers(n_files))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_READERS_ENV, None)


def encoded_entities(cfg: IndexConfig, files: list[str], preprocessor, use_gpu: bool,
                     only_shards: tuple[frozenset, int] | None = None):
    """A Ray Data dataset of (entity_id, ok, error, stored features) for the KB files
    (``only_shards``: (shard numbers, number of shards) to encode only their rows)."""
    import ray.data

    from otmel.linking.entity_index import STORED_FEATURES
    from otmel.linking.image_fetch import ImagePolicy
    from otmel.jobs.common import encode_step, image_transform
    from otmel.io.storage import resolve

    transform = image_transform(cfg.image_transform, use_gpu)
    fs, _ = resolve(files[0], cfg.s3_endpoint)
    paths = [resolve(f, cfg.s3_endpoint)[1] for f in files]
    policy = ImagePolicy(allowed_prefixes=tuple(cfg.allow_image_prefix), allow_private_hosts=cfg.allow_private_hosts,
                         s3_endpoint=cfg.s3_endpoint)
    columns = ["entity_id", "name", "attributes", "image", "image_uri"]
    with footer_readers_for(len(paths)):
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=None, num_cpus=0.25)
    ds = ds.select_columns([c for c in columns if c in ds.schema().names])
    ds = ds.map_batches(mark_bad_text, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    if only_shards is not None:
        ds = ds.map_batches(rows_of_shards, batch_format="pyarrow", batch_size=None, num_cpus=0.1,
                            fn_kwargs={"shards": only_shards[0], "num_shards": only_shards[1]})
    # preprocessing on CPU tasks, never fused into the encode actors (encode_step)
    ds = ds.map_batches(preprocess_entities, batch_size=cfg.batch_size, num_cpus=0.25,
                        fn_kwargs={"preprocessor": preprocessor, "image_policy": policy, "bad_image": "text",
                                   "transform": transform})
    return encode_step(ds, cfg, STORED_FEATURES, use_gpu, transform)


#: CPU share of a shard-builder actor (S of them run beside the encode pool)
BUILDER_CPUS = 0.05


class ShardBuilder:
    """One shard being built, behind a Ray actor: appended rows go to its node's local disk;
    :meth:`close` writes FAISS and the ids, uploads the shard to ``INDEX/dir_name`` and verifies
    the uploaded files' sha256.

    ``keep_from`` (update): ``(shard URI, manifest entry, manifest, changed ids)``: the old
    shard's rows whose ids did not change are copied in first, chunk by chunk.
    """

    def __init__(self, name: str, dir_name: str, out: str, key: KeyPlan, s3_endpoint: str | None = None,
                 keep_from: tuple | None = None):
        from otmel.linking.entity_index import ShardWriter, iter_shard_rows
        from otmel.io.storage import actor_scratch_key, local_copy, scratch_dir

        self.out, self.s3_endpoint = out, s3_endpoint
        self.appended = 0  # rows routed to this actor (a restarted actor starts again from 0)
        self.seen: set[str] = set()  # ids appended (the KB's ids are unique: checked before any work)
        self.repeated = 0  # rows sent again by a retried routing task (its node died after sending)
        # the shard is written under a scratch dir of this actor's, removed once uploaded
        self.scratch = scratch_dir(f"otmel-build-{name}-", actor_scratch_key())
        self.writer = ShardWriter(self.scratch / dir_name, name, key.feature_dtype, key.missing_image, key.in_faiss)
        if keep_from is not None:
            uri, entry, manifest, changed = keep_from
            with local_copy(uri, s3_endpoint) as old_dir:
                for ids, feats in iter_shard_rows(Path(old_dir), entry, manifest):  # kept rows, chunk by chunk
                    keep = np.array([e not in changed for e in ids], dtype=bool)
                    self.writer.append([e for e, k in zip(ids, keep) if k], {k: v[keep] for k, v in feats.items()})

    def append(self, entity_ids: list[str], features: dict[str, np.ndarray]) -> int:
        """Append a batch's rows; rows already appended (a routing task retried after its
        node died re-sends its batches) are counted and dropped."""
        fresh = [i for i, e in enumerate(entity_ids) if e not in self.seen]
        self.repeated += len(entity_ids) - len(fresh)
        if fresh:
            ids = [entity_ids[i] for i in fresh]
            self.seen.update(ids)
            self.writer.append(ids, {k: v[fresh] for k, v in features.items()} if len(fresh) < len(entity_ids)
                               else features)
        self.appended += len(fresh)
        return len(fresh)

    def close(self, factory: str, train_size: int, shapes: dict) -> tuple[dict, list[str], int]:
        """Build, upload and verify: (the shard's manifest entry with its files' sizes, its
        ids, the rows routed to this actor)."""
        import shutil

        from otmel.io.storage import sha256_of
        from otmel.io.storage import join, upload_dir

        entry = self.writer.close(factory, train_size, shapes)
        entry["sizes"] = {name: (self.writer.directory / name).stat().st_size for name in entry["files"]}
        uri = join(self.out, entry["dir"])
        upload_dir(self.writer.directory, uri, self.s3_endpoint)
        for name, digest in entry["files"].items():  # what storage holds, read back
            if sha256_of(join(uri, name), self.s3_endpoint) != digest:
                raise IOError(f"{join(uri, name)}: the uploaded file's sha256 differs from the one written")
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.repeated:
            log.info("%s: %d rows sent twice by retried routing tasks were kept once", entry["name"], self.repeated)
        return entry, list(self.writer.ids), self.appended


def start_builders(plan: list[tuple[str, str, tuple | None]], cfg: IndexConfig, key: KeyPlan,
                   use_gpu: bool) -> list:
    """One :class:`ShardBuilder` actor per (shard name, directory name, keep_from)."""
    import ray

    # builders mostly wait on appends (the FAISS build at close is short next to encoding): a
    # small CPU share, spread over the nodes so their disks and NICs share the shards
    # restarted when their node dies (calls retried): a restarted builder has lost the rows
    # it held, which its row count shows, and its shard is rebuilt (build_shards)
    remote = ray.remote(ShardBuilder).options(num_cpus=BUILDER_CPUS, num_gpus=0.25 if use_gpu else 0,
                                              scheduling_strategy="SPREAD", max_restarts=-1, max_task_retries=-1)
    return [remote.remote(name, dir_name, cfg.out, key, cfg.s3_endpoint, keep) for name, dir_name, keep in plan]


def route_to_shards(batch: dict[str, np.ndarray], builders: dict, num_shards: int,
                    deleted: frozenset = frozenset()) -> dict[str, np.ndarray]:
    """Ray Data step: each encoded row to the builder of its shard (``builders``: shard number
    -> actor; rows of other shards are ignored); returns counts only (rows, skipped reasons)."""
    import ray

    from otmel.linking.entity_index import STORED_FEATURES, shard_of

    ids = [str(e) for e in batch["entity_id"]]
    ok = np.asarray(batch["ok"], dtype=bool)
    skipped = Counter(str(batch["error"][i]).split(":")[0] for i in np.flatnonzero(~ok))
    keep = np.array([ok[i] and ids[i] not in deleted for i in range(len(ids))], dtype=bool)
    shard = shard_of(ids, num_shards)
    acks, routed = [], {}
    for s in np.unique(shard[keep]):
        if int(s) in builders:
            sel = np.flatnonzero(keep & (shard == s))
            acks.append(builders[int(s)].append.remote([ids[i] for i in sel], {k: batch[k][sel] for k in STORED_FEATURES}))
            routed[int(s)] = len(sel)
    ray.get(acks)  # back-pressure: a batch is done once its builders hold it
    return {"rows": np.array([len(ids)], dtype=np.int64), "skipped": np.array([json.dumps(skipped)], dtype=object),
            "routed": np.array([json.dumps(routed)], dtype=object)}


def route(ds, builders: dict, num_shards: int, deleted: frozenset = frozenset()) -> tuple[int, Counter, Counter]:
    """Run the pipeline into the builders: (rows seen, skipped rows by reason, rows routed
    per shard), counts only."""
    ds = ds.map_batches(route_to_shards, batch_size=None, num_cpus=0.1,
                        fn_kwargs={"builders": builders, "num_shards": num_shards, "deleted": frozenset(deleted)})
    seen, skipped, routed = 0, Counter(), Counter()
    for meta in ds.iter_batches(batch_size=None, batch_format="numpy"):
        seen += int(meta["rows"].sum())
        for s in meta["skipped"]:
            skipped.update(json.loads(s))
        for r in meta["routed"]:
            routed.update({int(k): v for k, v in json.loads(r).items()})
    return seen, skipped, routed


#: passes over the KB for shards whose builder was lost (its node died) before they are given up
SHARD_ATTEMPTS = 3


def build_shards(cfg: IndexConfig, plan: dict[int, tuple], files: list[str], preprocessor, use_gpu: bool,
                 num_shards: int, key: KeyPlan, shapes: dict,
                 deleted: frozenset = frozenset(), encode: bool = True) -> tuple[list[dict], set[str], int, Counter]:
    """Encode the KB into one builder per planned shard (``plan``: shard number -> (name,
    directory name, keep_from)) and close them; a shard whose builder lost rows (its node died:
    Ray restarts the actor empty) is rebuilt with a new builder from its own KB rows, up to
    :data:`SHARD_ATTEMPTS` passes. Every closed shard is checked on storage: each file of its
    entry with the size it was written with (the sha256 it reports was read back from storage
    by the builder). Returns (manifest entries, indexed ids, KB rows seen, skipped rows by
    reason), counts of the first pass."""
    import ray

    from otmel.jobs.common import end_actors
    from otmel.io.storage import file_sizes, join

    entries, indexed, seen, skipped = {}, set(), 0, Counter()
    expected: Counter = Counter()  # rows routed to each shard by the first pass: what a rebuild must hold
    todo = dict(plan)
    for attempt in range(1, SHARD_ATTEMPTS + 1):
        builders = dict(zip(todo, start_builders(list(todo.values()), cfg, key, use_gpu)))
        routed: Counter = Counter()
        if encode:
            only = None if attempt == 1 else (frozenset(todo), num_shards)
            n, why, routed = route(encoded_entities(cfg, files, preprocessor, use_gpu, only), builders, num_shards,
                                   deleted)
            if attempt == 1:
                seen, skipped, expected = n, why, Counter(routed)
        refs = {s: b.close.remote(key.factory, cfg.train_size, shapes) for s, b in builders.items()}
        lost = []
        for s, ref in refs.items():
            entry, ids, appended = ray.get(ref)
            if appended != routed[s]:
                log.warning("%s: its builder holds %d of the %d rows routed to it (its node was lost?): rebuilding it "
                            "(pass %d)", entry["name"], appended, routed[s], attempt + 1)
                lost.append(s)
                continue
            if encode and routed[s] != expected[s]:
                # a rebuild pass re-encodes the shard's own KB rows: it must route as many as the
                # first pass did (an empty rebuild of a lost shard is a lost shard, not a shard)
                log.warning("%s: rebuilt with %d rows, the first pass routed %d to it: rebuilding it (pass %d)",
                            entry["name"], routed[s], expected[s], attempt + 1)
                lost.append(s)
                continue
            uri = join(cfg.out, entry["dir"])
            on_storage = file_sizes(uri, cfg.s3_endpoint)
            wrong = {n: (on_storage.get(n), size) for n, size in entry["sizes"].items() if on_storage.get(n) != size}
            if wrong or set(entry["files"]) != set(entry["sizes"]):
                raise IOError(f"{uri}: shard files missing or of the wrong size on storage (found, written): {wrong}")
            entries[s] = entry
            indexed.update(ids)
        end_actors(list(builders.values()))  # a lost builder's scratch dir goes too
        if not lost:
            return [entries[s] for s in sorted(entries)], indexed, seen, skipped
        todo = {s: plan[s] for s in lost}
    raise RuntimeError(f"shards {sorted(todo)} lost rows in {SHARD_ATTEMPTS} passes (their nodes kept failing)")


# ---------------------------------------------------------------------------- build / update
def run(cfg: IndexConfig) -> IndexResult:
    return update(cfg) if cfg.update else build(cfg)


def build(cfg: IndexConfig) -> IndexResult:
    from otmel.linking.entity_index import MANIFEST_FILE, STORED_FEATURES, key_dim, load_manifest, new_manifest, shard_name
    from otmel.jobs.common import driver_model, gpu_count, init_ray
    from otmel.io.storage import exists, join, probe_writable

    t0 = time.perf_counter()
    # fail fast, before any work: model loads, KB readable and valid, factory usable, output free
    backend, dims = driver_model(cfg.model, cfg.s3_endpoint)
    files = kb_files(cfg.kb, cfg.s3_endpoint)
    identity = read_kb_identity(files, cfg.s3_endpoint)
    key = KeyPlan.plan(cfg.factory, cfg.feature_dtype, backend.config.get("missing_image", "zeros"),
                       dims["retrieval_key"][0], identity.num_rows // cfg.shards)
    previous = None
    if exists(join(cfg.out, MANIFEST_FILE), cfg.s3_endpoint):
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.out} already holds an index: use --update to change it, --overwrite to replace it")
        previous = load_manifest(cfg.out, cfg.s3_endpoint)
    # over an existing index, new files get new names: the old manifest stays valid (and its
    # files untouched) until the new one replaces it
    suffix = f"-b{uuid.uuid4().hex[:8]}" if previous else ""
    probe_writable(cfg.out, cfg.s3_endpoint, "--out")  # before any work, not when the first shard is uploaded
    init_ray(cfg.address)
    use_gpu = (gpu_count() > 0) if cfg.gpu is None else cfg.gpu
    if cfg.factory == "auto" and use_gpu:  # shards searched by faiss-gpu: a factory it has
        key = KeyPlan.plan(cfg.factory, cfg.feature_dtype, key.missing_image, dims["retrieval_key"][0],
                           identity.num_rows // cfg.shards, gpu=True)
    log.info("indexing %d entities from %d file(s) into %d shard(s) (%s%s, %s features, stage-1 keys %s), model %s",
             identity.num_rows, len(files), cfg.shards, key.factory, " chosen by --factory auto" if cfg.factory == "auto"
             else "", cfg.feature_dtype, "kept in FAISS" if key.in_faiss else "compressed in FAISS, features on disk",
             backend.model_version[:12])
    plan = {s: (shard_name(s), f"{shard_name(s)}{suffix}", None) for s in range(cfg.shards)}
    shard_dims = {k: dims[k] for k in STORED_FEATURES}
    if key_dim(shard_dims, key.missing_image) != dims["retrieval_key"][0]:  # the model and the index agree on k_e
        raise ValueError(f"the model's {dims['retrieval_key'][0]}-dim stage-1 keys do not match its features' layout "
                         f"({key.missing_image}: {key_dim(shard_dims, key.missing_image)})")
    entries, indexed, seen, skipped = build_shards(cfg, plan, files, backend.preprocessor, use_gpu, cfg.shards,
                                                   key, shard_dims)
    if seen != identity.num_rows:
        raise RuntimeError(f"encoded {seen} KB rows, read {identity.num_rows}: rows were lost")
    aliases_name = f"aliases{suffix}.parquet"
    _write_aliases(alias_pairs(identity), indexed, join(cfg.out, aliases_name), cfg.s3_endpoint)
    manifest = new_manifest(cfg.shards, key.factory, cfg.feature_dtype, backend.model_version, shard_dims,
                            entries, cfg.kb, dict(skipped), aliases_name, cfg.nprobe, key.missing_image, key.in_faiss,
                            encoder={"kind": backend.kind, "precision": backend.precision})
    version = _commit_manifest(manifest, cfg.out, cfg.s3_endpoint)
    if previous:
        _delete_unreferenced(previous, manifest, cfg.out, cfg.s3_endpoint)
    if skipped:
        log.warning("KB rows not indexed: %s", dict(skipped))
    log.info("index %s written to %s: %d entities in %d shard(s)", version[:12], cfg.out, manifest["count"], cfg.shards)
    return IndexResult(cfg.out, version, manifest, [e["dir"] for e in manifest["shards"]],
                       round(time.perf_counter() - t0, 2))


def update(cfg: IndexConfig) -> IndexResult:
    """Apply a KB change set to an existing index, rebuilding only the shards it touches."""
    import pyarrow.parquet as pq

    from otmel.linking.entity_index import ALIASES_FILE, check_compatible, index_version_of, load_manifest, shard_of
    from otmel.jobs.common import driver_model, gpu_count, init_ray
    from otmel.io.storage import join, probe_writable, read_bytes

    t0 = time.perf_counter()
    backend, dims = driver_model(cfg.model, cfg.s3_endpoint)
    manifest = load_manifest(cfg.out, cfg.s3_endpoint)
    check_compatible(manifest, backend.model_version, dims["retrieval_key"][0], where=f"index {cfg.out}")
    files = kb_files(cfg.kb, cfg.s3_endpoint)
    changes = read_kb_identity(files, cfg.s3_endpoint, update=True)
    change_ids = changes.column("entity_id").to_pylist()
    deleted = {e for e, d in zip(change_ids, changes.column("deleted").to_pylist()) if d}
    num_shards = manifest["num_shards"]
    touched = sorted({int(s) for s in shard_of(change_ids, num_shards)})
    log.info("update of %s: %d changed entities (%d deletions) touch %d of %d shard(s)", cfg.out,
             len(change_ids), len(deleted), len(touched), num_shards)
    if not touched:
        return IndexResult(cfg.out, index_version_of(manifest), manifest, [], round(time.perf_counter() - t0, 2))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    suffix = f"-u{uuid.uuid4().hex[:8]}"  # unique: never the name of a directory in use
    previous = copy.deepcopy(manifest)  # for deleting what only it referenced, after the commit
    entries = {e["name"]: e for e in manifest["shards"]}
    changed = frozenset(change_ids)
    probe_writable(cfg.out, cfg.s3_endpoint, "--update")
    init_ray(cfg.address)
    use_gpu = (gpu_count() > 0) if cfg.gpu is None else cfg.gpu
    plan = {}
    for s in touched:
        entry = entries[f"shard-{s:05d}"]
        plan[s] = (entry["name"], f"{entry['name']}{suffix}", (join(cfg.out, entry["dir"]), entry, manifest, changed))
    rebuilt, indexed_now, _, skipped = build_shards(cfg, plan, files, backend.preprocessor, use_gpu, num_shards,
                                                    KeyPlan.of(manifest), manifest["dims"],
                                                    deleted, encode=len(deleted) < len(change_ids))
    new_entries = {e["name"]: e for e in rebuilt}
    # aliases: drop the changed entities' rows, add the upserted ones that were indexed
    old_aliases_name = manifest.get("aliases", ALIASES_FILE)
    old_aliases = pq.read_table(pa.BufferReader(read_bytes(join(cfg.out, old_aliases_name), cfg.s3_endpoint)))
    kept_aliases = old_aliases.filter(pa.array([e not in changed for e in old_aliases.column("entity_id").to_pylist()],
                                               pa.bool_()))
    aliases_name = f"aliases{suffix}.parquet"
    new_aliases = alias_pairs(changes)
    new_aliases = new_aliases.filter(pa.array([e in indexed_now for e in new_aliases.column("entity_id").to_pylist()],
                                              pa.bool_()))
    _write_aliases(pa.concat_tables([kept_aliases, new_aliases]), None, join(cfg.out, aliases_name), cfg.s3_endpoint)
    manifest["aliases"] = aliases_name
    manifest["shards"] = [new_entries.get(e["name"], e) for e in manifest["shards"]]
    manifest["count"] = int(sum(e["count"] for e in manifest["shards"]))
    manifest["skipped"] = dict(Counter(manifest.get("skipped", {})) + skipped)
    manifest.setdefault("updates", []).append({"kb": cfg.kb, "at": stamp, "changed": len(change_ids),
                                               "deleted": len(deleted), "shards": [f"shard-{s:05d}" for s in touched]})
    version = _commit_manifest(manifest, cfg.out, cfg.s3_endpoint)
    _delete_unreferenced(previous, manifest, cfg.out, cfg.s3_endpoint)
    log.info("index %s updated to %s: %d entities, rebuilt %s", cfg.out, version[:12], manifest["count"],
             ", ".join(new_entries))
    return IndexResult(cfg.out, version, manifest, sorted(new_entries), round(time.perf_counter() - t0, 2))


def _write_aliases(pairs: pa.Table, indexed: set[str] | None, uri: str, s3_endpoint: str | None) -> None:
    """The alias table (mention detection): the pairs of the entities in ``indexed`` (None: all)."""
    from otmel.io.storage import write_parquet

    if indexed is not None:
        pairs = pairs.filter(pa.array([e in indexed for e in pairs.column("entity_id").to_pylist()], pa.bool_()))
    write_parquet(uri, pairs, s3_endpoint)


def _commit_manifest(manifest: dict, out: str, s3_endpoint: str | None) -> str:
    """Write manifest.json to OUT last: the index exists (and switches version) only now."""
    from otmel.linking.entity_index import MANIFEST_FILE, index_version_of
    from otmel.io.storage import join, write_bytes

    write_bytes(join(out, MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=True).encode(), s3_endpoint)
    return index_version_of(manifest)


def _delete_unreferenced(previous: dict, current: dict, out: str, s3_endpoint: str | None) -> None:
    """After a commit, delete what only the previous manifest referenced (shard dirs, aliases)."""
    from otmel.linking.entity_index import ALIASES_FILE
    from otmel.io.storage import StorageError, delete_dir, delete_file, join

    keep = {e["dir"] for e in current["shards"]}
    stale = [join(out, e["dir"]) for e in previous.get("shards", []) if e["dir"] not in keep]
    old_aliases = previous.get("aliases", ALIASES_FILE)
    for uri in stale:
        try:
            delete_dir(uri, s3_endpoint)
        except StorageError as exc:  # garbage left behind is harmless: log it
            log.warning("could not delete replaced shard %s: %s", uri, exc)
    if old_aliases != current.get("aliases", ALIASES_FILE):
        try:
            delete_file(join(out, old_aliases), s3_endpoint)
        except StorageError as exc:
            log.warning("could not delete the replaced alias table %s: %s", old_aliases, exc)


def summary_line(result: IndexResult) -> str:
    m = result.manifest
    skipped = sum(m.get("skipped", {}).values())
    return (f"index {result.index_version[:12]} at {result.uri}: {m['count']} entities in {m['num_shards']} shard(s) "
            f"({m['factory']}, {m['feature_dtype']} features), {skipped} KB row(s) skipped"
            f"{' ' + json.dumps(m['skipped']) if skipped else ''}; wrote {len(result.shards_written)} shard(s) "
            f"in {result.seconds:.1f} s")
