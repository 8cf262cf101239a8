"""One protocol, two backends: what the index and link jobs call to encode and score.

``TorchBackend`` wraps a PyTorch OT-MEL checkpoint; ``otmel.exporters.runtime.OnnxBackend``
wraps an ONNX export. Both take and return numpy arrays:

* ``encode(inputs)``: the four model inputs (``input_ids``, ``attention_mask``,
  ``pixel_values``, ``has_image``) -> the features of ``otmel.model.otmel.FEATURE_SHAPES``;
* ``score(mention, candidates)``: mention features ``(M, ...)`` and candidate entity
  features ``(M, K, ...)`` -> ``{"overall", "fused", "text", "visual"}``, each ``(M, K)``;

and expose ``preprocessor``, ``model_version``, ``config``, ``nil_threshold`` and
``feature_shapes()`` (per-row shape of every feature: what a job's driver checks).
:func:`load_backend` opens either kind of directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

SCORE_NAMES = ("overall", "fused", "text", "visual")


class Backend(Protocol):
    kind: str  # torch | onnx
    precision: str  # fp32 | fp16 | int8 (an ONNX export's; PyTorch runs fp32)
    preprocessor: object
    model_version: str
    config: dict
    nil_threshold: float | None
    coherence: dict | None  # otmel calibrate --kge-embeddings: weight, nil_threshold, embeddings_version

    def encode(self, inputs: dict[str, np.ndarray], feature_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]: ...

    def score(self, mention: dict[str, np.ndarray], candidates: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def feature_shapes(self) -> dict[str, list[int]] | None: ...


def probe_feature_shapes(backend) -> dict[str, list[int]]:
    """Per-row feature shapes of a backend that can encode: one dummy mention through it."""
    from otmel.model.features import FEATURE_NAMES
    from otmel.model.preprocessing import MODEL_INPUTS

    batch = backend.preprocessor.mentions({"mention": ["probe"], "text": [""], "image": [None]})
    feats = backend.encode({k: getattr(batch, k) for k in MODEL_INPUTS}, FEATURE_NAMES)
    return {k: list(v.shape[1:]) for k, v in feats.items()}


class TorchBackend:
    """A PyTorch model behind the backend protocol (inference mode, CPU or GPU)."""

    kind = "torch"
    precision = "fp32"

    def __init__(self, model, preprocessor, model_version: str | None = None, device: str | None = None):
        import torch

        from otmel.model.otmel import model_version as version_of

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.preprocessor = preprocessor
        self.model_version = model_version or version_of(model)
        self.config = model.config.to_dict()
        self.nil_threshold = (model.config.extra or {}).get("nil_threshold")
        self.coherence = (model.config.extra or {}).get("coherence")

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "TorchBackend":
        from otmel.model.factory import load_model

        model, pre = load_model(directory)
        return cls(model, pre)

    def feature_shapes(self) -> dict[str, list[int]]:
        return probe_feature_shapes(self)

    def _tensors(self, arrays: dict[str, np.ndarray]) -> dict:
        # read-only inputs (memory-mapped features, Ray object-store arrays) are copied: torch
        # tensors over non-writable memory are undefined behaviour
        return {k: self.torch.from_numpy(np.array(v, copy=not (isinstance(v, np.ndarray) and v.flags.writeable
                                                               and v.flags.c_contiguous))).to(self.device)
                for k, v in arrays.items()}

    def encode(self, inputs: dict[str, np.ndarray], feature_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            feats = self.model.encode(**self._tensors(inputs))
        names = feature_names or tuple(feats)
        return {k: feats[k].cpu().numpy() for k in names}

    def score(self, mention: dict[str, np.ndarray], candidates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            s = self.model.score(self._tensors(mention), self._tensors(candidates))
        return {name: getattr(s, name).cpu().numpy() for name in SCORE_NAMES}


def load_backend(uri: str, s3_endpoint: str | None = None, **kwargs) -> Backend:
    """An ONNX export dir (has export.json) or a checkpoint dir (config.json + model.safetensors).

    Remote (s3://) directories are copied to a local temp dir first.
    """
    from otmel.io.storage import is_remote

    if is_remote(uri):
        from otmel.io.storage import download_dir, scratch_dir

        # an ONNX export opened without its encoder (drivers, shard actors) does not fetch it
        skip = ("encoder.onnx",) if kwargs.get("encoder") is False else ()
        return load_backend(str(download_dir(uri, scratch_dir("otmel-model-"), s3_endpoint, exclude=skip)), **kwargs)
    d = Path(uri)
    if (d / "export.json").is_file():
        from otmel.exporters.runtime import OnnxBackend

        return OnnxBackend(d, **kwargs)
    if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
        return TorchBackend.from_checkpoint(d)
    if not d.exists():
        raise FileNotFoundError(f"{uri}: no such model directory")
    from otmel.model.otmel import CheckpointError

    raise CheckpointError(f"{uri} is neither an otmel ONNX export (export.json) nor a checkpoint "
                          "(config.json + model.safetensors)")
