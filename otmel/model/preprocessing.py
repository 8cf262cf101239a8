"""Text + image preprocessing shared by training, evaluation, indexing and linking.

Turns rows (mention / entity dicts in the Arrow schemas of ``otmel.data.schemas``) into the four
model inputs: ``input_ids (B, L) int64``, ``attention_mask (B, L) int64``,
``pixel_values (B, 3, S, S) float32``, ``has_image (B,) bool``.

Bad input never fails a batch: each row gets a list of *issues* (a reason string each). A
row whose issues include an error (e.g. an empty mention) is still returned, padded, with
``ok = False`` so the caller reports it (status ``error``) instead of dropping it; a
corrupt or missing image is a warning (the row is linked on text with no image); an
over-long text is truncated to the tokenizer limit and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from otmel.model.config import ENTITY_TEMPLATE, MENTION_TEMPLATE

log = logging.getLogger(__name__)


#: the encoder's four inputs, the fields of :class:`Batch` an encoder reads
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "has_image")


#: where the pixels are resized and normalised: ``cpu`` (here, with the checkpoint's image
#: processor) or ``device`` (the decoded uint8 pixels go to the encoder, which runs
#: ``otmel.model.pixels.PixelTransform`` on its GPU)
IMAGE_TRANSFORMS = ("cpu", "device")


def load_image_processor(name_or_dir: str | Path):
    """The image processor of a CLIP name or directory, with transformers' PIL backend:
    transformers 5 otherwise picks its torchvision processor wherever torchvision is installed
    (GPU images often have it), so one checkpoint would preprocess differently from node to
    node, and only the PIL one is what ``otmel.model.light_preprocessing`` runs bit for bit."""
    import transformers
    from transformers import AutoImageProcessor

    pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}  # 4.x: PIL by default
    return AutoImageProcessor.from_pretrained(str(name_or_dir), **pil)


@dataclass
class Batch:
    """Model inputs plus per-row accounting."""

    input_ids: np.ndarray  # (B, L) int64
    attention_mask: np.ndarray  # (B, L) int64
    pixel_values: np.ndarray | None  # (B, 3, S, S) float32 (None with transform = device)
    has_image: np.ndarray  # (B,) bool
    ok: np.ndarray  # (B,) bool: False = the row cannot be linked (see errors)
    errors: list[str | None]  # per row: the reason the row is unusable, else None
    warnings: list[list[str]]  # per row: non-fatal issues (missing/corrupt image, truncated)
    #: transform = device: per row the decoded (H, W, 3) uint8 pixels, cut and reduced as
    #: decode_image does (zero-size without an image); the encoder resizes and normalises them
    image_pixels: list[np.ndarray] | None = None

    def model_inputs(self) -> dict[str, Any]:
        """The encoder inputs as torch tensors."""
        import torch

        return {k: torch.from_numpy(v) for k, v in self.arrays().items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The encoder inputs as numpy arrays (what a backend's ``encode`` takes)."""
        return {k: getattr(self, k) for k in MODEL_INPUTS}

    def __len__(self) -> int:
        return len(self.errors)


@dataclass
class IssueCounter:
    """Counts of skipped/degraded rows by reason, for reports."""

    counts: Counter = field(default_factory=Counter)

    def add(self, batch: Batch) -> None:
        for err in batch.errors:
            if err:
                self.counts[f"error: {err.split(':')[0]}"] += 1
        for ws in batch.warnings:
            for w in ws:
                self.counts[f"warning: {w.split(':')[0]}"] += 1

    def summary(self) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(self.counts.items())) or "none"


class Preprocessor:
    """Tokenizer + CLIP image processor + the text templates of the model.

    Parameters
    ----------
    tokenizer : a CLIP tokenizer (``CLIPTokenizer.from_pretrained(dir)``)
    image_processor : a CLIP image processor (resize, centre crop, normalise)
    text_length : tokens per text (pad / truncate; 40 in the release)

    The tokenizing and the image steps run on ``otmel.model.light_preprocessing`` (the tokenizer's
    Rust backend, PIL and numpy: the same ids and pixels), and a pickled Preprocessor (what
    Ray sends to preprocess tasks and training workers) carries those plus the Hugging Face
    objects as their saved files, loaded only if asked for (:attr:`tokenizer`,
    :attr:`image_processor`, :meth:`save_pretrained`): a fresh worker unpickles it without
    importing torch or transformers (~3.9 s each here; see that module for why it matters).
    """

    def __init__(self, tokenizer, image_processor, text_length: int = 40,
                 mention_template: str = MENTION_TEMPLATE, entity_template: str = ENTITY_TEMPLATE):
        from otmel.model.light_preprocessing import ClipImageSteps, TokenizerBackend

        self._hf_tokenizer = tokenizer
        self._hf_image_processor = image_processor
        self._hf_files: dict[str, bytes] | None = None  # their saved files, once pickled
        self.text_backend = TokenizerBackend.from_hf(tokenizer)  # None: the Hugging Face tokenizer tokenizes
        self.image_steps = ClipImageSteps.from_hf(image_processor)  # None: the Hugging Face processor runs
        self.text_length = text_length
        self.mention_template = mention_template
        self.entity_template = entity_template
        crop = image_processor.crop_size
        self.image_size = int(crop if isinstance(crop, int) else crop["height"])
        # images are decoded small when the processor resizes the shortest edge then keeps a
        # centred crop (CLIP's): twice the target edge keeps the final resize a real
        # downsampling, within PIXEL_TOLERANCE of decoding at full size
        size = getattr(image_processor, "size", None)
        edge = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        self.decode_edge = 2 * int(edge) if edge and getattr(image_processor, "do_center_crop", False) else None

    @classmethod
    def from_pretrained(cls, directory: str | Path, text_length: int = 40, **templates) -> "Preprocessor":
        """Load the tokenizer and image-processor files saved beside a checkpoint / ONNX dir."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory))
        return cls(tok, load_image_processor(directory), text_length, **templates)

    def save_pretrained(self, directory: str | Path) -> None:
        if self._hf_files is not None:  # a pickled copy (a training worker's): the files it carries, as saved
            Path(directory).mkdir(parents=True, exist_ok=True)
            for name, data in self._hf_files.items():
                (Path(directory) / name).write_bytes(data)
            return
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))

    # ------------------------------------------------------------------ the Hugging Face objects, on demand
    @property
    def tokenizer(self):
        if self._hf_tokenizer is None:
            self._load_hf()
        return self._hf_tokenizer

    @property
    def image_processor(self):
        if self._hf_image_processor is None:
            self._load_hf()
        return self._hf_image_processor

    def _load_hf(self) -> None:
        import tempfile

        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in self._hf_files.items():
                (Path(tmp) / name).write_bytes(data)
            self._hf_tokenizer = AutoTokenizer.from_pretrained(tmp)
            self._hf_image_processor = load_image_processor(tmp)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.text_backend is None or self.image_steps is None:
            return state  # a Hugging Face object does the work: it goes as it is
        if self._hf_files is None:  # once: Ray pickles a job's preprocessor for each of its steps
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                self.save_pretrained(tmp)
                self._hf_files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        state.update(_hf_tokenizer=None, _hf_image_processor=None, _hf_files=self._hf_files)
        return state

    # ------------------------------------------------------------------ text
    def mention_texts(self, mentions: Sequence[str | None], contexts: Sequence[str | None]) -> tuple[list[str], list[str | None]]:
        texts, errors = [], []
        for m, c in zip(mentions, contexts):
            m = (m or "").strip()
            c = (c or "").strip()
            errors.append(None if m else "empty_mention: the mention string is empty")
            texts.append(self.mention_template.format(mention=m, context=c))
        return texts, errors

    def entity_texts(self, names: Sequence[str | None], attributes: Sequence[str | None]) -> tuple[list[str], list[str | None]]:
        texts, errors = [], []
        for n, a in zip(names, attributes):
            n = (n or "").strip()
            errors.append(None if n else "empty_name: the entity name is empty")
            texts.append(self.entity_template.format(name=n, attributes=(a or "").strip()))
        return texts, errors

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        if self.text_backend is not None:
            return self.text_backend.encode(texts, self.text_length)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_length,
                             return_tensors="np", return_overflowing_tokens=False, return_length=False)
        ids = enc["input_ids"].astype(np.int64)
        mask = enc["attention_mask"].astype(np.int64)
        # truncation check: the untruncated length (cheap second pass without padding)
        lengths = [len(x) for x in self.tokenizer(texts, truncation=False)["input_ids"]]
        return ids, mask, [n > self.text_length for n in lengths]

    # ------------------------------------------------------------------ images
    def decode(self, images: Sequence[bytes | None]) -> tuple[list, list[str | None]]:
        """Each image decoded small (``decode_image``; None when missing or undecodable, with
        the reason)."""
        from otmel.io.images import ImageDecodeError, decode_image

        decoded: list = [None] * len(images)
        warn: list[str | None] = [None] * len(images)
        for i, data in enumerate(images):
            if data is None or len(data) == 0:
                warn[i] = "missing_image: no image given"
                continue
            try:  # one image at a time, shrunk as it is decoded: a batch never holds full-size images
                decoded[i] = decode_image(bytes(data), min_edge=self.decode_edge)
            except ImageDecodeError as exc:
                warn[i] = f"bad_image: {exc}"
        return decoded, warn

    def images(self, images: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """``(pixel_values (B, 3, S, S) float32, has_image (B,), warnings)`` on the CPU."""
        decoded, warn = self.decode(images)
        S = self.image_size
        pixels = np.zeros((len(images), 3, S, S), dtype=np.float32)
        where = [i for i, d in enumerate(decoded) if d is not None]
        if where and self.image_steps is not None:
            for i in where:
                pixels[i] = self.image_steps(decoded[i])
        elif where:
            pixels[where] = self.image_processor([decoded[i] for i in where], return_tensors="np")["pixel_values"]
        return pixels, np.array([d is not None for d in decoded], dtype=bool), warn

    def image_arrays(self, images: Sequence[bytes | None]) -> tuple[list[np.ndarray], np.ndarray, list[str | None]]:
        """``transform = device``: the decoded uint8 pixels per row (zero-size without an
        image), ``has_image`` and the warnings; ``otmel.model.pixels.PixelTransform`` does the rest."""
        from otmel.model.pixels import NO_IMAGE

        decoded, warn = self.decode(images)
        arrays = [NO_IMAGE if d is None else np.asarray(d, dtype=np.uint8) for d in decoded]
        return arrays, np.array([d is not None for d in decoded], dtype=bool), warn

    # ------------------------------------------------------------------ rows
    def _assemble(self, texts, errors, images, transform: str = "cpu") -> Batch:
        if transform not in IMAGE_TRANSFORMS:
            raise ValueError(f"image transform must be one of {IMAGE_TRANSFORMS}, got {transform!r}")
        ids, mask, truncated = self.tokenize(texts)
        arrays = None
        if transform == "cpu":
            pixels, has, img_warn = self.images(images)
        else:
            pixels = None
            arrays, has, img_warn = self.image_arrays(images)
        warnings: list[list[str]] = []
        for i in range(len(texts)):
            w = []
            if img_warn[i] and not img_warn[i].startswith("missing_image"):
                w.append(img_warn[i])
            if truncated[i]:
                w.append(f"truncated: text longer than {self.text_length} tokens")
            warnings.append(w)
        ok = np.array([e is None for e in errors], dtype=bool)
        return Batch(ids, mask, pixels, has, ok, list(errors), warnings, arrays)

    def mentions(self, rows: dict[str, Sequence], transform: str = "cpu") -> Batch:
        """Rows with ``mention``, ``text`` (context) and ``image`` (bytes or None)."""
        n = len(rows["mention"])
        texts, errors = self.mention_texts(rows["mention"], rows.get("text", [None] * n))
        return self._assemble(texts, errors, rows.get("image", [None] * n), transform)

    def entities(self, rows: dict[str, Sequence], transform: str = "cpu") -> Batch:
        """Rows with ``name``, ``attributes`` and ``image`` (bytes or None)."""
        n = len(rows["name"])
        texts, errors = self.entity_texts(rows["name"], rows.get("attributes", [None] * n))
        return self._assemble(texts, errors, rows.get("image", [None] * n), transform)
