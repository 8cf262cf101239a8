"""ONNX export of a trained OT-MEL (``otmel export``), verified against PyTorch.

    otmel export --checkpoint CKPT_URI --out ONNX_URI [--opset N] [--fp16] [--int8] [--mode kd|ot|att]

Two graphs, because linking encodes once and scores many candidates:

* ``encoder.onnx``: input_ids, attention_mask, pixel_values, has_image -> every feature of
  ``otmel.model.otmel.FEATURE_SHAPES`` except ``has_image`` (the runtime passes that input
  through). One graph serves mentions and entities (shared encoder).
* ``matcher.onnx``: mention features ``mention_*`` (M, ...) and candidate entity features
  ``entity_*`` (M, K, ...) -> ``overall`` (S_O), ``fused``, ``text``, ``visual``, each (M, K).

Batch and K are dynamic; the text length and image size are fixed and recorded in
``export.json``. The default for a ``kd`` checkpoint is its attention path (no Sinkhorn);
``--mode ot`` exports the OT teacher with the Sinkhorn iterations unrolled.

Files are written into a temporary directory, checked with ``onnx.checker``, compared with
PyTorch (max abs diff per output on a fixed random batch, several batch sizes and K), and
only then moved to ``--out``: a failed export never looks finished.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from otmel.backend import SCORE_NAMES
from otmel.model.otmel import ENTITY_FEATURES, FEATURE_NAMES, MENTION_FEATURES, OTMEL, model_version

log = logging.getLogger(__name__)

ENCODER_INPUTS = ("input_ids", "attention_mask", "pixel_values", "has_image")
#: encoder outputs: has_image is an input passed through by the runtime (an ONNX graph
#: cannot give an output the name of an input)
ENCODER_OUTPUTS = tuple(k for k in FEATURE_NAMES if k != "has_image")
MATCHER_MENTION_INPUTS = tuple(f"mention_{k}" for k in MENTION_FEATURES)
MATCHER_ENTITY_INPUTS = tuple(f"entity_{k}" for k in ENTITY_FEATURES)
DEFAULT_OPSET = 17
#: max abs diff allowed between ONNX Runtime and PyTorch, per precision
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "int8": 0.5}
PREPROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "preprocessor_config.json")


class ExportError(RuntimeError):
    """The export could not produce a verified ONNX model (the message says why)."""


@dataclass
class ExportConfig:
    """What ``otmel export`` needs."""

    checkpoint: str  # checkpoint dir URI (config.json + model.safetensors + preprocessor files)
    out: str  # ONNX dir URI
    opset: int = DEFAULT_OPSET
    fp16: bool = False  # also convert to fp16 (weights and compute; I/O stays fp32)
    int8: bool = False  # dynamic int8 quantisation of the MatMul weights (CPU)
    mode: str | None = None  # kd | ot | att; None = the checkpoint's own
    s3_endpoint: str | None = None
    parity_batches: tuple[int, ...] = (1, 3, 8)  # batch sizes checked for parity
    parity_k: tuple[int, ...] = (1, 5)  # candidate counts checked for parity


# ---------------------------------------------------------------------- graph wrappers
class EncoderGraph(nn.Module):
    def __init__(self, model: OTMEL):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pixel_values, has_image):
        f = self.model.encode(input_ids, attention_mask, pixel_values, has_image)
        return tuple(f[k] for k in ENCODER_OUTPUTS)


class MatcherGraph(nn.Module):
    def __init__(self, model: OTMEL):
        super().__init__()
        self.model = model

    def forward(self, *tensors):
        n = len(MENTION_FEATURES)
        mention = dict(zip(MENTION_FEATURES, tensors[:n]))
        entity = dict(zip(ENTITY_FEATURES, tensors[n:]))
        s = self.model.score(mention, entity)
        return tuple(getattr(s, name) for name in SCORE_NAMES)


def resolve_method(checkpoint_mode: str, requested: str | None) -> tuple[str, str]:
    """(export mode, assignment method) for a checkpoint mode and a requested ``--mode``."""
    requested = requested or checkpoint_mode
    allowed = {"kd": ("kd", "att", "ot"), "att": ("att",), "ot": ("ot",)}[checkpoint_mode]
    if requested not in allowed:
        raise ExportError(f"--mode {requested} cannot be exported from a {checkpoint_mode!r} checkpoint "
                          f"(its trained paths: {', '.join(allowed)})")
    return requested, "ot" if requested == "ot" else "att"


def example_inputs(model: OTMEL, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch: padded texts of varied length, some rows without an image."""
    g = torch.Generator().manual_seed(seed)
    L = model.config.text_length
    vocab = model.encoder.clip.config.text_config.vocab_size
    eos = model.encoder.clip.config.text_config.eos_token_id
    eos = eos if isinstance(eos, int) else 2
    lengths = torch.randint(3, L + 1, (batch,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(0, vocab, (batch, L), generator=g)
    ids[torch.arange(batch), lengths - 1] = eos
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, eos))
    size = model.encoder.clip.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    has_image = torch.rand(batch, generator=g) < 0.7
    has_image[0] = True
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "has_image": has_image}


def _candidates(features: dict[str, torch.Tensor], k: int, seed: int) -> dict[str, torch.Tensor]:
    """Entity features (M, K, ...) drawn from a batch of encoded rows."""
    n = features["fused"].shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n, k), generator=g)
    return {name: features[name][idx] for name in ENTITY_FEATURES}


def _export_graphs(model: OTMEL, tmp: Path, opset: int) -> None:
    enc_in = example_inputs(model, 2)
    with torch.no_grad():
        feats = model.encode(**enc_in)
    dyn = {name: {0: "batch"} for name in (*ENCODER_INPUTS, *ENCODER_OUTPUTS)}
    torch.onnx.export(EncoderGraph(model).eval(), tuple(enc_in[k] for k in ENCODER_INPUTS), str(tmp / "encoder.onnx"),
                      input_names=list(ENCODER_INPUTS), output_names=list(ENCODER_OUTPUTS), dynamic_axes=dyn,
                      opset_version=opset, dynamo=False)
    mention = tuple(feats[k] for k in MENTION_FEATURES)
    cands = _candidates(feats, 3, seed=1)
    entity = tuple(cands[k] for k in ENTITY_FEATURES)
    dyn = {name: {0: "batch"} for name in MATCHER_MENTION_INPUTS}
    dyn.update({name: {0: "batch", 1: "candidates"} for name in MATCHER_ENTITY_INPUTS})
    dyn.update({name: {0: "batch", 1: "candidates"} for name in SCORE_NAMES})
    torch.onnx.export(MatcherGraph(model).eval(), mention + entity, str(tmp / "matcher.onnx"),
                      input_names=[*MATCHER_MENTION_INPUTS, *MATCHER_ENTITY_INPUTS], output_names=list(SCORE_NAMES),
                      dynamic_axes=dyn, opset_version=opset, dynamo=False)


def _convert(tmp: Path, precision: str) -> None:
    """Convert encoder.onnx / matcher.onnx in place to fp16 or int8."""
    import onnx

    for name in ("encoder.onnx", "matcher.onnx"):
        path = tmp / name
        if precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            from onnxruntime.transformers.onnx_model import OnnxModel

            m = OnnxModel(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True))
            m.topological_sort()  # the converter appends its input casts out of order
            onnx.save(m.model, str(path))
        elif precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            out = path.with_suffix(".int8.onnx")
            quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
            out.replace(path)


def check_parity(model: OTMEL, onnx_dir: Path, batches=(1, 3, 8), ks=(1, 5), threads: int = 2) -> dict[str, float]:
    """Max abs diff ONNX Runtime vs PyTorch per output over several batch sizes and K."""
    from otmel.exporters.runtime import OnnxBackend

    backend = OnnxBackend(onnx_dir, threads=threads)
    worst: dict[str, float] = {}
    for b in batches:
        inputs = example_inputs(model, b, seed=100 + b)
        with torch.no_grad():
            ref = model.encode(**inputs)
        got = backend.encode({k: v.numpy() for k, v in inputs.items()})
        for name in ENCODER_OUTPUTS:
            diff = float(np.max(np.abs(got[name].astype(np.float64) - ref[name].numpy().astype(np.float64)), initial=0))
            worst[f"encoder.{name}"] = max(worst.get(f"encoder.{name}", 0.0), diff)
        for k in ks:
            cands = _candidates(ref, k, seed=200 + k)
            with torch.no_grad():
                s = model.score({n: ref[n] for n in MENTION_FEATURES}, cands)
            got_s = backend.score({n: ref[n].numpy() for n in MENTION_FEATURES}, {n: v.numpy() for n, v in cands.items()})
            for name in SCORE_NAMES:
                diff = float(np.max(np.abs(got_s[name].astype(np.float64) - getattr(s, name).numpy().astype(np.float64))))
                worst[f"matcher.{name}"] = max(worst.get(f"matcher.{name}", 0.0), diff)
    return worst


def _io_spec(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def dims(t):
        return [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]

    return {"inputs": {i.name: dims(i) for i in m.graph.input}, "outputs": {o.name: dims(o) for o in m.graph.output}}


def export(cfg: ExportConfig) -> dict:
    """Export, verify and publish; returns the export.json content."""
    import onnx
    import onnxruntime

    import otmel
    from otmel.model.factory import load_model
    from otmel.io.integrity import file_table
    from otmel.model.otmel import CheckpointError
    from otmel.io.storage import is_remote, local_copy, upload_dir

    if cfg.fp16 and cfg.int8:
        raise ExportError("choose one of --fp16 and --int8")
    precision = "fp16" if cfg.fp16 else "int8" if cfg.int8 else "fp32"
    t0 = time.perf_counter()
    with local_copy(cfg.checkpoint, cfg.s3_endpoint) as ckpt_dir:
        try:
            model, _pre = load_model(ckpt_dir)
        except (CheckpointError, OSError, ValueError) as exc:
            raise ExportError(f"{cfg.checkpoint}: cannot load an otmel checkpoint: {exc}") from exc
        ckpt_files = {f: (Path(ckpt_dir) / f).read_bytes() for f in PREPROCESSOR_FILES if (Path(ckpt_dir) / f).exists()}
    mode, method = resolve_method(model.config.mode, cfg.mode)
    model.eval()
    model.inference_method = method
    version = model_version(model)

    with tempfile.TemporaryDirectory(prefix="otmel-export-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            _export_graphs(model, tmp, cfg.opset)
        except Exception as exc:  # a torch op that does not export: one clear line
            raise ExportError(f"torch.onnx.export failed for mode {mode}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        fp32_parity = None
        if precision != "fp32":
            # parity of the fp32 graphs first, so a conversion problem is told apart from an export bug
            _write_side_files(tmp, ckpt_files, model, {})
            fp32_parity = check_parity(model, tmp, cfg.parity_batches, cfg.parity_k)
            _convert(tmp, precision)
        for name in ("encoder.onnx", "matcher.onnx"):
            try:
                onnx.checker.check_model(str(tmp / name))
            except Exception as exc:
                raise ExportError(f"{name} fails onnx.checker: {exc}") from exc
        _write_side_files(tmp, ckpt_files, model, {})
        parity = check_parity(model, tmp, cfg.parity_batches, cfg.parity_k)
        tol = TOLERANCE[precision]
        bad = {k: v for k, v in parity.items() if not v <= tol}
        if bad:
            raise ExportError(f"ONNX ({precision}) differs from PyTorch beyond {tol}: "
                              + ", ".join(f"{k}={v:.3g}" for k, v in sorted(bad.items())))
        cfg_dict = model.config.to_dict()
        meta = {
            "format": "otmel-onnx/1",
            "model_version": version,
            "export_mode": mode,
            "assignment": method,
            "precision": precision,
            "nil_threshold": (model.config.extra or {}).get("nil_threshold"),
            "coherence": (model.config.extra or {}).get("coherence"),
            "opset": cfg.opset,
            "text_length": model.config.text_length,
            "image_size": model.encoder.clip.config.vision_config.image_size,
            "vision_tokens": model.num_vision_tokens,
            "versions": {"otmel": otmel.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
            "encoder": _io_spec(tmp / "encoder.onnx"),
            "matcher": _io_spec(tmp / "matcher.onnx"),
            "parity_max_abs_diff": parity,
            "parity_tolerance": tol,
            "parity_fp32_before_conversion": fp32_parity,
            "checkpoint": cfg.checkpoint,
            "checkpoint_config": cfg_dict,
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        # every other file's size and sha256: the runtime refuses a modified file (otmel.io.integrity)
        meta["files"] = file_table(tmp, exclude=("export.json",))
        _write_side_files(tmp, ckpt_files, model, meta)
        if is_remote(cfg.out):
            upload_dir(tmp, cfg.out, cfg.s3_endpoint)
        else:
            out = Path(cfg.out)
            staging = out.with_name(out.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(tmp, staging)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)  # the finished export appears at once
    log.info("exported %s (%s, %s) to %s; worst parity %.2e", cfg.checkpoint, mode, precision, cfg.out,
             max(parity.values()))
    return meta


def _write_side_files(tmp: Path, ckpt_files: dict[str, bytes], model: OTMEL, meta: dict) -> None:
    for name, data in ckpt_files.items():
        (tmp / name).write_bytes(data)
    cfg = model.config.to_dict()
    cfg["clip_config"] = model.encoder.clip.config.to_dict()
    (tmp / "config.json").write_text(json.dumps({**cfg, "format": "otmel-onnx-config/1"}, indent=2, sort_keys=True))
    if meta:
        (tmp / "export.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    elif not (tmp / "export.json").exists():
        (tmp / "export.json").write_text(json.dumps({"format": "otmel-onnx/1", "partial": True,
                                                     "text_length": model.config.text_length,
                                                     "model_version": "", "nil_threshold": None}))


__all__ = ["ExportConfig", "ExportError", "export", "check_parity", "resolve_method"]
