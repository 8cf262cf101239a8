"""Image bytes: safe decoding (shared by import, training and linking) and PNG encoding.

Every image that enters otmel arrives as encoded bytes (a Parquet ``image`` cell, a file of a
dataset release, an object fetched from ``image_uri``). :func:`decode_image` is the one place
that turns them into pixels, so every caller gets the same guarantees: an RGB image, fully
loaded (truncated data fails here, not later inside a batch), upright (EXIF orientation
applied), transparent areas composited on white, and a pixel cap checked from the header
before any pixel is decoded (decompression bombs). CLIP preprocessing (resize, crop,
normalise) lives elsewhere and calls this.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

#: decompression-bomb guard: images above this many pixels are refused (checked from the header)
MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image (the message says why)."""


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, GIF, WebP, ...) to a fully loaded RGB image.

    Raises :class:`ImageDecodeError` for empty, corrupt or truncated data and for images of
    more than ``max_pixels`` pixels. Multi-frame images (GIF, TIFF) give their first frame.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its own limit raises) on huge images; we enforce our cap.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(bytes(data)))
            except UnidentifiedImageError as exc:
                raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes)") from exc
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the cap of {max_pixels} pixels")
            if width == 0 or height == 0:
                raise ImageDecodeError(f"image of {width}x{height} pixels is empty")
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        # OSError covers "cannot identify image file" and "image file is truncated"
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels; transparent pixels become white (logos on Wikidata are often transparent
    PNGs, which a plain RGB conversion would turn black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I;16"):  # 16-bit greyscale: scale to 8 bits before converting
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of ``image`` (deterministic for identical pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
