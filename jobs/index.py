"""Build or update the sharded entity index (``otmel index``) on Ray Data.

    otmel index --model MODEL_URI --kb KB_URI --out INDEX_URI --shards S [--factory FAISS_FACTORY]
                [--feature-dtype fp16|fp32] [--address ADDR]
    otmel index --update INDEX_URI --kb CHANGED_KB_URI --model MODEL_URI

Build: Ray Data reads the KB (Parquet: a file, a directory or a glob), preprocesses it on CPU
tasks, encodes the entities in an actor pool (ONNX Runtime or PyTorch, GPU when present), and
the driver streams the encoded rows into S shard writers (``otmel.entity_index``): FAISS over
the stage-1 keys, entity ids, memory-mapped features. Shards are written locally, uploaded,
and ``manifest.json`` is written LAST: an interrupted build leaves no manifest, so nothing
will ever load half an index.

Update: the changed KB holds new entities and new versions of existing ones (by entity_id);
a boolean ``deleted`` column marks removals. Only the shards those ids hash to are rebuilt
(kept rows' stored features + the newly encoded rows) into new shard directories; the new
manifest then switches to them, and the replaced directories are deleted afterwards. Shards
not touched keep their files and checksums.

KB rows that cannot be indexed (empty name) are skipped and counted in the manifest; an image
that cannot be fetched or decoded indexes the entity on its text (counted).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
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
    factory: str = "Flat"  # FAISS index factory string (inner product)
    feature_dtype: str = "fp16"  # fp16 | fp32 for the reranking features
    update: bool = False
    overwrite: bool = False  # replace an existing index at OUT
    workers: int = 1  # encode actors
    batch_size: int = 64
    cpus_per_actor: float = 0.5  # fractional: leaves room for Ray Data's read tasks on small machines
    gpu: bool | None = None  # None = use a GPU per encode actor when the cluster has one
    train_size: int = 100_000  # vectors sampled to train IVF/PQ factories
    nprobe: int = 32  # IVF lists scanned per query (stored in the manifest; ignored by Flat/HNSW)
    address: str | None = None
    s3_endpoint: str | None = None
    allow_image_prefix: list[str] = field(default_factory=list)  # local image_uri roots allowed
    allow_private_hosts: bool = False  # http(s) image_uri on private/loopback addresses

    def __post_init__(self):
        if self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
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


# ---------------------------------------------------------------------------- KB input
def kb_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """The Parquet files of a KB URI (file, directory or glob); clear error if none."""
    from otmel.link_input import list_input_files

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

    from otmel.schemas import REQUIRED, SchemaError, check_unique_ids
    from otmel.storage import resolve

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
        tables.append(t.select(["entity_id", "name", "aliases", "deleted"]).cast(pa.schema([
            ("entity_id", pa.string()), ("name", pa.string()), ("aliases", pa.list_(pa.string())), ("deleted", pa.bool_())])))
    table = pa.concat_tables(tables)
    check_unique_ids(table, "KB", files[0] if len(files) == 1 else f"{len(files)} KB files")
    if not update and table.num_rows == 0:
        raise ValueError(f"{files[0]}: the KB is empty")
    return table


def alias_pairs(identity: pa.Table) -> pa.Table:
    """(alias, entity_id) rows: each entity's normalised name and aliases (for mention detection)."""
    from otmel.mention_detection import normalize

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
def preprocess_entities(batch: dict, preprocessor, image_policy, bad_image: str) -> dict:
    from otmel.jobs.common import Preprocess

    return Preprocess(preprocessor, "entity", image_policy, bad_image)(batch)


def encoded_entities(cfg: IndexConfig, files: list[str], preprocessor):
    """A Ray Data dataset of (entity_id, ok, error, stored features) for the KB files."""
    import ray.data

    from otmel.entity_index import STORED_FEATURES
    from otmel.image_fetch import ImagePolicy
    from otmel.jobs.common import Encode, gpu_count
    from otmel.storage import resolve

    fs, _ = resolve(files[0], cfg.s3_endpoint)
    paths = [resolve(f, cfg.s3_endpoint)[1] for f in files]
    policy = ImagePolicy(allowed_prefixes=tuple(cfg.allow_image_prefix), allow_private_hosts=cfg.allow_private_hosts,
                         s3_endpoint=cfg.s3_endpoint)
    use_gpu = (gpu_count() > 0) if cfg.gpu is None else cfg.gpu
    columns = ["entity_id", "name", "attributes", "image", "image_uri"]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=None)
    ds = ds.select_columns([c for c in columns if c in ds.schema().names])
    # preprocessing on CPU tasks (its own resources keep Ray Data from fusing it into the actors)
    ds = ds.map_batches(preprocess_entities, batch_size=cfg.batch_size, num_cpus=0.25,
                        fn_kwargs={"preprocessor": preprocessor, "image_policy": policy, "bad_image": "text"})
    return ds.map_batches(
        Encode, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs={"model_uri": cfg.model, "feature_names": STORED_FEATURES,
                               "s3_endpoint": cfg.s3_endpoint, "threads": 1 if not use_gpu else None})


def stream_into_shards(ds, writers: dict[int, "object"], num_shards: int, skipped: Counter,
                       only: set[int] | None = None, deleted: set[str] = frozenset()) -> int:
    """Append every encoded row to the writer of its shard; count skipped rows by reason."""
    from otmel.entity_index import STORED_FEATURES, shard_of

    n = 0
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        ids = [str(e) for e in batch["entity_id"]]
        ok = np.asarray(batch["ok"], dtype=bool)
        for i in np.flatnonzero(~ok):
            skipped[str(batch["error"][i]).split(":")[0]] += 1
        keep = np.array([ok[i] and ids[i] not in deleted for i in range(len(ids))], dtype=bool)
        shard = shard_of(ids, num_shards)
        for s in np.unique(shard[keep]):
            if only is not None and s not in only:
                continue
            sel = np.flatnonzero(keep & (shard == s))
            writers[int(s)].append([ids[i] for i in sel], {k: batch[k][sel] for k in STORED_FEATURES})
        n += len(ids)
    return n


# ---------------------------------------------------------------------------- build / update
def run(cfg: IndexConfig) -> IndexResult:
    return update(cfg) if cfg.update else build(cfg)


def _load_model(cfg: IndexConfig):
    from otmel.backend import load_backend
    from otmel.jobs.common import probe_model

    backend = load_backend(cfg.model, cfg.s3_endpoint)
    return backend, probe_model(backend)


def build(cfg: IndexConfig) -> IndexResult:
    from otmel.entity_index import (MANIFEST_FILE, STORED_FEATURES, ShardWriter, check_factory, load_manifest, new_manifest,
                                    shard_name)
    from otmel.jobs.common import init_ray
    from otmel.storage import exists, join, upload_dir

    t0 = time.perf_counter()
    # fail fast, before any work: model loads, KB readable and valid, output free
    backend, dims = _load_model(cfg)
    files = kb_files(cfg.kb, cfg.s3_endpoint)
    identity = read_kb_identity(files, cfg.s3_endpoint)
    check_factory(cfg.factory, dims["retrieval_key"][0], identity.num_rows // cfg.shards)
    previous = None
    if exists(join(cfg.out, MANIFEST_FILE), cfg.s3_endpoint):
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.out} already holds an index: use --update to change it, --overwrite to replace it")
        previous = load_manifest(cfg.out, cfg.s3_endpoint)
    # over an existing index, new files get new names: the old manifest stays valid (and its
    # files untouched) until the new one replaces it
    suffix = f"-b{uuid.uuid4().hex[:8]}" if previous else ""
    log.info("indexing %d entities from %d file(s) into %d shard(s) (%s, %s features), model %s",
             identity.num_rows, len(files), cfg.shards, cfg.factory, cfg.feature_dtype, backend.model_version[:12])
    init_ray(cfg.address)
    with tempfile.TemporaryDirectory(prefix="otmel-index-") as tmp:
        tmp = Path(tmp)
        writers = {s: ShardWriter(tmp / f"{shard_name(s)}{suffix}", shard_name(s), cfg.feature_dtype)
                   for s in range(cfg.shards)}
        skipped: Counter = Counter()
        seen = stream_into_shards(encoded_entities(cfg, files, backend.preprocessor), writers, cfg.shards, skipped)
        if seen != identity.num_rows:
            raise RuntimeError(f"encoded {seen} KB rows, read {identity.num_rows}: rows were lost")
        shard_dims = {k: dims[k] for k in STORED_FEATURES}
        entries = [writers[s].close(cfg.factory, cfg.train_size, shard_dims) for s in range(cfg.shards)]
        indexed = {e for w in writers.values() for e in w.ids}
        import pyarrow.parquet as pq

        aliases = alias_pairs(identity)
        aliases = aliases.filter(pa.array([e in indexed for e in aliases.column("entity_id").to_pylist()]))
        aliases_name = f"aliases{suffix}.parquet"
        pq.write_table(aliases, tmp / aliases_name)
        manifest = new_manifest(cfg.shards, cfg.factory, cfg.feature_dtype, backend.model_version, shard_dims,
                                entries, cfg.kb, dict(skipped), aliases_name, cfg.nprobe)
        for w in writers.values():
            upload_dir(w.directory, join(cfg.out, w.directory.name), cfg.s3_endpoint)
        _upload_file(tmp / aliases_name, join(cfg.out, aliases_name), cfg.s3_endpoint)
        version = _commit_manifest(tmp, manifest, cfg.out, cfg.s3_endpoint)
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

    from otmel.entity_index import (ALIASES_FILE, ShardWriter, check_compatible, index_version_of, iter_shard_rows,
                                    load_manifest, shard_of)
    from otmel.jobs.common import init_ray
    from otmel.storage import join, local_copy, read_bytes, upload_dir

    t0 = time.perf_counter()
    backend, dims = _load_model(cfg)
    manifest = load_manifest(cfg.out, cfg.s3_endpoint)
    with tempfile.TemporaryDirectory(prefix="otmel-index-") as tmp:
        tmp = Path(tmp)
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
        writers = {}
        changed = set(change_ids)
        for s in touched:
            name = f"shard-{s:05d}"
            entry = entries[name]
            writer = ShardWriter(tmp / f"{name}{suffix}", name, manifest["feature_dtype"])
            with local_copy(join(cfg.out, entry["dir"]), cfg.s3_endpoint) as old_dir:
                for ids, feats in iter_shard_rows(Path(old_dir), entry, manifest):  # kept rows, chunk by chunk
                    keep = np.array([e not in changed for e in ids], dtype=bool)
                    writer.append([e for e, k in zip(ids, keep) if k], {k: v[keep] for k, v in feats.items()})
            writers[s] = writer
        skipped: Counter = Counter()
        if len(deleted) < len(change_ids):
            init_ray(cfg.address)
            stream_into_shards(encoded_entities(cfg, files, backend.preprocessor), writers, num_shards, skipped,
                               only=set(touched), deleted=deleted)
        new_entries = {}
        for s, writer in writers.items():
            new_entries[writer.name] = writer.close(manifest["factory"], cfg.train_size, manifest["dims"])
            upload_dir(writer.directory, join(cfg.out, writer.directory.name), cfg.s3_endpoint)
        # aliases: drop the changed entities' rows, add the upserted ones that were indexed
        old_aliases_name = manifest.get("aliases", ALIASES_FILE)
        old_aliases = pq.read_table(pa.BufferReader(read_bytes(join(cfg.out, old_aliases_name), cfg.s3_endpoint)))
        indexed_now = {e for w in writers.values() for e in w.ids}
        kept_aliases = old_aliases.filter(pa.array([e not in changed for e in old_aliases.column("entity_id").to_pylist()]))
        new_aliases = alias_pairs(changes)
        new_aliases = new_aliases.filter(pa.array([e in indexed_now for e in new_aliases.column("entity_id").to_pylist()]))
        aliases_name = f"aliases{suffix}.parquet"
        pq.write_table(pa.concat_tables([kept_aliases, new_aliases]), tmp / aliases_name)
        _upload_file(tmp / aliases_name, join(cfg.out, aliases_name), cfg.s3_endpoint)
        manifest["aliases"] = aliases_name
        manifest["shards"] = [new_entries.get(e["name"], e) for e in manifest["shards"]]
        manifest["count"] = int(sum(e["count"] for e in manifest["shards"]))
        manifest["skipped"] = dict(Counter(manifest.get("skipped", {})) + skipped)
        manifest.setdefault("updates", []).append({"kb": cfg.kb, "at": stamp, "changed": len(change_ids),
                                                   "deleted": len(deleted), "shards": [f"shard-{s:05d}" for s in touched]})
        version = _commit_manifest(tmp, manifest, cfg.out, cfg.s3_endpoint)
        _delete_unreferenced(previous, manifest, cfg.out, cfg.s3_endpoint)
    log.info("index %s updated to %s: %d entities, rebuilt %s", cfg.out, version[:12], manifest["count"],
             ", ".join(new_entries))
    return IndexResult(cfg.out, version, manifest, sorted(new_entries), round(time.perf_counter() - t0, 2))


def _upload_file(local: Path, uri: str, s3_endpoint: str | None) -> None:
    from otmel.storage import write_bytes

    write_bytes(uri, Path(local).read_bytes(), s3_endpoint)


def _commit_manifest(tmp: Path, manifest: dict, out: str, s3_endpoint: str | None) -> str:
    """Write manifest.json to OUT last: the index exists (and switches version) only now."""
    from otmel.entity_index import MANIFEST_FILE, write_manifest
    from otmel.storage import join

    version = write_manifest(tmp, manifest)
    _upload_file(tmp / MANIFEST_FILE, join(out, MANIFEST_FILE), s3_endpoint)
    return version


def _delete_unreferenced(previous: dict, current: dict, out: str, s3_endpoint: str | None) -> None:
    """After a commit, delete what only the previous manifest referenced (shard dirs, aliases)."""
    from otmel.entity_index import ALIASES_FILE
    from otmel.storage import StorageError, delete_dir, delete_file, join

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
