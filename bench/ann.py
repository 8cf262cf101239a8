"""Stage-1 retrieval past 1M entities: exact vs compressed and graph FAISS indexes, one run.

Synthetic stage-1 keys of the real width (ViT-B/32 size: R = 2d + 2P = 2 x 96 + 2 x 512 =
1,216 under ``missing_image = zeros``) built like the model's: ``k = [g, t, v]`` with unit
summaries t, v (CLIP's) and a fused block g, all from a clustered latent space (entities of
one "topic" are near each other, as real KB entities are; isotropic random vectors would make
every ANN index look hopeless). Queries are mention-side vectors ``q = [g, t/2, v/2] / 3`` of
noisy copies of random entities, so the exact top-1 is mostly, not always, the entity copied.

For every factory: build seconds (training included), bytes per entity of the serialised
index, queries/s at ``--threads`` threads, and recall@K of the EXACT top-1 (by the same inner
product over the uncompressed keys): the share of queries whose exact best entity is among the
K candidates the index returns, which the rerank then scores with the full S_O from the stored
features. For lossy codes (PQ) also with otmel's exact re-scoring of K x ``--refine``
candidates from the stored features (``otmel.linking.entity_index.Shard.search``), which is what the
link job runs for those factories (``search.refine`` in the manifest, 4 by default).

Writes bench/results/ann.md.

    .venv/bin/python bench/ann.py [--entities 1000000] [--queries 1000] [--k 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import time
from pathlib import Path

import numpy as np

#: ViT-B/32 size: d = 96 (OT-MEL), P = 512 (CLIP projection)
D, P = 96, 512


def synthetic_keys(n: int, topics: int, rank: int, noise: float, seed: int, chunk: int = 100_000):
    """``(keys (n, 2d + 2P) float32, latent (n, rank) float32)``: entities of a topic share a
    latent centre; each block is a random projection of the latent plus noise; t and v unit-norm."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, rank)).astype(np.float32)
    proj = {name: rng.standard_normal((rank, width)).astype(np.float32) / np.sqrt(rank)
            for name, width in (("g", 2 * D), ("t", P), ("v", P))}
    keys = np.empty((n, 2 * D + 2 * P), np.float32)
    latent = np.empty((n, rank), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        z = centres[rng.integers(0, topics, stop - start)] + 0.5 * rng.standard_normal((stop - start, rank)).astype(np.float32)
        latent[start:stop] = z
        keys[start:stop] = _vectors(z, proj, noise, rng)
    return keys, latent, proj


def _vectors(z: np.ndarray, proj: dict, noise: float, rng) -> np.ndarray:
    blocks = []
    for name in ("g", "t", "v"):
        b = z @ proj[name]
        b += noise * rng.standard_normal(b.shape).astype(np.float32)
        if name in ("t", "v"):
            b /= np.linalg.norm(b, axis=1, keepdims=True)
        else:
            b *= 0.5 / np.sqrt(np.mean(np.sum(b * b, axis=1)))
        blocks.append(b)
    return np.concatenate(blocks, axis=1)


def mention_queries(latent: np.ndarray, proj: dict, m: int, noise: float, seed: int) -> np.ndarray:
    """Stage-1 mention queries ``[g, t/2, v/2] / 3`` of noisy copies of random entities."""
    rng = np.random.default_rng(seed)
    z = latent[rng.integers(0, len(latent), m)] + 0.3 * rng.standard_normal((m, latent.shape[1])).astype(np.float32)
    v = _vectors(z, proj, noise, rng)
    v[:, 2 * D:] *= 0.5
    return np.ascontiguousarray(v / 3.0)


def exact_top1(keys: np.ndarray, queries: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    best = np.full(len(queries), -np.inf, np.float32)
    arg = np.zeros(len(queries), np.int64)
    for start in range(0, len(keys), chunk):
        s = queries @ keys[start:start + chunk].T
        j = s.argmax(1)
        v = s[np.arange(len(queries)), j]
        better = v > best
        best[better], arg[better] = v[better], j[better] + start
    return arg


def measure(index, queries: np.ndarray, truth: np.ndarray, k: int, keys: np.ndarray | None = None,
            refine: int = 1) -> dict:
    """queries/s and recall@k of the exact top-1; with ``keys`` and ``refine`` > 1, the index's
    top ``k * refine`` re-scored exactly from ``keys`` and cut to k (otmel's Shard.search)."""
    index.search(queries[:16], k * refine)  # warm-up
    t0 = time.perf_counter()
    _, rows = index.search(queries, k * refine)
    if refine > 1:
        safe = np.clip(rows, 0, None)
        exact = np.einsum("mr,mkr->mk", queries, keys[safe])
        exact[rows < 0] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        rows = np.take_along_axis(rows, order, 1)
    seconds = time.perf_counter() - t0
    return {"qps": len(queries) / seconds, "recall": float(np.mean([t in r for t, r in zip(truth, rows)]))}


def serialized_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entities", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--refine", type=int, nargs="+", default=[4, 8, 16],
                    help="candidates fetched per one kept, re-scored exactly (lossy factories)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=100_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ann.md"))
    args = ap.parse_args()
    import faiss

    from otmel.linking.entity_index import auto_factory, build_faiss

    faiss.omp_set_num_threads(args.threads)
    n, R = args.entities, 2 * D + 2 * P
    t0 = time.perf_counter()
    # a hard regime: 1,000 entities per topic and noisy blocks, so the exact best entity of a
    # query beats the next by a median 0.007 of a ~0.22 score (near-ties everywhere)
    keys, latent, proj = synthetic_keys(n, topics=max(16, n // 1000), rank=64, noise=1.0, seed=0)
    queries = mention_queries(latent, proj, args.queries, noise=1.0, seed=1)
    del latent
    truth = exact_top1(keys, queries)
    print(f"keys {keys.shape} and exact top-1 of {len(queries)} queries in {time.perf_counter() - t0:.0f} s", flush=True)
    auto, auto_gpu = auto_factory(n, R, "fp16"), auto_factory(n, R, "fp16", gpu=True)
    ivf = auto if auto.startswith("IVF") else f"IVF{1024},PQ{R // 16}"
    plans = [  # (factory, search settings, re-score from stored features)
        ("Flat", [{}], False),
        ("SQfp16", [{}], False),
        ("HNSW32,SQfp16", [{"efSearch": e} for e in (128, 256)], False),
        (ivf, [{"nprobe": p} for p in (16, 64)], True),
    ]
    rows = []
    for factory, settings, lossy in plans:
        gc.collect()
        t0 = time.perf_counter()
        index = build_faiss(keys, factory, train_size=args.train_size)
        build_s = time.perf_counter() - t0
        size = serialized_bytes(index) / n
        for s in settings:
            if "nprobe" in s:
                faiss.extract_index_ivf(index).nprobe = s["nprobe"]
            if "efSearch" in s:
                faiss.downcast_index(index).hnsw.efSearch = s["efSearch"]
            variants = [("", measure(index, queries, truth, args.k))]
            if lossy:
                variants += [(f" + exact re-score of {r}K", measure(index, queries, truth, args.k, keys, r))
                             for r in args.refine]
            for suffix, r in variants:
                label = ", ".join(f"{k} {v}" for k, v in s.items()) or "-"
                tag = {auto: " (auto)", auto_gpu: " (auto with faiss-gpu)"}.get(factory, "")
                if factory == auto == auto_gpu:
                    tag = " (auto, with or without faiss-gpu)"
                rows.append((factory + tag, label + suffix, build_s, size, r))
                print(rows[-1], flush=True)
        del index
    lines = [
        f"# Stage-1 retrieval at {n:,} entities: exact vs compressed and graph FAISS indexes",
        "",
        f"`.venv/bin/python bench/ann.py --entities {n} --queries {args.queries} --k {args.k}` on "
        f"{platform.machine()}, {os.cpu_count()} cores, FAISS {faiss.__version__} at {args.threads} threads, "
        f"{datetime.date.today()}. Synthetic stage-1 keys of the ViT-B/32 width (R = {R}: fused 192 + text "
        f"summary 512 + image summary 512, clustered); {args.queries} mention queries, each a noisy copy of a "
        f"random entity. Recall@{args.k} = share of queries whose EXACT top-1 (inner product over the "
        "uncompressed keys) is among the candidates; those candidates are then scored with the full S_O from "
        "the stored features, so S_O stays exact for every retrieved pair. Training on a sample of "
        f"{min(n, args.train_size):,} keys.",
        "",
        f"| factory | search | build s | index bytes / entity | queries/s | recall@{args.k} of the exact top-1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for factory, label, build_s, size, r in rows:
        lines.append(f"| `{factory}` | {label} | {build_s:,.0f} | {size:,.0f} | {r['qps']:,.0f} | {100 * r['recall']:.1f}% |")
    lines += ["", "The machine is shared and noisy: compare within one run."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
