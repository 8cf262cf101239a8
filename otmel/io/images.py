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
import math

from PIL import Image, ImageOps, UnidentifiedImageError

#: decompression-bomb guard: images above this many pixels are refused (checked from the header)
MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image (the message says why)."""


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int = MAX_PIXELS,
                 min_edge: int | None = None) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, GIF, WebP, ...) to a fully loaded RGB image.

    Raises :class:`ImageDecodeError` for empty, corrupt or truncated data and for images of
    more than ``max_pixels`` pixels. Multi-frame images (GIF, TIFF) give their first frame.

    With ``min_edge`` (the size a model will resize the shortest edge to, with margin), a
    large image is decoded small: JPEG at a reduced DCT scale (``draft``: never below
    ``min_edge``), any format shrunk by an integer box reduction right after decoding, so a
    batch holds small images, not full-resolution ones (see :func:`shrink_for_model`).
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image bytes")
    # No warnings.catch_warnings() here: it is not thread-safe, and the cap below is checked
    # from the header before any pixel is decoded (Pillow itself refuses > 2x its own limit).
    try:
        try:
            img = Image.open(io.BytesIO(bytes(data)))
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes)") from exc
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the cap of {max_pixels} pixels")
        if width == 0 or height == 0:
            raise ImageDecodeError(f"image of {width}x{height} pixels is empty")
        if min_edge and img.format == "JPEG" and min(width, height) >= 2 * min_edge:
            scale = min_edge / min(width, height)
            img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        img.load()
        img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img  # a copy only when rotated
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's format plugins raise OSError, SyntaxError,
        # struct.error, IndexError, ... on corrupt or hostile bytes: all mean "not decodable"
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return shrink_for_model(_to_rgb(img), min_edge) if min_edge else _to_rgb(img)


def shrink_for_model(img: Image.Image, min_edge: int) -> Image.Image:
    """A decoded image reduced for a model that resizes its shortest edge to at most
    ``min_edge / 2`` and keeps a centred square: the long side is cut to twice the short one
    around the centre (the square the model keeps, with margin), then an integer box
    reduction keeps the shortest edge >= ``min_edge``. Pixels after this: at most
    2 x (2 x min_edge)^2 per image, whatever the input's size."""
    w, h = img.size
    short = min(w, h)
    if max(w, h) > 2 * short:
        if w > h:
            left = (w - 2 * short) // 2
            img = img.crop((left, 0, left + 2 * short, h))
        else:
            top = (h - 2 * short) // 2
            img = img.crop((0, top, w, top + 2 * short))
    factor = short // min_edge
    return img.reduce(factor) if factor >= 2 else img


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


def encode_png(image: Image.Image, compress_level: int = 6) -> bytes:
    """Lossless PNG bytes of ``image`` (deterministic for identical pixels); ``compress_level``
    0-9 trades size for speed (1 is several times faster than the default 6)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
