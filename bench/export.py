"""Encode / score throughput and H@1 per backend and precision, at tiny and ViT-B/32 size, one run.

For every model size (``--sizes tiny base``, ``--clip DIR`` for a pretrained CLIP; see
bench/sizes.py) it trains one KD model on synthetic data (CPU; at base size the OT-MEL heads on
frozen random towers), exports it four ways (kd fp32 / fp16 / int8, ot fp32), then measures
every backend on the same inputs: encode throughput (KB rows/s), score throughput
(mention-candidate pairs/s at K = 20 and 64), test H@1 / MRR of exhaustive ranking against
every KB entity, and the share of test mentions whose top-1 equals ONNX fp32's (what a
precision changes for a user's output). Writes bench/results/export.md.

    .venv/bin/python bench/export.py [--sizes tiny base] [--clip DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sizes as bench_sizes
from otmel.backend import TorchBackend, load_backend
from otmel.data.pairs import load_split
from otmel.exporters.onnx import ExportConfig, export
from otmel.metrics import ranking_metrics, ranks_from_scores
from otmel.data.synth import write_synthetic_dataset

KEYS = ("input_ids", "attention_mask", "pixel_values", "has_image")
#: per size: (KB entities, mentions, training epochs); the test split is 15% of the mentions
DATA = {"tiny": (200, 1600, 4), "base": (100, 600, 2), "clip": (100, 600, 1)}
IMAGE_PX = {"tiny": 32, "base": 224, "clip": 224}
BACKENDS = [  # (name, how): torch kd, torch ot teacher, ONNX precisions, ONNX ot
    ("PyTorch, kd (attention)", "torch"),
    ("PyTorch, ot teacher (Sinkhorn)", "torch-ot"),
    ("ONNX Runtime fp32, kd", "fp32"),
    ("ONNX Runtime fp16, kd", "fp16"),
    ("ONNX Runtime int8, kd", "int8"),
    ("ONNX Runtime fp32, ot (unrolled Sinkhorn)", "ot"),
]


def _median_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(backend, kb, test, ks=(20, 64), repeats: int = 3) -> dict:
    pre = backend.preprocessor
    eb = pre.entities(kb.select(["name", "attributes", "image"]).to_pydict())
    mb = pre.mentions(test.select(["mention", "text", "image"]).to_pydict())
    e_in = {key: getattr(eb, key) for key in KEYS}
    m_in = {key: getattr(mb, key) for key in KEYS}
    t_enc = _median_time(lambda: backend.encode(e_in), repeats)
    ef, mf = backend.encode(e_in), backend.encode(m_in)
    M, E = len(mb), len(eb)
    rng = np.random.default_rng(0)
    out = {"encode_rows_s": E / t_enc}
    for k in ks:
        cand_idx = rng.integers(0, E, (M, k))
        cands = {n: v[cand_idx] for n, v in ef.items()}
        out[f"score_pairs_s_{k}"] = M * k / _median_time(lambda: backend.score(mf, cands), repeats)
    # exhaustive ranking, mention chunks against the whole KB
    ids = kb.column("entity_id").to_pylist()
    gold = torch.tensor([ids.index(g) for g in test.column("gold_entity_id").to_pylist()])
    blocks = []
    for s in range(0, M, 16):
        sl = slice(s, min(M, s + 16))
        grid = {n: np.broadcast_to(v[None], (sl.stop - sl.start, *v.shape)) for n, v in ef.items()}
        blocks.append(backend.score({n: v[sl] for n, v in mf.items()}, grid)["overall"])
    scores = np.concatenate(blocks)
    m = ranking_metrics(ranks_from_scores(torch.from_numpy(scores).double(), gold).numpy())
    return {**out, "H@1": m["H@1"], "MRR": m["MRR"], "top1": scores.argmax(1)}


def run_size(size: str, clip: str | None, tmp: Path, threads: int) -> dict:
    n_entities, n_mentions, epochs = DATA[size]
    data = tmp / f"data-{size}"
    write_synthetic_dataset(data, n_entities=n_entities, n_mentions=n_mentions, seed=0, image_size=IMAGE_PX[size])
    kb, _ = load_split(data, "train")
    _, test = load_split(data, "test")
    model, pre = bench_sizes.new_model(size, clip)
    train = bench_sizes.train_briefly(model, pre, data, size, epochs)
    ckpt = bench_sizes.save(model, pre, tmp / f"ckpt-{size}")
    rows = {}
    for name, how in BACKENDS:
        t0 = time.perf_counter()
        if how.startswith("torch"):
            be = TorchBackend.from_checkpoint(ckpt)
            if how == "torch-ot":
                be.model.inference_method = "ot"
        else:
            out = tmp / f"onnx-{size}-{how}"
            export(ExportConfig(checkpoint=str(ckpt), out=str(out), mode="ot" if how == "ot" else None,
                                fp16=how == "fp16", int8=how == "int8", parity_batches=(2,), parity_k=(3,)))
            be = load_backend(str(out), threads=threads)
        rows[name] = measure(be, kb, test)
        print(f"[{size}] {name}: { {k: v for k, v in rows[name].items() if k != 'top1'} } "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del be
    ref = rows["ONNX Runtime fp32, kd"]
    for r in rows.values():
        r["agree"] = float(np.mean(r["top1"] == ref["top1"]))
    return {"rows": rows, "train": train, "entities": len(kb), "test": len(test)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    bench_sizes.add_size_arguments(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for size in bench_sizes.runs(args):
            results[size] = run_size(size, args.clip, Path(tmp), args.threads)
    sizes = list(results)

    def cols(metric, fmt) -> str:
        return " | ".join(fmt(results[s]["rows"][name][metric]) for s in sizes)

    lines = [
        "# Export benchmark: PyTorch vs ONNX Runtime, per precision, tiny and ViT-B/32 size",
        "",
        f"`.venv/bin/python bench/export.py --sizes {' '.join(args.sizes)}{' --clip ' + args.clip if args.clip else ''}` "
        f"on {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
        f"{datetime.date.today()}; {time.perf_counter() - t_all:.0f} s in all.",
        "",
    ]
    for s in sizes:
        r = results[s]
        lines.append(f"* **{s}**: {bench_sizes.describe(s, args.clip)}; KD model trained {r['train']['epochs']} epochs "
                     f"({r['train']['pairs']} pairs, {r['train']['seconds']:.0f} s) on `otmel synth` "
                     f"({r['entities']} entities, {IMAGE_PX[s]} px images); H@1 / MRR of the {r['test']} test mentions "
                     "ranked against every KB entity.")
    lines += [
        "",
        "Encode: KB rows/s (text + image); score: mention-candidate pairs/s; medians of 3 after a warm-up, "
        "the same inputs for every backend. \"Top-1 as fp32\": share of test mentions whose best entity is "
        "the one ONNX fp32 ranks first.",
        "",
        "| backend | " + " | ".join(f"{metric}, {s}" for metric in ("encode rows/s", "score pairs/s K=20",
                                                                    "score pairs/s K=64", "H@1 %",
                                                                    "H@1 change vs ONNX fp32, points", "top-1 as fp32")
                                    for s in sizes) + " |",
        "|---|" + "---:|" * (6 * len(sizes)),
    ]
    for name, _ in BACKENDS:
        ref = lambda s: results[s]["rows"]["ONNX Runtime fp32, kd"]["H@1"]  # noqa: E731
        delta = " | ".join(f"{100 * (results[s]['rows'][name]['H@1'] - ref(s)):+.2f}" for s in sizes)
        lines.append(f"| {name} | {cols('encode_rows_s', lambda v: f'{v:,.1f}')} | "
                     f"{cols('score_pairs_s_20', lambda v: f'{v:,.0f}')} | {cols('score_pairs_s_64', lambda v: f'{v:,.0f}')} | "
                     f"{cols('H@1', lambda v: f'{100 * v:.2f}')} | {delta} | {cols('agree', lambda v: f'{100 * v:.1f}%')} |")
    lines += ["", "The machine is shared and noisy: ratios within one run are what this table is for. At base size "
              "the towers are random (not CLIP's): a pretrained CLIP's activations have outliers that int8 handles "
              "worse; measure your model with `--clip DIR` before choosing int8."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
