"""Single-process training (the library functions Ray Train's workers call)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from otmel.data.pairs import PairDataset
from otmel.model.otmel import OTMEL

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """Optimiser settings. The paper gives lr 2e-5 (from pretrained CLIP) and batch 256, and
    nothing on schedules or clipping; the defaults are the authors' release's: a constant lr,
    no gradient clipping."""

    lr: float = 2e-5  # learning rate of the CLIP towers
    head_lr: float | None = None  # learning rate of the OT-MEL heads (None = lr)
    weight_decay: float = 1e-4
    schedule: str = "constant"  # constant (the release) | cosine (decay to 0 over total_steps)
    warmup_steps: int = 0  # linear warm-up before either schedule
    total_steps: int | None = None  # the cosine's length (required for schedule = cosine)
    grad_clip: float | None = None  # max global grad norm; None = no clipping (the release)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "cosine" and not self.total_steps:
            raise ValueError("the cosine schedule needs total_steps")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")


SCHEDULES = ("constant", "cosine")


def make_optimizer(model: OTMEL, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with two parameter groups (CLIP towers, OT-MEL heads), warm-up, then a constant
    or cosine learning rate."""
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
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> None:
    """Clip the global gradient norm at ``max_norm`` (None: leave the gradients alone)."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


# ---------------------------------------------------------------------------- epoch order
def epoch_order(n_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of all ``n_pairs`` for ``epoch``: the whole training set reshuffled every
    epoch (as the paper's and the release's loader do), reproducibly from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_pairs)


def global_batches(n_pairs: int, batch_size: int, seed: int, epoch: int, world: int = 1) -> list[np.ndarray]:
    """The epoch's global batches: pair rows of ``epoch_order`` cut into ``batch_size`` pieces.

    The ragged tail is a last, smaller batch, cut to a multiple of ``world`` (every worker
    must hold as many pairs for the global negatives) and kept if each worker gets at least
    2 pairs (in-batch negatives); so an epoch sees every pair exactly once when ``n_pairs``
    divides by ``world``, else all but ``n_pairs mod world`` (a different few each epoch).
    """
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} must be a multiple of the {world} workers")
    order = epoch_order(n_pairs, seed, epoch)
    full = n_pairs // batch_size
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(full)]
    tail = order[full * batch_size:]
    tail = tail[:len(tail) - len(tail) % world]
    if len(tail) >= 2 * world:
        batches.append(tail)
    return batches


def worker_rows(batches: list[np.ndarray], rank: int, world: int) -> tuple[np.ndarray, list[int]]:
    """Worker ``rank``'s share of every global batch, in order: (pair rows, rows per step).

    Global batch b is the concatenation over ranks of their b-th pieces, so N workers step
    on exactly the batches one process would (what makes 2 workers == 1 process).
    """
    pieces = [b[rank * (len(b) // world):(rank + 1) * (len(b) // world)] for b in batches]
    rows = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return rows, [len(p) for p in pieces]


def train_epoch(
    model: OTMEL,
    data: PairDataset,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    scheduler=None,
    seed: int = 0,
    epoch: int = 0,
    grad_clip: float | None = None,
    max_steps: int | None = None,
    log_every: int = 20,
    on_step=None,
) -> dict[str, float]:
    """One pass over ``data`` in the batches of :func:`global_batches` (seed, epoch), the
    same the Ray Train job uses; returns mean losses and counts.

    ``on_step(step, losses)`` is called after each optimiser step (progress bars, tests).
    Raises FloatingPointError on a non-finite loss rather than training on garbage.
    """
    model.train()
    sums: dict[str, float] = {}
    steps, t0 = 0, time.perf_counter()
    for rows in global_batches(len(data), batch_size, seed, epoch):
        batch = data.batch(rows)
        losses = model(batch.mention_inputs, batch.entity_inputs, batch.entity_ids)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {steps}: { {k: float(v) for k, v in losses.items()} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model, grad_clip)
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


# ---------------------------------------------------------------------------- resumable state
def state_digest(state: dict) -> str:
    """sha256 of a (model or optimizer) state dict: every tensor's name, dtype, shape and
    bytes, and every other value as JSON. Equal digests = identical states."""
    h = hashlib.sha256()

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{prefix}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            h.update(f"{prefix}={json.dumps(value, sort_keys=True, default=str)}".encode())

    walk("", state)
    return h.hexdigest()
