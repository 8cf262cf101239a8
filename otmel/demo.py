"""`otmel demo`: the whole pipeline on the embedded default (a local Ray instance, local files).

synth a small ambiguous dataset -> train a tiny OT-MEL (KD) with 2 Ray Train workers ->
export it to ONNX -> build a 2-shard FAISS index of the KB -> calibrate the NIL threshold on
dev -> link the test mentions with the Ray Data job -> score the linked Parquet against gold.
Each step is the same library/job code the CLI commands run.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes and budget of the demo (defaults: a few minutes on a 2-core CPU)."""

    out: str = "demo-run"  # output directory (dataset, run, onnx, index, links, metrics.json)
    entities: int = 300  # KB size
    mentions: int = 2400  # mentions over train/dev/test
    mode: str = "kd"  # ot | att | kd
    epochs: int = 6
    workers: int = 2  # Ray Train workers
    batch_size: int = 32  # global batch
    lr: float = 1e-3  # from-scratch tiny CLIP: much higher than the paper's 2e-5 fine-tuning
    shards: int = 2
    candidates: int = 20  # K retrieved per shard
    top_k: int = 10
    seed: int = 0


def linked_metrics(rows: list[dict], gold: dict[str, str]) -> dict[str, float]:
    """H@1/3/5 and MRR of linked output rows (ranks from their top-k candidates; a gold entity
    outside them counts as a miss) plus the NIL decision's precision/recall."""
    ranks, linked, correct = [], 0, 0
    for r in rows:
        g = gold.get(r["mention_id"])
        if g is None:
            continue
        ids = [c["entity_id"] for c in (r["candidates"] or [])]
        ranks.append(ids.index(g) + 1 if g in ids else np.inf)
        if r["status"] == "ok":
            linked += 1
            correct += r["entity_id"] == g
    ranks = np.asarray(ranks, dtype=float)
    out = {f"H@{k}": float(np.mean(ranks <= k)) for k in (1, 3, 5)}
    out["MRR"] = float(np.mean(np.where(np.isfinite(ranks), 1.0 / ranks, 0.0)))
    out["count"] = int(len(ranks))
    out["link_precision"] = correct / linked if linked else 0.0
    out["link_recall"] = correct / len(ranks) if len(ranks) else 0.0
    return out


def run_demo(cfg: DemoConfig, progress=print) -> dict:
    from otmel.linking.calibration import CalibrateConfig, calibrate
    from otmel.exporters.onnx import ExportConfig, export
    from otmel.jobs.index import IndexConfig
    from otmel.jobs.index import run as build_index
    from otmel.jobs.link import LinkConfig
    from otmel.jobs.link import run as link
    from otmel.jobs.train import TrainConfig
    from otmel.jobs.train import run as train
    from otmel.linking.link_output import read_link_output
    from otmel.data.schemas import read_mentions
    from otmel.data.synth import write_synthetic_dataset

    from otmel.jobs.common import init_ray

    out = Path(cfg.out).resolve()
    data = out / "data"
    init_ray(None, log_to_driver=False)  # a quiet local instance: workers' logs go to the session logs
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    report = write_synthetic_dataset(data, n_entities=cfg.entities, n_mentions=cfg.mentions, seed=cfg.seed)
    step("synth", t)
    progress(f"[1/6] synth: {report}")

    t = time.perf_counter()
    trained = train(TrainConfig(data=str(data), out=str(out / "runs"), name="demo", mode=cfg.mode, workers=cfg.workers,
                                epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, tiny_clip=True, seed=cfg.seed,
                                model={"text_length": 32}, max_failures=1))
    step("train", t)
    progress(f"[2/6] train ({cfg.workers} Ray Train workers, {cfg.epochs} epochs, {timings['train']:.0f} s): dev MRR "
             f"{trained.metrics.get('dev_MRR', float('nan')):.3f}; best checkpoint {trained.best_checkpoint}")

    t = time.perf_counter()
    onnx_dir = out / "onnx"
    with warnings.catch_warnings():  # the tracer's warnings about constant shapes are expected
        warnings.simplefilter("ignore")
        meta = export(ExportConfig(checkpoint=trained.best_checkpoint, out=str(onnx_dir)))
    step("export", t)
    progress(f"[3/6] export: {onnx_dir} (max |ONNX - PyTorch| {max(meta['parity_max_abs_diff'].values()):.1e})")

    t = time.perf_counter()
    index_dir = out / "index"
    index = build_index(IndexConfig(model=str(onnx_dir), kb=str(data / "kb.parquet"), out=str(index_dir),
                                    shards=cfg.shards, overwrite=True))
    step("index", t)
    progress(f"[4/6] index: {index.manifest['count']} entities in {cfg.shards} shards at {index_dir}")

    t = time.perf_counter()
    cal = calibrate(CalibrateConfig(model=str(onnx_dir), index=str(index_dir), data=str(data), split="dev",
                                    candidates=cfg.candidates))
    step("calibrate", t)
    progress(f"[5/6] calibrate: NIL threshold {cal['nil_threshold']:.4f} (dev linking F1 {cal['f1']:.3f} vs "
             f"{cal['f1_no_threshold']:.3f} without)")

    t = time.perf_counter()
    links_dir = out / "links"
    linked = link(LinkConfig(model=str(onnx_dir), index=str(index_dir), input=str(data / "mentions" / "test.parquet"),
                             output=str(links_dir), top_k=cfg.top_k, candidates=cfg.candidates, force=True))
    step("link", t)
    test = read_mentions(data / "mentions" / "test.parquet")
    gold = dict(zip(test.column("mention_id").to_pylist(), test.column("gold_entity_id").to_pylist()))
    metrics = linked_metrics(read_link_output(str(links_dir)).to_pylist(), gold)
    progress(f"[6/6] link: {linked.summary['counts']} at {linked.summary['mentions_per_second']} mentions/s")
    result = {
        "dataset": str(data),
        "checkpoint": trained.best_checkpoint,
        "onnx": str(onnx_dir),
        "index": str(index_dir),
        "links": str(links_dir),
        "entities": index.manifest["count"],
        "chance_H@1": 1.0 / index.manifest["count"],
        "same_name_chance_H@1": 1.0 / report.mean_entities_per_name,
        "test_linked": metrics,
        "nil_threshold": cal["nil_threshold"],
        "link_summary": linked.summary,
        "timings_s": timings,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
