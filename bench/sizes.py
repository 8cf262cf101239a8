"""Model sizes for the benchmarks: ``--size tiny|base`` (random weights) or ``--clip DIR``.

``tiny`` is the tests' CLIP (hidden 32, 2 layers, 32 px); ``base`` is the exact ViT-B/32
architecture with random weights (speed and memory do not depend on the weights; the
pretrained ones cannot be downloaded here); ``--clip NAME_OR_DIR`` loads a real CLIP with
``from_pretrained`` (its tokenizer and image processor included).

At base size a CPU cannot fine-tune the towers in a benchmark's budget (~16 s per 64-pair step
on 2 cores), so :func:`train_briefly` trains the OT-MEL heads on frozen towers there: the
model is then trained (its ranking is far above chance) and the precisions compared on it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from otmel.data.pairs import PairDataset, load_split
from otmel.model.factory import RANDOM_SIZES, create_model, save_model
from otmel.model.otmel import ModelConfig
from otmel.data.synth import SYNTH_VOCABULARY
from otmel.training.loop import OptimConfig, make_optimizer, train_epoch

#: per size: text tokens (the tiny tests use 24; the release 40) and training settings
SETTINGS = {
    "tiny": {"text_length": 24, "lr": 1e-3, "freeze_clip": False},
    "base": {"text_length": 40, "lr": 1e-3, "freeze_clip": True},
    "clip": {"text_length": 40, "lr": 2e-5, "freeze_clip": False},
}


def add_size_arguments(ap: argparse.ArgumentParser, default_sizes=("tiny", "base")) -> None:
    ap.add_argument("--sizes", "--size", dest="sizes", nargs="+", choices=sorted(RANDOM_SIZES), default=list(default_sizes),
                    help="random-weight CLIP architectures to run (base = ViT-B/32)")
    ap.add_argument("--clip", default=None, metavar="NAME_OR_DIR",
                    help="also run a pretrained CLIP (from_pretrained: a hub name or a local directory)")


def runs(args) -> list[str]:
    """The model sizes an invocation runs: each random size, then ``clip`` if given."""
    return list(args.sizes) + (["clip"] if args.clip else [])


def new_model(size: str, clip: str | None = None, mode: str = "kd", **overrides):
    """(model, preprocessor) of a size (``tiny``/``base``: random weights; ``clip``: ``clip``)."""
    text_length = SETTINGS[size]["text_length"]
    if size == "clip":
        return create_model(ModelConfig(mode=mode, clip=clip, text_length=text_length, **overrides))
    torch.manual_seed(0)
    cfg = ModelConfig(mode=mode, text_length=text_length, **{**RANDOM_SIZES[size], **overrides})
    return create_model(cfg, size=size, words=SYNTH_VOCABULARY)


def train_briefly(model, pre, data_dir: Path, size: str, epochs: int, batch: int = 32, log=print) -> dict:
    """A few epochs on ``data_dir``'s train split (CLIP frozen at base size: see the module doc)."""
    kb, train = load_split(data_dir, "train")
    freeze = SETTINGS[size]["freeze_clip"]
    for p in model.encoder.clip.parameters():
        p.requires_grad_(not freeze)
    pairs = PairDataset(train, kb, pre)
    opt, sched = make_optimizer(model, OptimConfig(lr=SETTINGS[size]["lr"], warmup_steps=5, schedule="cosine",
                                                   total_steps=max(1, epochs * (len(pairs) // batch))))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        stats = train_epoch(model, pairs, opt, batch, sched, epoch=epoch, grad_clip=1.0)
        log(f"[{size}] train epoch {epoch}: loss {stats['loss']:.3f} ({time.perf_counter() - t0:.0f} s)")
    for p in model.encoder.clip.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"epochs": epochs, "pairs": len(pairs), "seconds": time.perf_counter() - t0, "frozen_clip": freeze}


def describe(size: str, clip: str | None = None) -> str:
    return {"tiny": "tiny random CLIP (hidden 32, 2 layers, 32 px)",
            "base": "ViT-B/32 architecture, random weights (heads trained on frozen towers)",
            "clip": f"pretrained CLIP {clip}"}[size]


def save(model, pre, out: Path) -> Path:
    return save_model(model, pre, out)
