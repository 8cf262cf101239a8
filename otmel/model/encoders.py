"""CLIP text/vision token features (OT-MEL eqs 4-5), shared by mentions and entities.

The paper encodes ``[CLS] m_n [SEP] m_c [SEP]`` with the text tower and the image patches
(with [CLS]) with the ViT, one parameter-shared encoder for mentions and entities. Here:

* token features = CLIP's last hidden states (text hidden 512, vision hidden 768 for
  ViT-B/32), projected by one linear map each to a common ``input_width`` (512, as the
  authors' release does);
* summary vectors t / v (eq. 24) = CLIP's pooled, projected and L2-normalised
  ``text_embeds`` / ``image_embeds``. CLIP's text tower is causal, so position 0 carries
  nothing and the pooled vector is taken at the first EOS token, as CLIPModel does.

Real runs load ``openai/clip-vit-base-patch32`` (a hub name or a local directory) with
``CLIPModel.from_pretrained``; tests build a tiny random CLIP with :func:`tiny_clip_config`
and a whole-word tokenizer with :func:`build_tiny_tokenizer` (no download possible here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

# the model's text templates and default CLIP, with its config (torch-free)
from otmel.model.config import DEFAULT_CLIP, ENTITY_TEMPLATE, MENTION_TEMPLATE  # noqa: E402


def tiny_clip_config(
    vocab_size: int = 1024,
    hidden_size: int = 32,
    projection_dim: int = 32,
    layers: int = 2,
    heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    text_length: int = 40,
    eos_token_id: int = 1,
    bos_token_id: int = 0,
):
    """A tiny random-initialised ``transformers.CLIPConfig`` for tests and the CPU demo.

    ``(image_size / patch_size)^2 + 1`` visual tokens (17 by default); text positions equal
    ``text_length`` so the tokenizer limit and the model agree.
    """
    from transformers import CLIPConfig

    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=text_length,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=eos_token_id,
    )
    vision = dict(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def vit_b32_clip_config(vocab_size: int = 49408, eos_token_id: int = 1, bos_token_id: int = 0):
    """The exact architecture of ``openai/clip-vit-base-patch32`` (ViT-B/32: text tower 12 x
    512 with 8 heads and 77 positions, vision tower 12 x 768 with 12 heads, 224 px images in
    32 px patches = 50 visual tokens, projection 512), for random weights: speed and memory do
    not depend on the weights, so benchmarks build it where the pretrained weights cannot be
    downloaded (``bench/* --size base``)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=512, intermediate_size=2048, projection_dim=512,
                num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=eos_token_id)
    vision = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                  num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP convention)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tiny_tokenizer(words: Iterable[str]):
    """A CLIP byte-level BPE tokenizer in which every given word is one token.

    The base vocabulary is the 256 byte symbols (with and without the end-of-word mark) and no
    merges, so unknown words still tokenize, character by character, as a real CLIP
    vocabulary handles rare words. The given words are added as whole-word tokens
    (``single_word``: "was" does not match inside "washing"); BPE merges cannot guarantee
    that (a shorter word's merge can win inside a longer word). Token ids: 0 =
    ``<|startoftext|>``, 1 = ``<|endoftext|>`` (also the padding token, as in CLIP),
    matching :func:`tiny_clip_config`'s defaults.
    """
    from tokenizers import AddedToken
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    whole = sorted({w.lower() for w in words if w and w.isalpha()})
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in whole])
    return tokenizer


def tiny_image_processor(image_size: int = 32):
    """A CLIP image processor (resize shortest side, centre crop, CLIP mean/std) for tiny images."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


@dataclass
class TokenFeatures:
    """What the CLIP towers give the rest of the model (B = batch).

    text_tokens : (B, Lt, input_width)    text_mask : (B, Lt) bool, True = real token
    vision_tokens : (B, Lv, input_width)  vision_mask : (B, Lv) bool
    text_summary : (B, P) unit-norm t     vision_summary : (B, P) unit-norm v
    """

    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    vision_tokens: torch.Tensor
    vision_mask: torch.Tensor
    text_summary: torch.Tensor
    vision_summary: torch.Tensor


class CLIPFeatureEncoder(nn.Module):
    """eqs 4-5: the shared CLIP encoder plus the projections to ``input_width``.

    ``missing_image``: ``zeros`` feeds a zero image through the ViT (the release's choice;
    reproduces its numbers); ``mask`` marks every visual token of an image-less row as
    padding and zeroes its summary vector v, so nothing downstream attends to a fake image.
    """

    def __init__(self, clip_model: nn.Module, input_width: int = 512, missing_image: str = "zeros"):
        super().__init__()
        if missing_image not in ("zeros", "mask"):
            raise ValueError(f"missing_image must be 'zeros' or 'mask', got {missing_image!r}")
        self.clip = clip_model
        config = clip_model.config
        self.text_proj = nn.Linear(config.text_config.hidden_size, input_width)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, input_width)
        self.missing_image = missing_image

    @property
    def num_vision_tokens(self) -> int:
        vc = self.clip.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
    ) -> TokenFeatures:
        B, Lt = input_ids.shape
        has_image = has_image.bool()
        text_mask = attention_mask.bool()  # (B, Lt)
        text_out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        text_tokens = self.text_proj(text_out.last_hidden_state)  # (B, Lt, W)
        text_summary = self.clip.text_projection(text_out.pooler_output)  # (B, P)

        if self.missing_image == "zeros":
            # the release's zero image: pixel tensor of zeros (after CLIP normalisation)
            pixel_values = pixel_values * has_image[:, None, None, None].to(pixel_values.dtype)
        vision_out = self.clip.vision_model(pixel_values=pixel_values)
        vision_tokens = self.vision_proj(vision_out.last_hidden_state)  # (B, Lv, W)
        vision_summary = self.clip.visual_projection(vision_out.pooler_output)  # (B, P)
        Lv = vision_tokens.shape[1]
        if self.missing_image == "mask":
            vision_mask = has_image[:, None].expand(B, Lv)  # (B, Lv)
            vision_summary = vision_summary * has_image[:, None].to(vision_summary.dtype)
        else:
            vision_mask = torch.ones(B, Lv, dtype=torch.bool, device=vision_tokens.device)

        return TokenFeatures(
            text_tokens=text_tokens,
            text_mask=text_mask,
            vision_tokens=vision_tokens,
            vision_mask=vision_mask,
            text_summary=_unit(text_summary),
            vision_summary=_unit(vision_summary),
        )


def _unit(x: torch.Tensor) -> torch.Tensor:
    # written as x * rsqrt(sum x^2 + eps) rather than F.normalize so the ONNX export is a
    # plain ReduceSum/Sqrt chain and a zero vector (masked image) stays exactly zero.
    # In fp32 at least: under fp16 autocast eps = 1e-12 rounds to 0 and a zero vector
    # would become 0 * inf = NaN (a no-op for fp32 inputs, so nothing changes in the export).
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-12)


def load_clip(name_or_dir: str | None = None, config=None) -> nn.Module:
    """``CLIPModel.from_pretrained(name_or_dir)`` for real runs, or a random CLIP from ``config``."""
    from transformers import CLIPModel

    if config is not None:
        return CLIPModel(config)
    if not name_or_dir:
        raise ValueError("load_clip needs a hub name / local directory or a CLIPConfig")
    log.info("loading CLIP weights from %s", name_or_dir)
    return CLIPModel.from_pretrained(name_or_dir)


__all__ = [
    "CLIPFeatureEncoder",
    "DEFAULT_CLIP",
    "ENTITY_TEMPLATE",
    "MENTION_TEMPLATE",
    "TokenFeatures",
    "build_tiny_tokenizer",
    "load_clip",
    "tiny_clip_config",
    "vit_b32_clip_config",
    "tiny_image_processor",
]
