"""`otmel export`: a checkpoint to ONNX (encoder + matcher), verified against PyTorch."""

from __future__ import annotations

import sys

from otmel.cli.common import integer, location, say


def cmd_export(args) -> int:
    from otmel.exporters.onnx import ExportConfig, ExportError, export

    cfg = ExportConfig(checkpoint=args.checkpoint, out=args.out, opset=args.opset,
                       fp16=args.fp16 or args.precision == "fp16", int8=args.int8 or args.precision == "int8",
                       mode=args.mode, s3_endpoint=args.s3_endpoint)
    try:
        meta = export(cfg)
    except ExportError as exc:
        print(f"otmel export: error: {exc}", file=sys.stderr)
        return 2
    worst = max(meta["parity_max_abs_diff"].values())
    say(f"exported {meta['export_mode']} ({meta['assignment']}, {meta['precision']}, opset {meta['opset']}) to "
           f"{args.out}: encoder.onnx + matcher.onnx, max |ONNX - PyTorch| = {worst:.2e} "
           f"(tolerance {meta['parity_tolerance']:g}), model_version {meta['model_version'][:12]}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("export", help="ONNX export (encoder.onnx + matcher.onnx), verified against PyTorch")
    s.add_argument("--checkpoint", type=location, required=True)
    s.add_argument("--out", type=location, required=True)
    s.add_argument("--opset", type=integer(7), default=17)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                   help="fp32 (default), fp16 (weights and compute; on a GPU with onnxruntime-gpu's CUDA provider) or "
                        "int8 (dynamic quantisation of the matmul weights: the fastest on CPU; measure its H@1 on "
                        "your data first: bench/results/export.md)")
    g.add_argument("--fp16", action="store_true", help="= --precision fp16")
    g.add_argument("--int8", action="store_true", help="= --precision int8")
    s.add_argument("--mode", choices=["kd", "ot", "att"], default=None,
                   help="default: the checkpoint's own (kd exports its attention path; --mode ot its OT teacher)")
    s.add_argument("--s3-endpoint", default=None)
    s.set_defaults(func=cmd_export)
