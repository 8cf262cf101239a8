"""Large images are decoded small, one at a time: a batch of near-cap images stays within a
pixel budget, and the model's pixel tensors stay within a stated tolerance of decoding at
full size."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: max |difference| of normalised pixel values (CLIP mean/std: ~1/0.27 per unit of 0..1)
#: between decoding small and decoding at full size, measured on the images below
PIXEL_TOLERANCE = 0.05


def _photo_like(width: int, height: int, seed: int = 0, noise: float = 6.0) -> Image.Image:
    """Smooth gradients plus mild noise: like a photo, unlike pure noise (which no
    resampling preserves) or a flat colour (which any preserves). Each channel is a function
    of x, of y or of x + y, computed once per value and laid out by broadcasting (a 7000x7000
    image took ~4 s as float arrays over every pixel)."""
    rng = np.random.default_rng(seed)
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    r = 127 + 120 * np.sin(x / width * 6.0)
    g = 127 + 120 * np.cos(y / height * 4.0)
    b = 127 + 100 * np.sin(np.arange(width + height, dtype=np.float32) / (width + height) * 9.0)  # by x + y
    if not noise:
        r, g, b = (np.clip(c, 0, 255).astype(np.uint8) for c in (r, g, b))
    img = np.empty((height, width, 3), np.uint8 if not noise else np.float32)
    img[:, :, 0], img[:, :, 1] = r[None, :], g[:, None]
    img[:, :, 2] = np.lib.stride_tricks.sliding_window_view(b, width)[:height]  # row y: b[y:y + width]
    if noise:
        img = np.clip(img + rng.normal(0, noise, (height, width, 1)).astype(np.float32), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def _preprocessor(edge: int):
    from otmel.model.encoders import build_tiny_tokenizer, tiny_image_processor
    from otmel.model.preprocessing import Preprocessor

    return Preprocessor(build_tiny_tokenizer(["paris"]), tiny_image_processor(edge))


@pytest.mark.parametrize("size,fmt", [((3000, 2000), "JPEG"), ((2600, 2600), "PNG"), ((4000, 700), "PNG"),
                                      ((900, 5000), "JPEG")])
def test_decoding_small_gives_the_full_size_pixels_within_the_tolerance(size, fmt):
    from otmel.io.images import decode_image

    pre = _preprocessor(224)  # CLIP's real input size
    assert pre.decode_edge == 448
    data = _encoded(_photo_like(*size), fmt)
    small, has, warn = pre.images([data])
    full = pre.image_processor([decode_image(data)], return_tensors="np")["pixel_values"].astype(np.float32)
    assert has[0] and warn[0] is None and small.shape == full.shape == (1, 3, 224, 224)
    assert np.abs(small - full).max() < PIXEL_TOLERANCE
    assert max(decode_image(data, min_edge=448).size) <= 2 * 2 * 448  # what the batch holds


def test_small_images_are_untouched():
    from otmel.io.images import decode_image

    pre = _preprocessor(224)
    data = _encoded(_photo_like(500, 400), "PNG")
    full = pre.image_processor([decode_image(data)], return_tensors="np")["pixel_values"]
    assert np.array_equal(pre.images([data])[0], full.astype(np.float32))


def test_a_batch_of_near_cap_images_stays_within_a_pixel_budget(tmp_path):
    """Four 7000x7000 PNGs (49 M pixels each, under the 50 M cap): decoded one at a time and
    shrunk at once, the preprocessing process grows by about one full-size image, not four
    (decoding them all first grew it by 2.3 GB for six)."""
    img = _photo_like(7000, 7000, noise=0)  # smooth: quick to encode; decoding costs the same pixels
    (tmp_path / "big.png").write_bytes(_encoded(img, "PNG"))
    code = f"""
import json
from pathlib import Path
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_image_decoding import _preprocessor
pre = _preprocessor(224)
data = Path({str(tmp_path / 'big.png')!r}).read_bytes()
open('/proc/self/clear_refs', 'w').write('5')
base = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:'))
pixels, has, warn = pre.images([data] * 4)
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(json.dumps({{"growth_mb": (hwm - base) / 1024, "has": has.tolist(), "warn": warn}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["has"] == [True] * 4 and report["warn"] == [None] * 4
    one_image_mb = 7000 * 7000 * 3 / 2**20  # 140 MB of RGB
    print("growth MB", report["growth_mb"])
    assert report["growth_mb"] < 2 * one_image_mb, report  # measured 196 MB (2,306 MB for six, decoding all first)
