"""Shared fixtures: tiny random OT-MEL models and random input batches (CPU only)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from otmel.factory import TINY, create_model
from otmel.model import ModelConfig

WORDS = "robert downey holland actor singer paris france tennis watch spider man red blue".split()
TEXT_LENGTH = 16


def make_model(mode: str = "kd", missing_image: str = "zeros", pooling: str = "softpool", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(mode=mode, missing_image=missing_image, pooling=pooling, text_length=TEXT_LENGTH,
                      **{**TINY, **overrides})
    model, pre = create_model(cfg, tiny=True, words=WORDS, image_size=32)
    return model, pre


def random_inputs(n: int, seed: int = 0, image_rate: float = 0.7, vocab: int = 500, text_length: int = TEXT_LENGTH):
    """Random model inputs with varied text lengths (padding) and some image-less rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, text_length + 1, (n,), generator=g)
    ids = torch.randint(2, vocab, (n, text_length), generator=g)
    mask = (torch.arange(text_length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 0  # <|startoftext|>
    ids[torch.arange(n), lengths - 1] = 1  # <|endoftext|> closes the real tokens
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))  # padding = eos, as CLIP pads
    has_image = torch.rand(n, generator=g) < image_rate
    has_image[0] = True
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "has_image": has_image}


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def kd_model():
    return make_model("kd")
