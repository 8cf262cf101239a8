"""Single-process training (the library functions Ray Train's workers call)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from otmel.data import PairDataset
from otmel.model import OTMEL

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """Optimiser settings (paper: lr 2e-5 from pretrained CLIP, batch 256)."""

    lr: float = 2e-5  # learning rate of the CLIP towers
    head_lr: float | None = None  # learning rate of the OT-MEL heads (None = lr)
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    total_steps: int | None = None  # for the cosine schedule; None = constant after warm-up
    grad_clip: float | None = 1.0


def make_optimizer(model: OTMEL, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with two parameter groups (CLIP towers, OT-MEL heads) and warm-up + cosine."""
    model = getattr(model, "module", model)
    clip_params = [p for n, p in model.named_parameters() if n.startswith("encoder.clip.")]
    head_params = [p for n, p in model.named_parameters() if not n.startswith("encoder.clip.")]
    groups = [
        {"params": clip_params, "lr": cfg.lr},
        {"params": head_params, "lr": cfg.head_lr if cfg.head_lr is not None else cfg.lr},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.total_steps:
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_epoch(
    model: OTMEL,
    data: PairDataset,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    scheduler=None,
    seed: int = 0,
    grad_clip: float | None = 1.0,
    max_steps: int | None = None,
    log_every: int = 20,
    on_step=None,
) -> dict[str, float]:
    """One pass over ``data`` in shuffled batches; returns mean losses and counts.

    ``on_step(step, losses)`` is called after each optimiser step (progress bars, tests).
    Raises FloatingPointError on a non-finite loss rather than training on garbage.
    """
    model.train()
    sums: dict[str, float] = {}
    steps, t0 = 0, time.perf_counter()
    for batch in data.iter_batches(batch_size, shuffle=True, seed=seed):
        losses = model(batch.mention_inputs, batch.entity_inputs, batch.entity_ids)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {steps}: { {k: float(v) for k, v in losses.items()} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        steps += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if on_step is not None:
            on_step(steps, {k: float(v.detach()) for k, v in losses.items()})
        if log_every and steps % log_every == 0:
            log.info("step %d loss %.4f (%.1f s)", steps, sums["loss"] / steps, time.perf_counter() - t0)
        if max_steps is not None and steps >= max_steps:
            break
    if steps == 0:
        raise ValueError(f"no training step: {len(data)} pairs < batch size {batch_size}")
    out = {k: v / steps for k, v in sums.items()}
    out.update(steps=steps, seconds=time.perf_counter() - t0)
    return out
