"""The preprocessing a worker runs, without torch or transformers: a fresh process starts in
~0.1 s instead of the ~3.9 s their imports cost (measured on this 2-core machine).

Why it matters: Ray kills idle task workers beyond one per CPU within a second, so the
preprocess tasks of a job, of every training epoch and of every new node start in fresh
worker processes again and again. Unpickling a Hugging Face tokenizer and image processor in
each of them imported torch and transformers: a 2-worker tiny training run waited ~15 s per
epoch for its data, ~0.4 s once the workers were kept alive. What the tasks need is small:

* :class:`TokenizerBackend`: the fast tokenizer's own Rust ``tokenizers.Tokenizer`` (the
  object a ``PreTrainedTokenizerFast`` drives), with the truncation and padding that
  ``tokenizer(texts, padding="max_length", truncation=True, max_length=L)`` sets on it;
* :class:`ClipImageSteps`: CLIP's image processing as the Hugging Face PIL backend runs it
  (``CLIPImageProcessorPil``): resize the shortest edge with PIL (bicubic), centre crop,
  rescale in float64 then float32, normalise in float32, channels first. The same PIL call and
  the same float operations give the same bits (``tests/test_light_preprocessing.py``).

``otmel.model.preprocessing.Preprocessor`` builds both from the Hugging Face objects it is given and
runs them; a processor configured otherwise (another resize rule, padding crops) or of
another backend (transformers' default ``CLIPImageProcessor`` is the torchvision one when
torchvision is installed) keeps the Hugging Face object for images.
"""

from __future__ import annotations

import numpy as np


class TokenizerBackend:
    """A Hugging Face fast tokenizer's Rust backend with its padding and truncation settings.

    Parameters
    ----------
    tokenizer_json : the backend's serialised form (``tokenizer.backend_tokenizer.to_str()``)
    pad_id, pad_token : the padding token (CLIP pads with ``<|endoftext|>``)
    pad_type_id : the padding token type id
    padding_side, truncation_side : ``right`` or ``left``, as the Hugging Face tokenizer's
    """

    def __init__(self, tokenizer_json: str, pad_id: int, pad_token: str, pad_type_id: int = 0,
                 padding_side: str = "right", truncation_side: str = "right"):
        self.state = {"tokenizer_json": tokenizer_json, "pad_id": int(pad_id), "pad_token": str(pad_token),
                      "pad_type_id": int(pad_type_id), "padding_side": padding_side,
                      "truncation_side": truncation_side}
        self._build()

    @classmethod
    def from_hf(cls, tokenizer) -> "TokenizerBackend | None":
        """From a Hugging Face tokenizer backed by ``tokenizers`` (None for any other kind)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or tokenizer.pad_token_id is None:
            return None
        return cls(backend.to_str(), tokenizer.pad_token_id, tokenizer.pad_token,
                   getattr(tokenizer, "pad_token_type_id", 0), getattr(tokenizer, "padding_side", "right"),
                   getattr(tokenizer, "truncation_side", "right"))

    def _build(self) -> None:
        from tokenizers import Tokenizer

        self.padded = Tokenizer.from_str(self.state["tokenizer_json"])
        self._length = None

    def __getstate__(self) -> dict:
        return self.state

    def __setstate__(self, state: dict) -> None:
        self.state = state
        self._build()

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """``(input_ids (B, length) int64, attention_mask (B, length) int64, truncated)``:
        padded and truncated to ``length`` tokens, special tokens included; ``truncated[i]``
        when text ``i`` had more (the tokens cut off are the encoding's overflow)."""
        if self._length != length:
            s = self.state
            self.padded.enable_truncation(max_length=length, stride=0, strategy="longest_first",
                                          direction=s["truncation_side"])
            self.padded.enable_padding(direction=s["padding_side"], pad_id=s["pad_id"], pad_type_id=s["pad_type_id"],
                                       pad_token=s["pad_token"], length=length)
            self._length = length
        encoded = self.padded.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), length)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64).reshape(len(texts), length)
        return ids, mask, [bool(e.overflowing) for e in encoded]


def _edge(value, key: str):
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)


def _pil_backend(processor) -> bool:
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # transformers 4: no PIL backend class, and no parity measured with it
        return False
    return isinstance(processor, PilBackend)


#: PIL's resampling filter numbers (``PIL.Image.Resampling``): 3 = BICUBIC
BICUBIC = 3


class ClipImageSteps:
    """CLIP's image processing (resize the shortest edge, centre crop, rescale, normalise) as
    the Hugging Face PIL backend computes it, on RGB PIL images.

    Parameters
    ----------
    shortest_edge : the resize target of the short side, ``S``
    crop : ``(height, width)`` of the centre crop (at most ``S`` each: no padding)
    resample : PIL filter number (3: bicubic)
    rescale_factor : pixel scale (1/255)
    mean, std : per-channel normalisation, 3 values each
    """

    def __init__(self, shortest_edge: int, crop: tuple[int, int], resample: int, rescale_factor: float | None,
                 mean, std):
        self.shortest_edge = int(shortest_edge)
        self.crop = (int(crop[0]), int(crop[1]))
        self.resample = int(resample)
        self.rescale_factor = None if rescale_factor is None else float(rescale_factor)
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)

    @classmethod
    def from_hf(cls, processor) -> "ClipImageSteps | None":
        """From a Hugging Face image processor that does exactly these steps (None otherwise):
        one of the PIL backend (a torchvision processor resizes with other arithmetic)."""
        if not _pil_backend(processor):
            return None
        size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
        short = _edge(size, "shortest_edge")
        longest = _edge(size, "longest_edge")
        height, width = _edge(crop, "height"), _edge(crop, "width")
        if not (getattr(processor, "do_resize", False) and short and not longest
                and getattr(processor, "do_center_crop", False) and height and width
                and height <= short and width <= short and not getattr(processor, "do_pad", False)):
            return None
        resample = getattr(processor, "resample", None)
        normalize = getattr(processor, "do_normalize", False)
        return cls(short, (height, width), BICUBIC if resample is None else int(resample),
                   processor.rescale_factor if getattr(processor, "do_rescale", False) else None,
                   processor.image_mean if normalize else None, processor.image_std if normalize else None)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The resize target ``(height, width)``: the short side to ``S``, the long side
        ``int(S * long / short)`` (an image whose short side is ``S`` keeps its size)."""
        S = self.shortest_edge
        if width <= height:
            return int(S * height / width), S
        return S, int(S * width / height)

    def __call__(self, image) -> np.ndarray:
        """An RGB PIL image -> ``(3, crop_h, crop_w)`` float32."""
        h, w = image.height, image.width
        oh, ow = self.output_size(h, w)
        if (oh, ow) != (h, w):
            image = image.resize((ow, oh), resample=self.resample, reducing_gap=None)
        pixels = np.asarray(image)  # (H, W, 3) uint8
        ch, cw = self.crop
        top, left = (oh - ch) // 2, (ow - cw) // 2
        pixels = pixels[top:top + ch, left:left + cw]
        if self.rescale_factor is not None:
            x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = pixels.astype(np.float32)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))
