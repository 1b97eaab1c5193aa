"""Image decoding and encoding for the service: bytes in, RGB uint8 arrays out, and back.

Decoding checks the size from the header before decompressing anything: PIL's
``Image.open`` reads only the header, so an oversized or "decompression bomb" image
is refused without allocating its pixels. EXIF orientation is applied, so a portrait
photo taken sideways comes out upright, as every viewer shows it.
"""

from __future__ import annotations

import io
import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cvserve.errors import ImageTooLargeError, InvalidImageError
from cvserve.models.types import Prediction, ScaledImage

__all__ = [
    "ENCODINGS",
    "array_from_raw",
    "check_pixels",
    "decode_image",
    "decode_png_array",
    "decode_scaled",
    "draw_overlay",
    "encode_png",
    "input_size_hint",
    "palette",
    "set_decoder_pixel_limit",
]

# PIL format names accepted; MPO is the multi-picture JPEG some cameras write.
ENCODINGS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
_ACCEPTED = {*ENCODINGS, "MPO"}
_ORIENTATION = 0x0112  # the EXIF tag exif_transpose applies
_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
Needed = Callable[[int, int], "tuple[int, int] | None"]


def set_decoder_pixel_limit(max_pixels: int) -> None:
    """Make PIL itself refuse images over ``max_pixels`` (its decompression-bomb guard).

    PIL warns above ``MAX_IMAGE_PIXELS`` and raises above twice that; the service checks
    the exact limit itself, this is the second line of defence for any other decode path.
    """
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    """Raise ``ImageTooLargeError`` when ``height * width`` exceeds ``max_pixels``."""
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {height * width} pixels, more than the limit of {max_pixels}"
        )


def _to_rgb(img: Image.Image, fmt: str | None) -> Image.Image | np.ndarray:
    """Convert any 8- or 16-bit mode to RGB; refuse 32-bit integer and float pixels.

    PIL's own ``convert("RGB")`` clips 16-bit values at 255 (a 16-bit photo would come
    out almost white), so 16-bit grayscale is scaled to 8 bits here. 32-bit integer and
    floating-point images (scientific TIFFs) have no agreed display range to map from.
    """
    if img.mode.startswith("I;16") or (img.mode == "I" and fmt == "PNG"):
        gray = (np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8)  # PNG "I" is 16-bit grayscale
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "32-bit floating-point"
        raise InvalidImageError(
            f"unsupported pixel type: {kind} ({fmt} mode {img.mode}); send 8- or 16-bit images"
        )
    return img if img.mode == "RGB" else img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned by its EXIF orientation; itself (no copy of the pixels) when upright."""
    if img.getexif().get(_ORIENTATION, 1) in (1, None):
        return img
    return ImageOps.exif_transpose(img)


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode an encoded image into an upright ``(H, W, 3)`` RGB uint8 array.

    Args:
        data: JPEG, PNG, WebP, BMP or TIFF bytes.
        max_pixels: largest ``height * width`` accepted.

    Raises:
        InvalidImageError: empty, undecodable, truncated or of an unsupported format.
        ImageTooLargeError: over ``max_pixels``, checked before decoding.
    """
    return _decode(data, max_pixels, None)[0]


def input_size_hint(model: object | None) -> Needed | None:
    """``model.input_size`` for :func:`decode_scaled`, holding ``model`` only weakly.

    A request decoding its image must not keep alive a model that a reload replaces
    meanwhile (its memory is freed when its last request ends). None without a model.
    """
    method = getattr(model, "input_size", None)
    if method is None:
        return None
    ref = weakref.WeakMethod(method)

    def needed(height: int, width: int) -> tuple[int, int] | None:
        bound = ref()
        return bound(height, width) if bound is not None else None

    return needed


def decode_scaled(data: bytes, *, max_pixels: int, needed: Needed | None) -> np.ndarray | ScaledImage:
    """:func:`decode_image`, with a large JPEG decoded at 1/2, 1/4 or 1/8 of its size.

    ``needed(height, width)`` is the smallest ``(h, w)`` the consumer wants of an upright
    ``height x width`` image (a model's input size), or None for the full image; ``needed``
    None decodes every image in full, as :func:`decode_image` does. A JPEG
    is decoded with libjpeg's DCT scaling at the smallest of those scales that is still at
    least that large (PIL's ``draft``), much faster than decoding every pixel and
    resizing them away. Returns a :class:`~cvserve.models.types.ScaledImage` carrying
    the image's own size when it was reduced, else the array as :func:`decode_image` does.

    Raises:
        Same as :func:`decode_image`; the pixel limit applies to the image's own size.
    """
    array, size = _decode(data, max_pixels, needed)
    return array if array.shape[:2] == size else ScaledImage(array, size)


def _decode(data: bytes, max_pixels: int, needed: Needed | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The upright RGB array, maybe reduced, and the image's own upright ``(height, width)``."""
    if not data:
        raise InvalidImageError("image is empty: no encoded bytes and no raw array")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in _ACCEPTED:
                raise InvalidImageError(
                    f"unsupported image format {img.format}; accepted: {', '.join(ENCODINGS)}"
                )
            check_pixels(img.height, img.width, max_pixels)
            turned = img.format in ("JPEG", "MPO") and img.getexif().get(_ORIENTATION, 1) in _TURNED
            size = (img.width, img.height) if turned else (img.height, img.width)
            want = needed(*size) if needed is not None and img.format in ("JPEG", "MPO") else None
            if want is not None:
                want_h, want_w = (want[1], want[0]) if turned else want
                img.draft(img.mode, (max(1, want_w), max(1, want_h)))
            # Decoding happens here (lazily, on first pixel access): inside the try.
            array = np.asarray(_to_rgb(_upright(img), img.format), dtype=np.uint8)
    except (InvalidImageError, ImageTooLargeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"image has more than the limit of {max_pixels} pixels ({e})") from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"cannot decode image ({len(data)} bytes): not a {', '.join(ENCODINGS)} image"
        ) from None
    except Exception as e:  # PIL raises many types for corrupt data: UnidentifiedImageError, OSError ...
        raise InvalidImageError(f"cannot decode image ({len(data)} bytes): {e}") from None
    return array, size


def array_from_raw(data: bytes, height: int, width: int, channels: int, *, max_pixels: int) -> np.ndarray:
    """View raw interleaved RGB uint8 bytes as an ``(H, W, 3)`` array (read-only, no copy).

    Raises:
        InvalidImageError: a zero dimension, channels other than 3, or a byte count not
            equal to ``height * width * channels``.
        ImageTooLargeError: over ``max_pixels``.
    """
    channels = channels or 3
    if height <= 0 or width <= 0:
        raise InvalidImageError(f"raw image must have height and width > 0, got {height}x{width}")
    if channels != 3:
        raise InvalidImageError(f"raw image must have 3 channels (RGB), got {channels}")
    check_pixels(height, width, max_pixels)
    expected = height * width * channels
    if len(data) != expected:
        raise InvalidImageError(
            f"raw image data is {len(data)} bytes, expected {expected} for {height}x{width}x{channels} uint8"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)


def encode_png(array: np.ndarray) -> bytes:
    """Encode a 2-D uint8/bool array (grayscale or 1-bit) or an RGB array as PNG bytes."""
    if array.dtype == bool:
        img = Image.fromarray(array).convert("1")
    else:
        img = Image.fromarray(np.ascontiguousarray(array))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_label_map(labels: np.ndarray) -> bytes:
    """PNG of a label map (pixel value = label index): 8-bit when every label fits, else 16-bit."""
    dtype = np.uint8 if labels.size == 0 or int(labels.max()) < 256 else np.uint16
    return encode_png(labels.astype(dtype))


def decode_png_array(data: bytes) -> np.ndarray:
    """Decode PNG bytes written by :func:`encode_png` back into an array (``L`` or ``1`` modes)."""
    img = Image.open(io.BytesIO(data))
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    return np.asarray(img)


def palette(n: int) -> np.ndarray:
    """``n`` distinct, deterministic RGB colours (golden-ratio hue steps)."""
    import colorsys

    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.75, 1.0) for h in hues]
    return (np.asarray(rgb, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


def draw_overlay(image: np.ndarray, prediction: Prediction, names: Sequence[str] | None = None) -> np.ndarray:
    """Draw a prediction onto a copy of ``image`` (RGB uint8) for people to look at.

    Instance predictions get translucent masks, boxes and ``name score`` labels (``names``
    holds one label per instance); a label map is colourised and blended, except for a
    class named ``background``, with a legend of the classes present.
    """
    from PIL import ImageDraw
    from pycocotools import mask as mask_util

    out = image.astype(np.float32)
    if prediction.semantic is not None:
        labels = np.asarray(prediction.semantic.labels)
        class_names = prediction.semantic.class_names
        colours = palette(max(int(labels.max()) + 1, len(class_names)))
        blend = np.ones(labels.shape, bool)
        if class_names and class_names[0] == "background":
            blend &= labels != 0
        out[blend] = 0.45 * out[blend] + 0.55 * colours[labels[blend]]
        canvas = Image.fromarray(out.astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for row, value in enumerate(int(v) for v in np.unique(labels)):
            label = class_names[value] if value < len(class_names) else str(value)
            draw.rectangle((4, 4 + 14 * row, 14, 14 + 14 * row), fill=tuple(int(c) for c in colours[value]))
            draw.text((18, 3 + 14 * row), label, fill=(255, 255, 255))
        return np.asarray(canvas)
    colours = palette(max((i.category_id for i in prediction.instances), default=0) + 1)
    for inst in prediction.instances:
        if inst.mask is not None:
            binary = mask_util.decode({"size": list(inst.mask.size), "counts": inst.mask.counts}).astype(bool)
            out[binary] = 0.5 * out[binary] + 0.5 * colours[inst.category_id]
    canvas = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for k, inst in enumerate(prediction.instances):
        colour = tuple(int(c) for c in colours[inst.category_id])
        draw.rectangle(inst.box, outline=colour, width=2)
        name = names[k] if names and k < len(names) and names[k] else str(inst.category_id)
        text = f"{name} {inst.score:.2f}"
        x, y = inst.box[0], max(0.0, inst.box[1] - 12)
        draw.rectangle(draw.textbbox((x, y), text), fill=colour)
        draw.text((x, y), text, fill=(0, 0, 0))
    return np.asarray(canvas)
