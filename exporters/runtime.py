"""ONNX Runtime sessions for an otmel export: the ``OnnxBackend`` of ``otmel.backend``.

Providers: CUDAExecutionProvider when onnxruntime-gpu is installed and a GPU is visible,
else the CPU provider. Thread counts are set explicitly (small machines: a session per
actor must not grab every core). No IOBinding: inputs are numpy arrays, batched here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from otmel.backend import SCORE_NAMES, probe_feature_shapes
from otmel.model.features import ENTITY_FEATURES, FEATURE_NAMES, MENTION_FEATURES

log = logging.getLogger(__name__)

ENCODER_INPUTS = ("input_ids", "attention_mask", "pixel_values", "has_image")
_INPUT_DTYPES = {"input_ids": np.int64, "attention_mask": np.int64, "pixel_values": np.float32, "has_image": np.bool_}


def gpu_available() -> bool:
    """A CUDA device usable by onnxruntime-gpu (checked without importing torch.cuda state)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return os.path.exists("/dev/nvidia0")


def providers(prefer_gpu: bool = True) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if prefer_gpu and gpu_available() else ["CPUExecutionProvider"]


def session_options(threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or max(1, min(4, os.cpu_count() or 1))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def _verify_export(d: Path, meta: dict, encoder: bool) -> None:
    """The files this backend opens, checked against export.json's table before ONNX Runtime
    or the tokenizer reads them (the encoder graph only when it is loaded)."""
    from otmel.io.integrity import verify_files

    table = meta.get("files")
    if table is None and meta.get("partial"):  # the exporter's own parity check, before export.json is final
        return
    if table is None:
        log.warning("%s/export.json has no file table (an older export): loading it unverified", d)
        return
    names = [n for n in sorted(table) if encoder or n != "encoder.onnx"]
    verify_files(d, table, names, what="recorded in export.json")


class OnnxBackend:
    """encoder.onnx + matcher.onnx + the preprocessor files of one export directory."""

    kind = "onnx"

    def __init__(self, onnx_dir: str | Path, threads: int | None = None, prefer_gpu: bool = True, batch_size: int = 64,
                 encoder: bool = True):
        """``encoder=False`` opens the matcher only (index-shard actors score, never encode)."""
        import onnxruntime as ort

        d = Path(onnx_dir)
        meta_path = d / "export.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{d}: not an otmel ONNX export (no export.json)")
        self.meta = json.loads(meta_path.read_text())
        _verify_export(d, self.meta, encoder)
        self.config = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        self.model_version = self.meta.get("model_version", "")
        self.precision = self.meta.get("precision", "fp32")  # fp32 | fp16 | int8 (otmel export --precision)
        self.nil_threshold = self.meta.get("nil_threshold")
        self.coherence = self.meta.get("coherence")
        self.batch_size = batch_size
        opts = session_options(threads)
        prov = providers(prefer_gpu)
        self.encoder = ort.InferenceSession(str(d / "encoder.onnx"), opts, providers=prov) if encoder else None
        self.matcher = ort.InferenceSession(str(d / "matcher.onnx"), opts, providers=prov)
        self.encoder_outputs = [o.name for o in self.encoder.get_outputs()] if encoder else []
        # the exporter drops graph inputs a mode does not use (e.g. has_image when images are
        # not masked), so feed only what the matcher declares
        self.matcher_inputs = {i.name for i in self.matcher.get_inputs()}
        known = {f"mention_{k}" for k in MENTION_FEATURES} | {f"entity_{k}" for k in ENTITY_FEATURES}
        if self.matcher_inputs - known:  # e.g. entity_text_summary_proj: stored by index format 1
            raise ValueError(f"{d}/matcher.onnx takes inputs this otmel does not provide "
                                    f"({', '.join(sorted(self.matcher_inputs - known))}): it was exported by an older "
                                    "otmel; export the checkpoint again (otmel export)")
        self.dir = d
        self._preprocessor = None
        log.info("ONNX backend %s on %s", d, prov[0])

    @property
    def preprocessor(self):
        """The export's tokenizer and image processor (files verified above), loaded on first
        use: a shard actor never needs them and an encode actor only for ``--image-transform
        device``, while loading them imports transformers' processing stack, ~4-6 s of CPU in
        a fresh Ray worker (measured at ViT-B/32 size: 6.2 -> ~2 s for a shard actor's start,
        10.3 -> ~4 s for an encode actor's), which on a small node the other actors' start-up
        waits for."""
        if self._preprocessor is None:
            from otmel.model.preprocessing import Preprocessor

            self._preprocessor = Preprocessor.from_pretrained(
                self.dir, self.meta.get("text_length", 40),
                **{k: self.config[k] for k in ("mention_template", "entity_template") if k in self.config})
        return self._preprocessor

    def feature_shapes(self) -> dict[str, list[int]] | None:
        """Per-row shape of every encoder output, from export.json (the graph's output spec, its
        symbolic text/vision lengths resolved by ``text_length``/``vision_tokens``): what a job's
        driver needs without loading the encoder. An export that does not record them all as
        numbers is probed through its encoder; ``None`` if it was opened without one."""
        outputs = (self.meta.get("encoder") or {}).get("outputs") or {}
        lengths = {"text": self.meta.get("text_length"), "vision": self.meta.get("vision_tokens")}
        shapes = {"has_image": []}  # the input flag, passed through by encode()
        for name, dims in outputs.items():
            row = list(dims[1:])
            if row and not isinstance(row[0], int):  # (B, L, ...): L is the text or vision length
                row[0] = lengths.get(name.split("_", 1)[0])
            shapes[name] = row
        if all(k in shapes and all(isinstance(d, int) for d in shapes[k]) for k in FEATURE_NAMES):
            return {k: shapes[k] for k in FEATURE_NAMES}
        return probe_feature_shapes(self) if self.encoder is not None else None

    def encode(self, inputs: dict[str, np.ndarray], feature_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        if self.encoder is None:
            raise RuntimeError("this ONNX backend was opened without its encoder (encoder=False)")
        n = len(inputs["input_ids"])
        chunks: list[dict[str, np.ndarray]] = []
        for start in range(0, max(n, 1), self.batch_size):
            feed = {k: np.ascontiguousarray(inputs[k][start:start + self.batch_size], dtype=_INPUT_DTYPES[k])
                    for k in ENCODER_INPUTS}
            outs = self.encoder.run(self.encoder_outputs, feed)
            part = dict(zip(self.encoder_outputs, outs))
            part["has_image"] = feed["has_image"]
            chunks.append(part)
        names = feature_names or tuple(chunks[0])
        return {k: np.concatenate([c[k] for c in chunks]) for k in names}

    def score(self, mention: dict[str, np.ndarray], candidates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {f"mention_{k}": np.ascontiguousarray(mention[k]) for k in MENTION_FEATURES
                if f"mention_{k}" in self.matcher_inputs}
        feed.update({f"entity_{k}": np.ascontiguousarray(candidates[k]) for k in ENTITY_FEATURES
                     if f"entity_{k}" in self.matcher_inputs})
        outs = self.matcher.run(list(SCORE_NAMES), feed)
        return dict(zip(SCORE_NAMES, outs))
