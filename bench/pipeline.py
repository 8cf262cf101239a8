"""The link pipeline at tiny and ViT-B/32 size, one run per size: where a mention's time goes,
what the index costs per entity, and the Ray Data link job against its own encoder.

For each size (``--sizes tiny base``; ``--clip DIR`` adds a pretrained CLIP; bench/sizes.py):

1. a KD model of that size (random weights: speed does not depend on them) exported to ONNX
   fp32, a synthetic KB and mentions whose images are 640x480 JPEG photos;
2. ``otmel index`` (2 shards, ``--factory auto``): entities/s, bytes per entity on storage
   (and what format 1, which stored the stage-1 key twice in fp32 plus its parts and the
   projections, would have taken), FAISS bytes in a shard actor's RAM;
3. the time breakdown of linking one batch, in process (each step alone, on the same rows):
   preprocessing (tokenise + decode/resize), encode (ONNX, 2 threads), FAISS stage 1, reading
   the candidates' features, the rerank (the ONNX matcher, 1 thread as in a shard actor), at
   K = 20 and 64 per shard;
4. the link job (``otmel.jobs.link.run``) vs the same pipeline stopped after encoding (read ->
   preprocess -> encode, consumed by the driver), in one local Ray instance: mentions/s of
   whole runs, start-up included (the job's shard actors load while its encode actors do, so
   the job has no start-up the encode-only pipeline has not); the shard actors' private RSS,
   sampled from outside. ``--repeats N`` (default 2) pairs of the two runs in alternating
   order, compared pair by pair: the ratio moves by +-0.1 between runs on a shared 2-core
   machine. Each pipeline also runs on one of the inputs' 4 files: the difference gives its
   rate after start-up (what both runs pay once cancels out). ``--workers POOL [POOL ...]``
   (default ``auto 1``) runs the pairs for each encode pool, both runs of a pair with the same
   pool: ``auto`` (the jobs' default: one single-thread actor per CPU) beside ``1`` (one actor
   running a thread per CPU).

Writes bench/results/pipeline.md.

    .venv/bin/python bench/pipeline.py [--sizes tiny base] [--clip DIR] [--repeats N] [--workers auto 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import sizes as bench_sizes

#: per size: (KB entities, link-job mentions, breakdown batch)
DATA = {"tiny": (2000, 3000, 256), "base": (400, 600, 64), "clip": (400, 600, 64)}


def photos(table: pa.Table, seed: int, size=(640, 480)) -> pa.Table:
    """The table's images as photo-sized JPEGs (quality 90), as a dump of posts would carry."""
    from PIL import Image

    out = []
    for i, data in enumerate(table.column("image").to_pylist()):
        if data is None:
            out.append(None)
            continue
        img = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.BICUBIC)
        noise = np.random.default_rng(seed + i).integers(-12, 13, (size[1], size[0], 3))  # texture, so JPEG works
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return table.set_column(table.column_names.index("image"), "image", pa.array(out, pa.binary()))


def make_inputs(size: str, tmp: Path) -> tuple[Path, Path, pa.Table]:
    from otmel.data.synth import write_synthetic_dataset

    n_entities, n_mentions, _ = DATA[size]
    data = tmp / f"data-{size}"
    write_synthetic_dataset(data, n_entities=n_entities, n_mentions=int(n_mentions / 0.15) + 3, seed=2,
                            image_size=64)
    kb = photos(pq.read_table(data / "kb.parquet"), seed=0)
    pq.write_table(kb, data / "kb.parquet")
    test = photos(pq.read_table(data / "mentions" / "test.parquet"), seed=1).slice(0, n_mentions)
    inputs = tmp / f"mentions-{size}"
    inputs.mkdir()
    per = -(-test.num_rows // 4)
    for i in range(4):
        pq.write_table(test.slice(i * per, per), inputs / f"part-{i}.parquet")
    return data, inputs, test


def format1_bytes(dims: dict, key_dim: int, feature_dtype_bytes: int = 2) -> int:
    """What otmel-index/1 stored per entity: every reranking feature (with the two summary
    projections to d), the fp32 key as a file and again in a Flat FAISS index."""
    d = dims["fused"][0] // 2
    floats = sum(int(np.prod(dims[n])) for n in ("text_query", "vision_query", "text_summary", "vision_summary", "fused"))
    masks = dims["text_mask"][0] + dims["vision_mask"][0] + 1
    return (floats + 2 * d) * feature_dtype_bytes + masks + 2 * 4 * key_dim


def breakdown(onnx_dir: Path, index_dir: Path, test: pa.Table, rows: int, ks=(20, 64)) -> dict:
    """Seconds of each step of linking ``rows`` mentions, each measured alone (median of 3)."""
    from otmel.backend import load_backend
    from otmel.linking.entity_index import open_shards
    from otmel.linking.linker import LINK_MENTION_FEATURES
    from otmel.model.otmel import ENTITY_FEATURES, MENTION_FEATURES
    from otmel.model.preprocessing import MODEL_INPUTS

    def timed(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), fn()

    enc = load_backend(str(onnx_dir), threads=2)
    matcher = load_backend(str(onnx_dir), threads=1, encoder=False)
    _, shards = open_shards(index_dir, use_gpu=False)
    batch = test.slice(0, rows).select(["mention", "text", "image"]).to_pydict()
    out = {}
    out["preprocess"], pre = timed(lambda: enc.preprocessor.mentions(batch))
    inputs = {k: getattr(pre, k) for k in MODEL_INPUTS}
    out["encode"], feats = timed(lambda: enc.encode(inputs, LINK_MENTION_FEATURES))
    m = {n: feats[n] for n in MENTION_FEATURES}
    for k in ks:
        out[f"faiss_{k}"], found = timed(lambda: [s.search(feats["retrieval_query"], k)[1] for s in shards])
        out[f"gather_{k}"], cands = timed(lambda: [s.gather(r, ENTITY_FEATURES) for s, r in zip(shards, found)])
        out[f"rerank_{k}"], _ = timed(lambda: [matcher.score(m, c) for c in cands])
    return out


class ShardMemory:
    """Peak private RSS of this process's Ray workers by kind, sampled in a thread."""

    def __init__(self):
        from otmel.io.worker_memory import WorkerMemory

        self.memory = WorkerMemory(root_pid=os.getpid())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from otmel.io.worker_memory import SAMPLE_EVERY_S

        while not self.stop.is_set():
            self.memory.sample()
            time.sleep(SAMPLE_EVERY_S)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def job(onnx_dir: Path, index_dir: Path, inputs: Path, out: Path, repeats: int = 2, workers: str = "auto") -> dict:
    """The link job and its encode-only pipeline with the encode pool ``workers``, ``repeats``
    pairs in alternating order (the machine's load drifts: each pair is compared within
    itself); per-pair rates and ratios, and their medians."""
    from otmel.backend import load_backend
    from otmel.jobs.link import LinkConfig
    from otmel.jobs.link_pipeline import encoded_mentions
    from otmel.jobs.link import run as link
    from otmel.linking.link_input import list_input_files

    cfg = LinkConfig(model=str(onnx_dir), index=str(index_dir), input=str(inputs), output=str(out), candidates=20,
                     top_k=10, batch_size=64, force=True, workers=workers)
    files = list_input_files(cfg.input)
    pre = load_backend(str(onnx_dir)).preprocessor

    def encode_only(some=files):
        t0 = time.perf_counter()
        n = sum(len(b["ok"]) for b in encoded_mentions(cfg, some, pre, None, False)
                .iter_batches(batch_size=None, batch_format="numpy"))
        return n, time.perf_counter() - t0

    def end_to_end(one_file=None):
        t0 = time.perf_counter()
        r = link(cfg if one_file is None else dataclasses.replace(cfg, input=one_file, output=f"{cfg.output}-small"))
        pool.append(r.summary["pools"]["encode"])
        return r.summary["counts"]["in"], time.perf_counter() - t0, r.summary["startup_seconds"]

    def steady(big: tuple, small: tuple) -> float:
        """Rows/s after start-up: the rows the whole input has beyond one file over the seconds it takes beyond it."""
        return (big[0] - small[0]) / max(big[1] - small[1], 1e-9)

    pairs, pool = [], []
    with ShardMemory() as mem:
        for i in range(repeats):
            if i % 2 == 0:
                enc, e2e = encode_only(), end_to_end()
                enc_small, e2e_small = encode_only(files[:1]), end_to_end(files[0])
            else:
                e2e, enc = end_to_end(), encode_only()
                e2e_small, enc_small = end_to_end(files[0]), encode_only(files[:1])
            (n, t_enc), (rows, t_e2e, startup) = enc, e2e
            pair = {"encode_only_rate": n / t_enc, "e2e_rate": rows / t_e2e, "shards_loaded_s": startup}
            pair["ratio"] = pair["e2e_rate"] / pair["encode_only_rate"]
            pair["encode_only_steady"] = steady(enc, enc_small)
            pair["e2e_steady"] = steady(e2e[:2], e2e_small[:2])
            pair["steady_ratio"] = pair["e2e_steady"] / pair["encode_only_steady"]
            print(f"  --workers {workers}, pair {i + 1}/{repeats}: {pair}", flush=True)
            pairs.append(pair)
    out = {k: float(np.median([p[k] for p in pairs])) for k in pairs[0]}
    return {**out, "rows": n, "pairs": pairs, "workers_mb": mem.memory.by_kind(), "actors": pool[0]}


def run_size(size: str, clip: str | None, tmp: Path, repeats: int = 2, pools=("auto", "1")) -> dict:
    from otmel.exporters.onnx import ExportConfig, export
    from otmel.jobs.index import IndexConfig
    from otmel.jobs.index import run as build_index

    t0 = time.perf_counter()
    data, inputs, test = make_inputs(size, tmp)
    model, pre = bench_sizes.new_model(size, clip)
    model.eval()
    ckpt = bench_sizes.save(model, pre, tmp / f"ckpt-{size}")
    onnx_dir = tmp / f"onnx-{size}"
    export(ExportConfig(checkpoint=str(ckpt), out=str(onnx_dir), parity_batches=(2,), parity_k=(3,)))
    print(f"[{size}] data + model + export: {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    idx = build_index(IndexConfig(model=str(onnx_dir), kb=str(data / "kb.parquet"), out=str(tmp / f"index-{size}"),
                                  shards=2, batch_size=64))
    t_index = time.perf_counter() - t0
    m = idx.manifest
    on_disk = sum(p.stat().st_size for e in m["shards"] for p in (tmp / f"index-{size}" / e["dir"]).iterdir())
    faiss_ram = sum((tmp / f"index-{size}" / e["dir"] / "index.faiss").stat().st_size for e in m["shards"])
    out = {"batch": DATA[size][2], "index_s": t_index, "entities": m["count"], "bytes_per_entity": on_disk / m["count"],
           "faiss_bytes_per_entity": faiss_ram / m["count"], "factory": m["factory"],
           "format1_bytes_per_entity": format1_bytes(m["dims"], m["retrieval_dim"]),
           "dims": m["dims"], "retrieval_dim": m["retrieval_dim"]}
    print(f"[{size}] index: {out}", flush=True)
    out["breakdown"] = breakdown(onnx_dir, tmp / f"index-{size}", test, DATA[size][2])
    print(f"[{size}] breakdown: {out['breakdown']}", flush=True)
    out["jobs"] = {}
    for workers in pools:
        out["jobs"][workers] = job(onnx_dir, tmp / f"index-{size}", inputs, tmp / f"out-{size}", repeats, workers)
        print(f"[{size}] job, --workers {workers}: {out['jobs'][workers]}", flush=True)
    out["job"] = out["jobs"][pools[0]]  # the first pool's (the default's) memory figures
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    bench_sizes.add_size_arguments(ap)
    ap.add_argument("--repeats", type=int, default=2,
                    help="pairs of (encode-only pipeline, link job) runs, in alternating order; medians reported")
    ap.add_argument("--workers", nargs="+", default=["auto", "1"], metavar="POOL",
                    help="encode pools to run the pairs with (the first is the jobs' default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline.md"))
    args = ap.parse_args()
    from otmel.jobs.common import encode_threads, init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(None, log_to_driver=False)
    t_all = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in bench_sizes.runs(args):
            results[size] = run_size(size, args.clip, Path(tmp), args.repeats, tuple(args.workers))
    sizes = list(results)
    head = " | ".join(sizes)
    row = lambda label, fn: f"| {label} | " + " | ".join(fn(results[s]) for s in sizes) + " |"  # noqa: E731

    def share(r, step, k=20):
        b = r["breakdown"]
        total = b["preprocess"] + b["encode"] + b[f"faiss_{k}"] + b[f"gather_{k}"] + b[f"rerank_{k}"]
        return f"{100 * b[step if step in b else f'{step}_{k}'] / total:.1f}%"

    lines = [
        "# The link pipeline at tiny and ViT-B/32 size",
        "",
        f"`.venv/bin/python bench/pipeline.py --sizes {' '.join(args.sizes)}{' --clip ' + args.clip if args.clip else ''} "
        f"--repeats {args.repeats} --workers {' '.join(args.workers)}` "
        f"on {platform.machine()}, {os.cpu_count()} cores, {datetime.date.today()}; {time.perf_counter() - t_all:.0f} s "
        "in all. Models with random weights (speed does not depend on them), ONNX fp32; KB and mention images are "
        "640x480 JPEG photos; index: 2 shards, `--factory auto`, fp16 features.",
        "",
        f"| | {head} |",
        "|---|" + "---:|" * len(sizes),
        row("KB entities indexed", lambda r: f"{r['entities']:,}"),
        row("index build, entities/s (Ray job, start-up included)", lambda r: f"{r['entities'] / r['index_s']:,.1f}"),
        row("FAISS factory chosen", lambda r: f"`{r['factory']}`"),
        row("index MB per 1,000 entities", lambda r: f"{r['bytes_per_entity'] / 1000:.2f}"),
        row("... as format 1 stored it (key twice in fp32, its parts, projections)",
            lambda r: f"{r['format1_bytes_per_entity'] / 1000:.2f}"),
        row("FAISS in a shard actor's RAM, MB per 1,000 entities", lambda r: f"{r['faiss_bytes_per_entity'] / 1000:.2f}"),
        row("shard actor peak private RSS during the job, MB", lambda r: f"{r['job']['workers_mb'].get('ShardServer', 0):,.0f}"),
        row("encode actor peak private RSS, MB",
            lambda r: f"{max([v for k, v in r['job']['workers_mb'].items() if 'Encode' in k] or [0]):,.0f}"),
        row("breakdown batch (mentions)", lambda r: str(r["batch"])),
        row("preprocess rows/s (1 process)", lambda r: f"{r['batch'] / r['breakdown']['preprocess']:,.0f}"),
        row("encode rows/s (ONNX fp32, 2 threads)", lambda r: f"{r['batch'] / r['breakdown']['encode']:,.1f}"),
        row("rerank pairs/s, K=20 x 2 shards (matcher, 1 thread)",
            lambda r: f"{r['batch'] * 40 / r['breakdown']['rerank_20']:,.0f}"),
    ]
    for k in (20, 64):
        for step, label in (("preprocess", "preprocessing"), ("encode", "encode"), ("faiss", "FAISS stage 1"),
                            ("gather", "reading candidate features"), ("rerank", "rerank (matcher)")):
            lines.append(row(f"time share, K={k}: {label}", lambda r, s=step, k=k: share(r, s, k)))
    lines += [row("link job: mentions", lambda r: f"{r['job']['rows']:,}"),
              row("pairs of runs (encode-only, link job) per encode pool, alternating order",
                  lambda r: str(len(r["job"]["pairs"])))]
    for workers in args.workers:
        j = lambda r, w=workers: r["jobs"][w]  # noqa: E731
        lines += [
            row(f"`--workers {workers}`: encode actors x intra-op threads",
                lambda r, j=j: f"{j(r)['actors']} x {encode_threads(0.25, int(j(r)['actors']), os.cpu_count())}"),
            row(f"`--workers {workers}`: encode-only pipeline, mentions/s (median)",
                lambda r, j=j: f"{j(r)['encode_only_rate']:,.1f}"),
            row(f"`--workers {workers}`: link job end to end, mentions/s (median)",
                lambda r, j=j: f"{j(r)['e2e_rate']:,.1f}"),
            row(f"`--workers {workers}`: the job's shard actors loaded after, s (median; while its encode actors load)",
                lambda r, j=j: f"{j(r)['shards_loaded_s']:.1f}"),
            row(f"`--workers {workers}`: end to end / encode-only, per pair",
                lambda r, j=j: ", ".join(f"{p['ratio']:.2f}" for p in j(r)["pairs"])),
            row(f"**`--workers {workers}`: end to end / encode-only** (median of pairs)",
                lambda r, j=j: f"**{j(r)['ratio']:.2f}**"),
            row(f"`--workers {workers}`: after start-up, encode-only / link job, mentions/s (median)",
                lambda r, j=j: f"{j(r)['encode_only_steady']:,.1f} / {j(r)['e2e_steady']:,.1f}"),
            row(f"`--workers {workers}`: after start-up, end to end / encode-only, per pair",
                lambda r, j=j: ", ".join(f"{p['steady_ratio']:.2f}" for p in j(r)["pairs"])),
            row(f"**`--workers {workers}`: after start-up, end to end / encode-only** (median of pairs)",
                lambda r, j=j: f"**{j(r)['steady_ratio']:.2f}**"),
        ]
    lines += [
        "",
        "Time shares: each step timed alone on the same batch (medians of 3), as a share of their sum; writing the "
        "output is not in it (the job includes it). Both runs are timed whole, start-up included: the encode-only "
        "pipeline's Ray Data start-up and model load, the job's too, its preflight and its shard actors, which load "
        "while its encode actors do (the start-up the encode-only pipeline has not), and its commits. Everything runs on the same 2 cores: "
        "the shard and link actors take CPU from the encoder, which a cluster gives them on other nodes. The "
        "machine is shared and noisy: each pair runs the two back to back (in alternating order) and is compared "
        "within itself; the medians are of the pairs. After start-up: each pipeline also runs on one of the 4 input "
        "files, and its rate after start-up is the rows the whole input has beyond that file over the seconds it "
        "takes beyond it (what start-up, model loads and the last commit cost both runs alike cancels out).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
