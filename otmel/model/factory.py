"""Build a new model + preprocessor, or load both from a checkpoint directory.

Real runs start from a pretrained CLIP (``--clip openai/clip-vit-base-patch32`` or a local
copy of it): ``CLIPModel``, tokenizer and image processor all come from that name/dir.
``tiny=True`` builds a tiny random CLIP and a whole-word tokenizer over the given words
(tests, the CPU demo; weights cannot be downloaded on those machines); ``size="base"``
builds the exact ViT-B/32 architecture with random weights (benchmarks at real size).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from otmel.model.encoders import build_tiny_tokenizer, load_clip, tiny_clip_config, tiny_image_processor
from otmel.model.otmel import OTMEL, ModelConfig, load_checkpoint, save_checkpoint
from otmel.model.preprocessing import Preprocessor, load_image_processor

log = logging.getLogger(__name__)

#: model sizes of the tiny CPU configuration (tests, demo)
TINY = dict(input_width=64, dim=32)
#: random-weight CLIP architectures: ``tiny`` (hidden 32, 2 layers, 32 px: tests, the demo) and
#: ``base`` (ViT-B/32 exactly, with the paper's d = 96 and the release's input width 512)
RANDOM_SIZES = {"tiny": TINY, "base": {}}


def create_model(config: ModelConfig, tiny: bool = False, words: Iterable[str] = (), image_size: int = 32,
                 hidden_size: int = 32, layers: int = 2, size: str | None = None) -> tuple[OTMEL, Preprocessor]:
    """A new OT-MEL model and its preprocessor.

    tiny (or ``size="tiny"``): random CLIP (hidden ``hidden_size``, ``layers`` layers,
    ``image_size`` px images, 8 px patches) with a tokenizer holding ``words`` whole;
    ``size="base"``: random weights in the ViT-B/32 architecture (its 49,408-token embedding
    table; the same whole-word tokenizer, CLIP's 224 px image processing); otherwise
    ``config.clip`` is loaded with ``from_pretrained`` (hub name or local directory).
    """
    if size not in (None, *RANDOM_SIZES):
        raise ValueError(f"size must be one of {sorted(RANDOM_SIZES)}, got {size!r}")
    if size == "base":
        from otmel.model.encoders import vit_b32_clip_config

        tokenizer = build_tiny_tokenizer(words)
        clip_cfg = vit_b32_clip_config(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        if config.text_length > clip_cfg.text_config.max_position_embeddings:
            raise ValueError(f"text_length {config.text_length} > ViT-B/32's 77 text positions")
        processor = tiny_image_processor(224)
        config.clip = None
        config.clip_config = clip_cfg.to_dict()
        clip = load_clip(config=clip_cfg)
    elif tiny or size == "tiny":
        tokenizer = build_tiny_tokenizer(words)
        clip_cfg = tiny_clip_config(vocab_size=len(tokenizer), hidden_size=hidden_size, projection_dim=hidden_size,
                                    layers=layers, image_size=image_size, text_length=config.text_length,
                                    eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        processor = tiny_image_processor(image_size)
        config.clip = None
        config.clip_config = clip_cfg.to_dict()
        clip = load_clip(config=clip_cfg)
    else:
        from transformers import AutoTokenizer

        if not config.clip:
            raise ValueError("a CLIP name or directory is needed (--clip), or tiny=True")
        tokenizer = AutoTokenizer.from_pretrained(config.clip)
        processor = load_image_processor(config.clip)
        clip = load_clip(config.clip)
        max_pos = clip.config.text_config.max_position_embeddings
        if config.text_length > max_pos:
            raise ValueError(f"text_length {config.text_length} > the CLIP text tower's {max_pos} positions")
    model = OTMEL(config, clip)
    pre = Preprocessor(tokenizer, processor, config.text_length, config.mention_template, config.entity_template)
    return model, pre


def save_model(model: OTMEL, preprocessor: Preprocessor, out_dir: str | Path) -> Path:
    """Checkpoint dir = config.json + model.safetensors + tokenizer/processor files."""
    return save_checkpoint(model, out_dir, preprocessor)


def load_model(ckpt_dir: str | Path) -> tuple[OTMEL, Preprocessor]:
    """Load a checkpoint directory written by :func:`save_model` (eval mode)."""
    model = load_checkpoint(ckpt_dir)
    cfg = model.config
    pre = Preprocessor.from_pretrained(ckpt_dir, cfg.text_length, mention_template=cfg.mention_template,
                                       entity_template=cfg.entity_template)
    return model, pre
