"""Preprocessing rows/s per CPU core: the CPU path vs the device path's CPU part, one run.

A GPU encoder at ViT-B/32 size takes thousands of rows/s; every row must first be tokenised
and have its image decoded and, on the CPU path, resized and normalised. This measures, in
one process on one core (the unit a preprocess task gets), for mentions with photo-sized
images (640x480 and 1280x960 JPEG, 400x300 PNG) and CLIP's 224 px processing:

* ``cpu``: ``Preprocessor.mentions`` as the preprocess tasks run it by default (tokenise,
  decode small, Hugging Face image processor);
* ``device``: the same with ``--image-transform device``: tokenise and decode only; the
  resize and normalisation (``otmel.pixels.PixelTransform``) run where the encoder runs,
  timed here on this CPU for reference (on a GPU it is a few kernels per image);

and the cores a GPU needs to be fed: its encode rate over the rows/s of one core.
Writes bench/results/preprocess.md.

    .venv/bin/python bench/preprocess.py [--rows 256] [--gpu-rows-per-s 7000]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from otmel.encoders import build_tiny_tokenizer, tiny_image_processor
from otmel.pixels import PixelTransform
from otmel.preprocessing import Preprocessor
from otmel.synth import SYNTH_VOCABULARY

KINDS = {"640x480 JPEG": (640, 480, "JPEG"), "1280x960 JPEG": (1280, 960, "JPEG"), "400x300 PNG": (400, 300, "PNG")}


def photo(width: int, height: int, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = (rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = Image.fromarray(np.clip(base + rng.integers(-10, 11, base.shape), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--gpu-rows-per-s", type=float, default=7000.0,
                    help="what one GPU encodes at ViT-B/32 size (issue 14's figure for a current GPU)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "preprocess.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core, as a preprocess task has
    pre = Preprocessor(build_tiny_tokenizer(SYNTH_VOCABULARY), tiny_image_processor(224), text_length=40)
    transform = PixelTransform(pre.image_processor, "cpu")
    texts = [" ".join(np.random.default_rng(i).choice(SYNTH_VOCABULARY, 30)) for i in range(args.rows)]
    rows = []
    for kind, (w, h, fmt) in KINDS.items():
        images = [photo(w, h, fmt, i) for i in range(args.rows)]
        batch = {"mention": [t.split()[0] for t in texts], "text": texts, "image": images}
        cpu = best_of(lambda: pre.mentions(batch, "cpu"))
        dev = best_of(lambda: pre.mentions(batch, "device"))
        arrays = pre.mentions(batch, "device").image_pixels
        tr = best_of(lambda: transform(arrays))
        text_only = best_of(lambda: pre.tokenize(texts))
        rows.append((kind, args.rows / cpu, args.rows / dev, args.rows / tr, args.rows / text_only))
        print(rows[-1], flush=True)
    g = args.gpu_rows_per_s
    lines = [
        "# Preprocessing rows/s per core: CPU path vs device path",
        "",
        f"`.venv/bin/python bench/preprocess.py --rows {args.rows}` on {platform.machine()}, {os.cpu_count()} cores "
        f"(one used), {datetime.date.today()}. Mentions of 30 words (CLIP tokenizer, 40 tokens) with one image each, "
        "CLIP's 224 px processing; best of 3 batches of the same rows.",
        "",
        f"| images | CPU path rows/s per core | device path (CPU part) rows/s per core | x | cores per GPU at "
        f"{g:,.0f} rows/s: CPU path | device path | the device's resize+normalise, here on 1 CPU core, rows/s | "
        "tokenising alone, rows/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, cpu, dev, tr, tok in rows:
        lines.append(f"| {kind} | {cpu:,.0f} | {dev:,.0f} | {dev / cpu:.1f} | {g / cpu:,.0f} | {g / dev:,.0f} | "
                     f"{tr:,.0f} | {tok:,.0f} |")
    lines += ["", "On a GPU node `--image-transform auto` sends the decoded uint8 pixels to the encode actor "
              "(`device`); the preprocess tasks then need the cores of the device column. The machine is shared "
              "and noisy: compare within one run."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
