"""`otmel demo`: the embedded-default pipeline on one machine.

synth a small ambiguous dataset -> train a tiny OT-MEL (KD mode) on the CPU for a bounded
time -> evaluate on the test split (exhaustive, and retrieve-then-rerank) -> print a table.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes and budget of the demo (defaults: a few minutes on a 2-core CPU)."""

    out: str = "demo-run"  # output directory (dataset, checkpoint, metrics.json)
    entities: int = 300  # KB size
    mentions: int = 2400  # mentions over train/dev/test
    mode: str = "kd"  # ot | att | kd
    epochs: int = 8  # upper bound on epochs
    time_budget_s: float = 150.0  # stop training after this many seconds (checked per epoch)
    batch_size: int = 32
    lr: float = 1e-3  # from-scratch tiny CLIP: much higher than the paper's 2e-5 fine-tuning
    retrieve: int = 20  # K of retrieve-then-rerank evaluation
    seed: int = 0


def run_demo(cfg: DemoConfig, progress=None) -> dict:
    from otmel.data import PairDataset, load_split
    from otmel.evaluation import evaluate
    from otmel.factory import TINY, create_model, save_model
    from otmel.metrics import format_metrics
    from otmel.model import ModelConfig
    from otmel.synth import SYNTH_VOCABULARY, write_synthetic_dataset
    from otmel.training import OptimConfig, make_optimizer, train_epoch

    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    data_dir = out / "data"
    t0 = time.perf_counter()
    report = write_synthetic_dataset(data_dir, n_entities=cfg.entities, n_mentions=cfg.mentions, seed=cfg.seed)
    log.info("synthetic dataset in %s: %s", data_dir, report)
    kb, train = load_split(data_dir, "train")
    _, dev = load_split(data_dir, "dev")
    _, test = load_split(data_dir, "test")

    model, pre = create_model(ModelConfig(mode=cfg.mode, text_length=32, **TINY), tiny=True, words=SYNTH_VOCABULARY)
    pairs = PairDataset(train, kb, pre)
    steps_per_epoch = len(pairs) // cfg.batch_size
    opt, sched = make_optimizer(model, OptimConfig(lr=cfg.lr, warmup_steps=20, total_steps=steps_per_epoch * cfg.epochs))
    history = []
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        stats = train_epoch(model, pairs, opt, cfg.batch_size, sched, seed=cfg.seed + epoch)
        dev_m = evaluate(model, pre, dev, kb)
        history.append({"epoch": epoch, **{k: round(v, 4) for k, v in stats.items()},
                        "dev_H@1": dev_m["H@1"], "dev_MRR": dev_m["MRR"]})
        if progress:
            progress(f"epoch {epoch}: loss {stats['loss']:.3f}, dev {format_metrics({k: dev_m[k] for k in ('H@1', 'H@3', 'H@5', 'MRR')})}"
                     f" ({stats['seconds']:.0f} s)")
        if time.perf_counter() - t_train > cfg.time_budget_s:
            break
    ckpt = save_model(model, pre, out / "checkpoint")
    test_exh = evaluate(model, pre, test, kb)
    test_ret = evaluate(model, pre, test, kb, retrieve=cfg.retrieve)
    same_name = report.mean_entities_per_name if hasattr(report, "mean_entities_per_name") else None
    result = {
        "dataset": str(data_dir),
        "checkpoint": str(ckpt),
        "entities": kb.num_rows,
        "train_pairs": len(pairs),
        "chance_H@1": 1.0 / kb.num_rows,
        "same_name_chance_H@1": (1.0 / same_name) if same_name else None,
        "test_exhaustive": test_exh,
        "test_retrieve_rerank": test_ret,
        "history": history,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
