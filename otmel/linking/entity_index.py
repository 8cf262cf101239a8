"""The sharded entity index: FAISS stage-1 search + memory-mapped entity features for reranking.
One cohesive thing over ~500 lines: the on-disk format, its writer and its verified reader.

On disk (DESIGN.md "Data contracts", "Sizes")::

    INDEX/manifest.json          shards, counts, dims, factory, model_version, checksums
    INDEX/aliases.parquet        normalised KB names/aliases -> number of entities (mention detection)
    INDEX/shard-00000/index.faiss        FAISS index over the stage-1 keys (inner product)
    INDEX/shard-00000/entity_ids.parquet entity ids, FAISS row i = id i
    INDEX/shard-00000/NAME.bin           one raw C-order array per stored feature: (count, *shape),
                                         dtype from the manifest (fp16 or fp32 floats, bool masks),
                                         read with ``np.memmap`` (no pickle, no header)

An entity lives in shard ``shard_of(entity_id, S)`` (a hash): the shard of an id never moves,
so ``--update`` rewrites only the shards whose entities changed.

**Each value is stored once.** The stage-1 key ``k_e`` is made of the entity's ``fused``,
``text_summary`` and ``vision_summary`` features (``otmel.model.otmel.retrieval_key_of``), so it is
not stored as a file: a shard builds its FAISS keys from those features as stored (fp16 or
fp32). When the FAISS index holds the keys exactly (``Flat``; ``SQfp16`` over fp16 features,
whose values fp16 represents exactly; HNSW over either) those three features are not stored
either: the reranker reconstructs them from FAISS (``Shard.gather``). A lossy index (PQ, SQ8,
...) keeps them as files: its codes are small, and its candidates are re-scored exactly from
them before the rerank (``Shard.search``). The summaries' projections to d are computed by
the matcher (``OTMEL.score``). At ViT-B/32 size (fp16, SQfp16) that is 19.8 KB per entity,
17.3 KB of it the token features (format 1 stored 29.9 KB: the key twice in fp32, the key's
parts a third time, the projections).

``index_version`` = sha256 of the manifest, which lists every file's sha256: two indexes with
the same version hold the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from otmel.io.integrity import sha256_file
from otmel.model.features import ENTITY_FEATURES, KEY_FEATURES, key_features_of, retrieval_key_of

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.parquet"
IDS_FILE = "entity_ids.parquet"
FAISS_FILE = "index.faiss"
FORMAT = "otmel-index/2"
#: what a shard holds per entity: the reranking features (the stage-1 key is built from them;
#: the key's parts, KEY_FEATURES, live in FAISS when it holds the keys exactly)
STORED_FEATURES = ENTITY_FEATURES
FEATURE_DTYPES = ("fp16", "fp32")
#: ``--factory auto`` on CPUs: exact search (SQfp16 / Flat) up to this many entities per shard,
#: IVF-PQ with exact re-scoring above (bench/results/ann.md: a flat scan slows linearly)
AUTO_EXACT_MAX = 50_000
#: ``--factory auto`` with faiss-gpu on the cluster: GPU brute force up to this many per shard
AUTO_GPU_FLAT_MAX = 2_000_000
#: HNSW candidates explored per query (FAISS's efSearch; its default of 16 loses recall; at 1M
#: keys 128 found the exact top-1 in K = 20 for 90.5% of queries, 256 for 94.3%)
DEFAULT_EF_SEARCH = 256
#: lossy indexes: candidates fetched per wanted candidate, re-scored exactly from the stored
#: key features before the rerank (FAISS's IndexRefine "k_factor", on otmel's own files); at 1M
#: keys (IVF1024,PQ76, K = 20) the exact top-1 was kept for 84.8% of queries without, 97.4%
#: with 4, 99.3% with 8, 99.9% with 16 (bench/results/ann.md)
DEFAULT_REFINE = 8


class IndexFormatError(ValueError):
    """An index that cannot be used (missing files, checksum mismatch): one line."""


class IndexMismatchError(IndexFormatError):
    """An index built with another model (version or dims): one line."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_of(entity_ids, num_shards: int) -> np.ndarray:
    """Shard of each entity id: a stable hash (blake2b), independent of row order and process."""
    out = np.empty(len(entity_ids), dtype=np.int64)
    for i, e in enumerate(entity_ids):
        out[i] = int.from_bytes(hashlib.blake2b(str(e).encode(), digest_size=8).digest(), "little") % num_shards
    return out


def storage_dtype(name: str, feature_dtype: str) -> np.dtype:
    """On-disk dtype of a feature: masks stay bool, the rest fp16|fp32."""
    if name in ("text_mask", "vision_mask", "has_image"):
        return np.dtype(bool)
    return np.dtype(np.float16 if feature_dtype == "fp16" else np.float32)


def auto_factory(rows_per_shard: int, key_dim: int, feature_dtype: str, gpu: bool = False) -> str:
    """``--factory auto``: by the entities a shard will hold (bench/results/ann.md: 1M keys of
    the ViT-B/32 width, a regime of near-ties).

    * up to :data:`AUTO_EXACT_MAX` (:data:`AUTO_GPU_FLAT_MAX` with faiss-gpu on the
      cluster): exact search. On CPUs ``SQfp16`` over fp16 features (FAISS stores the keys in
      fp16, which holds fp16 features exactly: half of ``Flat``'s bytes, the same results)
      or ``Flat`` over fp32 ones; with faiss-gpu ``Flat`` (a GPU scans millions of keys per
      query batch; SQfp16 has no GPU version);
    * above: ``IVF{nlist},PQ{m}``, nlist ~ sqrt(n) inverted lists (a power of two, 1,024 to
      65,536), m sub-quantisers of ~16 key dimensions (m bytes per entity in RAM), its
      K x :data:`DEFAULT_REFINE` best candidates re-scored exactly from the stored features:
      at 1M keys 99.3% recall of the exact top-1 in K = 20 at ~670 queries/s on 2 cores
      (a flat scan: 15 queries/s; ``HNSW32,SQfp16``, a ``--factory`` away: 94.3% at
      efSearch 256, ~1,100 queries/s, 2.7 KB of RAM per entity).
    """
    exact = "Flat" if gpu or feature_dtype == "fp32" else "SQfp16"
    if rows_per_shard <= (AUTO_GPU_FLAT_MAX if gpu else AUTO_EXACT_MAX):
        return exact
    nlist = int(min(65536, max(1024, 2 ** round(np.log2(np.sqrt(rows_per_shard))))))
    m = max(d for d in range(1, key_dim // 16 + 1) if key_dim % d == 0)
    return f"IVF{nlist},PQ{m}"


def keeps_keys_exactly(factory: str, key_dim: int, feature_dtype: str) -> bool:
    """Whether an index of ``factory`` gives back (``reconstruct_batch``) the keys of features
    stored as ``feature_dtype`` bit for bit, without training: then the key's features are
    served from FAISS and not stored again. Probed on a few keys with values of that
    precision (Flat, SQfp16 over fp16, HNSW over those: yes; IVF, PQ, SQ8, LSH: no)."""
    index = _index_from_factory(factory, key_dim)
    if not index.is_trained:  # trained codes (IVF, PQ, SQ8) are lossy, or need a direct map to reconstruct
        return False
    probe = np.random.default_rng(0).standard_normal((8, key_dim)).astype(storage_dtype("fused", feature_dtype))
    probe = np.ascontiguousarray(probe, dtype=np.float32)
    try:
        index.add(probe)
        back = index.reconstruct_batch(np.arange(len(probe), dtype=np.int64))
    except RuntimeError:
        return False
    return bool(np.array_equal(back, probe))


# ---------------------------------------------------------------------------- FAISS
def faiss_gpu_count() -> int:
    """GPUs FAISS can use: >0 only with faiss-gpu installed and a visible device."""
    import faiss

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu builds without the GPU symbols
        return 0


def _index_from_factory(factory: str, dim: int):
    """An empty inner-product index from a factory string (a clear error if FAISS rejects it)."""
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS factory {factory!r} is not valid for dimension {dim}: "
                         f"{str(exc).strip().splitlines()[-1]}") from exc


def build_faiss(vectors: np.ndarray, factory: str = "Flat", train_size: int = 100_000, seed: int = 0):
    """An inner-product FAISS index over ``vectors (N, R) float32`` from a factory string.

    Factories that need training (IVF, PQ, ...) are trained on a random sample of at most
    ``train_size`` vectors; too few vectors for the factory is a clear error. With faiss-gpu
    and a visible GPU the IVF coarse quantiser's k-means runs on the GPU (:func:`train_on_gpu`);
    the index itself is built and written on the CPU.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = _index_from_factory(factory, vectors.shape[1])
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if len(vectors) <= train_size else vectors[rng.choice(len(vectors), train_size, replace=False)]
        if faiss_gpu_count() > 0:
            train_on_gpu(index)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(f"FAISS factory {factory!r} cannot be trained on {len(sample)} vectors "
                             f"(use a smaller factory or Flat for small shards): "
                             f"{str(exc).strip().splitlines()[-1]}") from exc
    if len(vectors):
        index.add(vectors)
    return index


def check_factory(factory: str, dim: int, rows_per_shard: int) -> None:
    """Fail fast (before any encoding) on a factory string FAISS rejects, or one whose IVF
    lists outnumber the vectors a shard will have to train them."""
    import faiss

    index = _index_from_factory(factory, dim)
    if index.is_trained:
        return
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index (e.g. PQ alone): training checked at build
        return
    if rows_per_shard < nlist:
        raise ValueError(f"FAISS factory {factory!r} cannot be trained: {nlist} inverted lists need at least "
                         f"{nlist} vectors per shard, a shard will hold about {rows_per_shard} "
                         "(use fewer lists, fewer shards, or Flat)")


def train_on_gpu(index) -> bool:
    """Point an IVF index's training k-means at a GPU flat index (the FAISS recipe: the
    clustering's nearest-centroid searches, nearly all of the training time, run on GPU 0).
    Returns False for factories without inverted lists (trained on the CPU)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    resources = faiss.StandardGpuResources()
    flat = faiss.IndexFlatIP(ivf.d) if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(ivf.d)
    ivf.clustering_index = faiss.index_cpu_to_gpu(resources, 0, flat)
    ivf._otmel_gpu_resources = resources  # kept alive as long as the index
    return True


def to_gpu(index):
    """The index on GPU 0 when faiss-gpu sees one and has a GPU version of it (Flat, IVF);
    else unchanged (HNSW and the non-IVF scalar quantisers are searched on the CPU)."""
    if faiss_gpu_count() == 0:
        return index
    import faiss

    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except RuntimeError as exc:  # FAISS: "not implemented for GPU" and the like
        log.warning("FAISS %s has no GPU version (%s): searched on the CPU", type(faiss.downcast_index(index)).__name__,
                    str(exc).strip().splitlines()[-1])
        return index


# ---------------------------------------------------------------------------- writing
@dataclass
class ShardWriter:
    """Streams one shard's entities to local files; :meth:`close` builds FAISS and checksums.

    Features are appended to raw files as they arrive (memory stays at one batch, plus the
    fp32 stage-1 keys FAISS needs at close, built from the features as stored). With
    ``key_in_faiss`` the key's features (:data:`otmel.model.otmel.KEY_FEATURES`) get no file: the
    index gives them back. At close the rows are put in entity-id order, so a shard's files
    depend only on its entities, not on the order they arrived in (parallel writers, cluster
    shapes); two rows with one entity id are refused.
    """

    directory: Path  # where the files go (its name is the shard's dir in the manifest)
    name: str  # shard-NNNNN: the shard's identity (its hash bucket)
    feature_dtype: str = "fp16"
    missing_image: str = "zeros"  # the model's key layout (otmel.model.otmel.retrieval_key_of)
    key_in_faiss: bool = False  # the FAISS index holds the keys exactly (keeps_keys_exactly)
    count: int = 0
    ids: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    _files: dict = field(default_factory=dict)
    _keys: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def file_features(self) -> tuple[str, ...]:
        """The features this shard stores as files."""
        return tuple(n for n in STORED_FEATURES if not (self.key_in_faiss and n in KEY_FEATURES))

    def append(self, entity_ids: list[str], features: dict[str, np.ndarray]) -> None:
        if not entity_ids:
            return
        stored = {}
        for name in STORED_FEATURES:
            arr = np.ascontiguousarray(features[name], dtype=storage_dtype(name, self.feature_dtype))
            if arr.shape[0] != len(entity_ids):
                raise ValueError(f"feature {name} has {arr.shape[0]} rows for {len(entity_ids)} ids")
            shape = list(arr.shape[1:])
            if self.shapes.setdefault(name, shape) != shape:
                raise ValueError(f"feature {name}: shape {shape} differs from earlier rows' {self.shapes[name]}")
            stored[name] = arr
        for name in self.file_features:
            if name not in self._files:
                self._files[name] = open(self.directory / f"{name}.bin", "wb")
            self._files[name].write(stored[name].tobytes())
        self._keys.append(retrieval_key_of(stored["fused"], stored["text_summary"], stored["vision_summary"],
                                           stored["has_image"], self.missing_image))
        self.ids.extend(entity_ids)
        self.count += len(entity_ids)

    def close(self, factory: str, train_size: int = 100_000, shapes: dict[str, list[int]] | None = None) -> dict:
        """Write the FAISS index and ids; return this shard's manifest entry.

        ``shapes`` gives the feature shapes of an empty shard (no rows arrived to tell them).
        """
        import faiss

        for f in self._files.values():
            f.close()
        self._files.clear()
        if shapes:
            for name, shape in shapes.items():
                self.shapes.setdefault(name, list(shape))
        for name in self.file_features:  # an empty shard still has (empty) feature files
            (self.directory / f"{name}.bin").touch()
        R = key_dim(self.shapes, self.missing_image)
        keys = np.concatenate(self._keys) if self._keys else np.zeros((0, R), np.float32)
        self._keys.clear()
        order = self._sort_by_id()
        keys = keys[order] if order is not None else keys
        index = build_faiss(keys, factory if len(keys) else "Flat", train_size)
        if self.key_in_faiss and len(keys):  # what the reranker will read back: the keys, bit for bit
            back = index.reconstruct_batch(np.arange(len(keys), dtype=np.int64))
            if not np.array_equal(back, keys):
                raise RuntimeError(f"{self.name}: FAISS {factory!r} did not keep the stage-1 keys exactly")
        faiss.write_index(index, str(self.directory / FAISS_FILE))
        pq.write_table(pa.table({"entity_id": pa.array(self.ids, pa.string())}), self.directory / IDS_FILE)
        files = {p.name: sha256_file(p) for p in sorted(self.directory.iterdir()) if p.is_file()}
        return {"name": self.name, "dir": self.directory.name, "count": self.count, "files": files}

    def _sort_by_id(self, chunk: int = 65536) -> np.ndarray | None:
        """Rewrite the feature files in entity-id order; the permutation (None: already sorted)."""
        ids = np.asarray(self.ids, dtype=str)
        order = np.argsort(ids, kind="stable")
        dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        if len(dup):
            raise ValueError(f"{self.name}: entity_id {ids[order][dup[0]]!r} appears more than once (ids must be unique)")
        if np.array_equal(order, np.arange(len(order))):
            return None
        for name in self.file_features:
            path = self.directory / f"{name}.bin"
            dtype = storage_dtype(name, self.feature_dtype)
            rows = np.memmap(path, dtype=dtype, mode="r", shape=(self.count, *self.shapes[name]))
            tmp = path.with_suffix(".sorted")
            with open(tmp, "wb") as out:
                for start in range(0, len(order), chunk):  # a chunk of rows in memory at a time
                    out.write(np.ascontiguousarray(rows[order[start:start + chunk]]).tobytes())
            del rows
            tmp.replace(path)
        self.ids = ids[order].tolist()
        return order


def key_dim(shapes: dict[str, list[int]], missing_image: str) -> int:
    """Width R of the stage-1 key for entity feature shapes (``otmel.model.otmel.retrieval_key_of``)."""
    d2, P = shapes["fused"][0], shapes["text_summary"][0]
    return d2 + 2 * P if missing_image == "zeros" else 3 * (d2 // 2 + P)


def index_version_of(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def new_manifest(num_shards: int, factory: str, feature_dtype: str, model_version: str, dims: dict,
                 shards: list[dict], kb: str, skipped: dict, aliases: str = ALIASES_FILE, nprobe: int = 32,
                 missing_image: str = "zeros", key_in_faiss: bool = False, refine: int = DEFAULT_REFINE,
                 encoder: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "model_version": model_version,
        "encoder": encoder or {},  # the backend that encoded the entities: kind (onnx | torch), precision
        "factory": factory,
        "feature_dtype": feature_dtype,
        "metric": "inner_product",
        "num_shards": num_shards,
        "count": int(sum(s["count"] for s in shards)),
        "dims": dims,  # stored feature name -> per-entity shape
        "retrieval_dim": key_dim(dims, missing_image),
        # the stage-1 key: its layout (the model's missing_image) and whether FAISS holds it exactly
        "retrieval_key": {"layout": missing_image, "in_faiss": bool(key_in_faiss)},
        "shards": shards,
        "kb": kb,
        "skipped": skipped,  # KB rows not indexed, by reason
        "aliases": aliases,  # the alias table's file (mention detection)
        # FAISS search: IVF lists scanned per query, HNSW candidates explored; lossy indexes:
        # candidates re-scored per one kept
        "search": {"nprobe": int(nprobe), "ef_search": DEFAULT_EF_SEARCH, "refine": 1 if key_in_faiss else int(refine)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------------------- reading
def _parse_manifest(raw: bytes | str, where: str) -> dict:
    manifest = json.loads(raw)
    if manifest.get("format") == "otmel-index/1":
        raise IndexFormatError(f"{where}: an index of format otmel-index/1 (stored the stage-1 key twice); this "
                               f"otmel reads {FORMAT}: rebuild it with otmel index --overwrite")
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{where}: unknown index format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a LOCAL index directory."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise IndexFormatError(f"{directory}: not an otmel index (no {MANIFEST_FILE}; an interrupted build leaves none)")
    return _parse_manifest(path.read_text(), str(path))


def load_manifest(index_uri: str, s3_endpoint: str | None = None) -> dict:
    """The manifest of an index anywhere (local or s3://), read without copying the index."""
    from otmel.io.storage import join, read_bytes

    uri = join(index_uri, MANIFEST_FILE)
    try:
        raw = read_bytes(uri, s3_endpoint)
    except FileNotFoundError:
        raise FileNotFoundError(f"{index_uri}: not an otmel index (no {MANIFEST_FILE}; an interrupted build "
                                "leaves none)") from None
    return _parse_manifest(raw, uri)


def check_compatible(manifest: dict, model_version: str, retrieval_dim: int | None = None, where: str = "index") -> None:
    """Refuse an index built with another model (DESIGN.md): one clear line."""
    if manifest["model_version"] != model_version:
        raise IndexMismatchError(
            f"{where} was built with model_version {manifest['model_version'][:12]}, but the model is "
            f"{model_version[:12]}: rebuild the index with this model (otmel index)")
    if retrieval_dim is not None and manifest["retrieval_dim"] != retrieval_dim:
        raise IndexMismatchError(f"{where} has {manifest['retrieval_dim']}-dim retrieval vectors, the model "
                                 f"produces {retrieval_dim}")


class Shard:
    """One shard opened for search: FAISS in RAM (GPU when present), features memory-mapped.

    ``directory`` holds the shard's files (``entry["dir"]`` under the index, or a local copy).
    ``features`` holds the memory-mapped files; the key's features of an index that keeps its
    keys in FAISS come from :meth:`key_features` (``gather`` serves every feature alike).
    """

    def __init__(self, directory: str | Path, entry: dict, manifest: dict, verify: bool = False, use_gpu: bool = True):
        import faiss

        self.directory = Path(directory)
        self.name = entry["name"]
        if verify:
            for fname, digest in entry["files"].items():
                p = self.directory / fname
                if not p.is_file() or sha256_file(p) != digest:
                    raise IndexFormatError(f"{p}: missing or checksum mismatch (corrupt or partial copy)")
        self.count = int(entry["count"])
        self.entity_ids = np.asarray(pq.read_table(self.directory / IDS_FILE).column("entity_id").to_pylist(), dtype=object)
        index = faiss.read_index(str(self.directory / FAISS_FILE))
        search = manifest.get("search", {})
        nprobe = search.get("nprobe")
        if nprobe:
            try:  # IVF indexes scan nprobe lists per query (FAISS's default of 1 ruins recall)
                faiss.extract_index_ivf(index).nprobe = int(nprobe)
            except RuntimeError:  # Flat, HNSW, PQ: no inverted lists
                pass
        hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
        if hnsw is not None:  # graph indexes explore efSearch candidates per query
            hnsw.efSearch = int(search.get("ef_search", DEFAULT_EF_SEARCH))
        key = manifest["retrieval_key"]
        self.layout, self.key_in_faiss = key["layout"], bool(key["in_faiss"])
        self.refine = int(search.get("refine", 1))
        self.feature_dtype = manifest["feature_dtype"]
        self.fused_dim = int(manifest["dims"]["fused"][0])
        self.cpu_index = index  # reconstructs the keys (a GPU copy searches)
        self.index = to_gpu(index) if use_gpu else index
        if self.index.ntotal != self.count or len(self.entity_ids) != self.count:
            raise IndexFormatError(f"{self.directory}: {self.index.ntotal} vectors / {len(self.entity_ids)} ids, "
                                   f"manifest says {self.count}")
        self.features: dict[str, np.ndarray] = {}
        for name in STORED_FEATURES:
            if self.key_in_faiss and name in KEY_FEATURES:
                continue
            shape = (self.count, *manifest["dims"][name])
            dtype = storage_dtype(name, manifest["feature_dtype"])
            if self.count == 0:
                self.features[name] = np.zeros(shape, dtype)
            else:
                self.features[name] = np.memmap(self.directory / f"{name}.bin", dtype=dtype, mode="r", shape=shape)

    def key_features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``{fused, text_summary, vision_summary}`` (fp32) of 1-d ``rows``: from the FAISS index
        when it holds the keys exactly, else from the stored files."""
        if self.key_in_faiss:
            keys = self.cpu_index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))  # (n, R)
            return key_features_of(keys, self.fused_dim, self.layout)
        return {n: np.asarray(self.features[n][rows], dtype=np.float32) for n in KEY_FEATURES}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product: (scores (M, k) float32, rows (M, k) int64, -1 = none).

        A lossy index (its keys not kept exactly) returns ``k x refine`` candidates, re-scored
        with the exact key built from the stored features and cut to k: the rerank then sees
        the k best by the exact stage-1 score among them."""
        k = min(k, self.count)
        M = len(queries)
        if k == 0 or M == 0:
            return np.zeros((M, 0), np.float32), np.zeros((M, 0), np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        fetch = min(self.count, k * self.refine) if not self.key_in_faiss else k
        scores, rows = self.index.search(queries, fetch)
        if fetch == k:
            return scores, rows
        flat = np.clip(rows.reshape(-1), 0, None)
        uniq, inverse = np.unique(flat, return_inverse=True)
        f = self.key_features(uniq)
        has_image = np.asarray(self.features["has_image"][uniq], dtype=bool)
        keys = retrieval_key_of(f["fused"], f["text_summary"], f["vision_summary"], has_image, self.layout)
        exact = np.einsum("mr,mkr->mk", queries, keys[inverse].reshape(M, fetch, -1))  # (M, fetch)
        exact = np.where(rows >= 0, exact, -np.inf).astype(np.float32)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(rows, order, 1)

    def gather(self, rows: np.ndarray, names: tuple[str, ...] = ENTITY_FEATURES) -> dict[str, np.ndarray]:
        """Features of ``rows (M, K)`` -> ``{name: (M, K, ...)}``, floats as fp32 (reads only those rows)."""
        flat = np.clip(rows.reshape(-1), 0, max(self.count - 1, 0))
        # memmap fancy indexing reads sorted unique rows once
        uniq, inverse = np.unique(flat, return_inverse=True)
        from_key = self.key_features(uniq) if any(n in KEY_FEATURES for n in names) and self.count else {}
        out = {}
        for name in names:
            block = from_key[name] if name in from_key else np.asarray(self.features[name][uniq])
            if block.dtype == np.float16:
                block = block.astype(np.float32)
            out[name] = block[inverse].reshape(*rows.shape, *block.shape[1:])
        return out

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Every stored feature of rows ``start:stop``, in the stored dtypes (rebuilds, tests)."""
        out = {n: np.asarray(self.features[n][start:stop]) for n in self.features}
        if self.key_in_faiss:
            for n, v in self.key_features(np.arange(start, stop)).items():
                out[n] = v.astype(storage_dtype(n, self.feature_dtype))
        return out


def open_shards(directory: str | Path, verify: bool = False, use_gpu: bool = True) -> tuple[dict, list[Shard]]:
    """Open every shard of a LOCAL index directory."""
    manifest = read_manifest(directory)
    return manifest, [Shard(Path(directory) / s["dir"], s, manifest, verify, use_gpu) for s in manifest["shards"]]


def iter_shard_rows(shard_dir: Path, entry: dict, manifest: dict, chunk: int = 8192):
    """A shard's entities with their stored features, ``chunk`` rows at a time (rebuilding a
    shard on update reads the memory-mapped files piecewise, never the whole shard)."""
    shard = Shard(shard_dir, entry, manifest, verify=True, use_gpu=False)
    for start in range(0, shard.count, chunk):
        stop = min(shard.count, start + chunk)
        yield list(shard.entity_ids[start:stop]), shard.rows(start, stop)
