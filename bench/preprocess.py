"""Preprocessing rows/s per CPU core: the CPU path vs the device path's CPU part, one run.

A GPU encoder at ViT-B/32 size takes thousands of rows/s; every row must first be tokenised
and have its image decoded and, on the CPU path, resized and normalised. This measures, in
one process on one core (the unit a preprocess task gets), for mentions with photo-sized
images (640x480 and 1280x960 JPEG, 400x300 PNG) and CLIP's 224 px processing:

* ``cpu``: ``Preprocessor.mentions`` as the preprocess tasks run it by default (tokenise,
  decode small, Hugging Face image processor);
* ``device``: the same with ``--image-transform device``: tokenise and decode only; the
  resize and normalisation (``otmel.model.pixels.PixelTransform``) run where the encoder runs,
  timed here on this CPU for reference (on a GPU it is a few kernels per image);

and the cores a GPU needs to be fed: its encode rate over the rows/s of one core. Beside
the CPU path as it runs (``otmel.model.light_preprocessing``: the tokenizer's Rust backend, PIL,
numpy), the same steps through the Hugging Face tokenizer and image processor (how they ran
before: the same ids and pixels), and what each costs a fresh worker process before its
first row: unpickling the Preprocessor Ray sends it (Ray starts preprocess tasks in fresh
workers again and again: it kills idle ones beyond one per CPU within a second).
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

from otmel.model.encoders import build_tiny_tokenizer, tiny_image_processor
from otmel.model.pixels import PixelTransform
from otmel.model.preprocessing import Preprocessor
from otmel.data.synth import SYNTH_VOCABULARY

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


FRESH_START = ("import pickle, sys, time; t = time.perf_counter(); pickle.loads(sys.stdin.buffer.read()); "
               "print(time.perf_counter() - t, 'torch' in sys.modules)")


def fresh_start(pre, repeats: int = 3) -> tuple[float, bool]:
    """(median seconds, imported torch) to unpickle ``pre`` in a new Python process."""
    import pickle
    import subprocess
    import sys

    data = pickle.dumps(pre)
    runs = [subprocess.run([sys.executable, "-c", FRESH_START], input=data, capture_output=True, check=True).stdout.split()
            for _ in range(repeats)]
    return float(np.median([float(r[0]) for r in runs])), runs[0][1] == b"True"


def hugging_face_path(pre: Preprocessor) -> Preprocessor:
    """The same Preprocessor running (and pickled with) the Hugging Face objects, as before
    ``otmel.model.light_preprocessing``."""
    import copy

    old = copy.copy(pre)
    old._hf_tokenizer, old._hf_image_processor = pre.tokenizer, pre.image_processor
    old.text_backend = old.image_steps = None
    return old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--gpu-rows-per-s", type=float, default=7000.0,
                    help="what one GPU encodes at ViT-B/32 size (issue 14's figure for a current GPU)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "preprocess.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core, as a preprocess task has
    pre = Preprocessor(build_tiny_tokenizer(SYNTH_VOCABULARY), tiny_image_processor(224), text_length=40)
    transform = PixelTransform(pre.image_steps, "cpu")
    hf = hugging_face_path(pre)
    texts = [" ".join(np.random.default_rng(i).choice(SYNTH_VOCABULARY, 30)) for i in range(args.rows)]
    rows = []
    for kind, (w, h, fmt) in KINDS.items():
        images = [photo(w, h, fmt, i) for i in range(args.rows)]
        batch = {"mention": [t.split()[0] for t in texts], "text": texts, "image": images}
        cpu = best_of(lambda: pre.mentions(batch, "cpu"))
        cpu_hf = best_of(lambda: hf.mentions(batch, "cpu"))
        assert np.array_equal(pre.mentions(batch, "cpu").pixel_values, hf.mentions(batch, "cpu").pixel_values)
        dev = best_of(lambda: pre.mentions(batch, "device"))
        arrays = pre.mentions(batch, "device").image_pixels
        tr = best_of(lambda: transform(arrays))
        text_only = best_of(lambda: pre.tokenize(texts))
        rows.append((kind, args.rows / cpu, args.rows / cpu_hf, args.rows / dev, args.rows / tr, args.rows / text_only))
        print(rows[-1], flush=True)
    g = args.gpu_rows_per_s
    lines = [
        "# Preprocessing rows/s per core: CPU path vs device path",
        "",
        f"`.venv/bin/python bench/preprocess.py --rows {args.rows}` on {platform.machine()}, {os.cpu_count()} cores "
        f"(one used), {datetime.date.today()}. Mentions of 30 words (CLIP tokenizer, 40 tokens) with one image each, "
        "CLIP's 224 px processing; best of 3 batches of the same rows.",
        "",
        f"| images | CPU path rows/s per core | ... through the Hugging Face objects (before) | device path (CPU "
        f"part) rows/s per core | x | cores per GPU at {g:,.0f} rows/s: CPU path | device path | the device's "
        "resize+normalise, here on 1 CPU core, rows/s | tokenising alone, rows/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, cpu, cpu_hf, dev, tr, tok in rows:
        lines.append(f"| {kind} | {cpu:,.0f} | {cpu_hf:,.0f} | {dev:,.0f} | {dev / cpu:.1f} | {g / cpu:,.0f} | "
                     f"{g / dev:,.0f} | {tr:,.0f} | {tok:,.0f} |")
    light_start, light_torch = fresh_start(pre)
    hf_start, hf_torch = fresh_start(hf)
    lines += ["", "A fresh worker's start: unpickling the Preprocessor a preprocess task receives, in a new Python "
              "process (median of 3):", "",
              "| preprocessing | seconds | imports torch |", "|---|---:|---|",
              f"| `otmel.model.light_preprocessing` (now) | {light_start:.2f} | {'yes' if light_torch else 'no'} |",
              f"| the Hugging Face tokenizer and image processor (before) | {hf_start:.2f} | "
              f"{'yes' if hf_torch else 'no'} |"]
    lines += ["", "On a GPU node `--image-transform auto` sends the decoded uint8 pixels to the encode actor "
              "(`device`); the preprocess tasks then need the cores of the device column. The machine is shared "
              "and noisy: compare within one run."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
