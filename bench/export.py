"""Encode / score throughput and H@1: PyTorch (ot, kd) vs ONNX Runtime (fp32, fp16, int8), one run.

Trains one tiny KD model on synthetic data (CPU), exports it four ways (kd fp32 / fp16 / int8,
ot fp32), then for every backend measures on the same inputs:
encode throughput (rows/s), score throughput (mention-candidate pairs/s, K candidates per
mention), and test H@1 / MRR of exhaustive ranking against every KB entity.
Writes bench/results/export.md.

    .venv/bin/python bench/export.py [--entities 200] [--mentions 1600] [--epochs 4] [--k 64]
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

from otmel.backend import TorchBackend, load_backend
from otmel.data import PairDataset, load_split
from otmel.exporters.onnx import ExportConfig, export
from otmel.factory import TINY, create_model, save_model
from otmel.metrics import ranking_metrics, ranks_from_scores
from otmel.model import ModelConfig
from otmel.synth import SYNTH_VOCABULARY, write_synthetic_dataset
from otmel.training import OptimConfig, make_optimizer, train_epoch

KEYS = ("input_ids", "attention_mask", "pixel_values", "has_image")


def _median_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(backend, kb, test, k: int) -> dict:
    pre = backend.preprocessor
    eb = pre.entities(kb.select(["name", "attributes", "image"]).to_pydict())
    mb = pre.mentions(test.select(["mention", "text", "image"]).to_pydict())
    e_in = {key: getattr(eb, key) for key in KEYS}
    m_in = {key: getattr(mb, key) for key in KEYS}
    t_enc = _median_time(lambda: backend.encode(e_in))
    ef, mf = backend.encode(e_in), backend.encode(m_in)
    M, E = len(mb), len(eb)
    rng = np.random.default_rng(0)
    cand_idx = rng.integers(0, E, (M, k))
    cands = {n: v[cand_idx] for n, v in ef.items()}
    t_score = _median_time(lambda: backend.score(mf, cands))
    # exhaustive ranking, mention chunks against the whole KB
    ids = kb.column("entity_id").to_pylist()
    gold = torch.tensor([ids.index(g) for g in test.column("gold_entity_id").to_pylist()])
    blocks = []
    for s in range(0, M, 16):
        sl = slice(s, min(M, s + 16))
        grid = {n: np.broadcast_to(v[None], (sl.stop - sl.start, *v.shape)) for n, v in ef.items()}
        blocks.append(backend.score({n: v[sl] for n, v in mf.items()}, grid)["overall"])
    ranks = ranks_from_scores(torch.from_numpy(np.concatenate(blocks)).double(), gold).numpy()
    m = ranking_metrics(ranks)
    return {"encode_rows_s": E / t_enc, "score_pairs_s": M * k / t_score, "H@1": m["H@1"], "MRR": m["MRR"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entities", type=int, default=200)
    ap.add_argument("--mentions", type=int, default=1600)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_dataset(tmp / "data", n_entities=args.entities, n_mentions=args.mentions, seed=0)
        kb, train = load_split(tmp / "data", "train")
        _, test = load_split(tmp / "data", "test")
        torch.manual_seed(0)
        model, pre = create_model(ModelConfig(mode="kd", text_length=24, **TINY), tiny=True, words=SYNTH_VOCABULARY)
        pairs = PairDataset(train, kb, pre)
        opt, sched = make_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine",
                                                       total_steps=args.epochs * (len(pairs) // 32)))
        for epoch in range(args.epochs):
            train_epoch(model, pairs, opt, 32, sched, epoch=epoch, grad_clip=1.0)
        ckpt = save_model(model, pre, tmp / "ckpt")
        variants = [
            ("PyTorch, kd (attention)", lambda: TorchBackend.from_checkpoint(ckpt)),
            ("PyTorch, ot teacher (Sinkhorn)", None),
            ("ONNX Runtime fp32, kd", "kd"),
            ("ONNX Runtime fp16, kd", "fp16"),
            ("ONNX Runtime int8, kd", "int8"),
            ("ONNX Runtime fp32, ot (unrolled Sinkhorn)", "ot"),
        ]
        for name, how in variants:
            if how is None:
                be = TorchBackend.from_checkpoint(ckpt)
                be.model.inference_method = "ot"
            elif callable(how):
                be = how()
            else:
                out = tmp / f"onnx-{how}"
                export(ExportConfig(checkpoint=str(ckpt), out=str(out), mode="ot" if how == "ot" else None,
                                    fp16=how == "fp16", int8=how == "int8", parity_batches=(4,)))
                be = load_backend(str(out), threads=args.threads)
            r = measure(be, kb, test, args.k)
            print(f"{name}: {r}", flush=True)
            rows.append((name, r))
    base = rows[0][1]
    lines = [
        "# Export benchmark: PyTorch vs ONNX Runtime",
        "",
        f"Date {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
        f"torch {torch.__version__}. Tiny random CLIP (hidden 32, 2 layers, 32 px) trained {args.epochs} epochs "
        f"(KD) on `otmel synth` ({args.entities} entities); test split of {len(test)} mentions, "
        f"H@1/MRR ranked against every KB entity. Encode: KB rows/s; score: mention-candidate pairs/s "
        f"with K = {args.k}; medians of 3 after a warm-up, same inputs for every backend.",
        "",
        "| backend | encode rows/s | score pairs/s | x PyTorch kd (score) | H@1 | MRR | H@1 change vs PyTorch kd |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['encode_rows_s']:,.0f} | {r['score_pairs_s']:,.0f} | "
                     f"{r['score_pairs_s'] / base['score_pairs_s']:.2f} | {100 * r['H@1']:.2f} | "
                     f"{100 * r['MRR']:.2f} | {100 * (r['H@1'] - base['H@1']):+.2f} |")
    lines += ["", "The machine is shared and noisy: ratios within one run are what this table is for."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
