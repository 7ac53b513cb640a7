"""Image encoding and decoding at the edges: base64 / data URLs in, PNG with infotext out."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdserve import bounds


class ImageDecodeError(ValueError):
    """The client sent something that is not a usable image."""


def base64_bytes(data: str) -> bytes:
    """The bytes of raw base64 or a `data:image/...;base64,` URL (image URLs are refused, never fetched)."""
    text = data.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ImageDecodeError("data URL must be base64-encoded")
    if text.startswith(("http://", "https://")):
        raise ImageDecodeError("image URLs are not fetched; send the image as base64 or a data URL")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"image is not valid base64: {exc}") from None


def decode_image(data: str | bytes, max_pixels: int = bounds.MAX_PIXELS) -> Image.Image:
    """Decode raw base64, a `data:image/...;base64,` URL or raw bytes into a loaded PIL image."""
    raw = base64_bytes(data) if isinstance(data, str) else data
    if not raw:
        raise ImageDecodeError("image is empty")
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height}; at most {max_pixels} pixels are accepted"
                )
            probe.load()
            return probe.copy()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot read image: not a PNG, JPEG, WebP or other image format Pillow reads") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot read image: {exc}") from None


def encode_png(image: Image.Image, infotext: str | None = None, postprocessing: str | None = None) -> bytes:
    """PNG bytes with the A1111 `parameters` tEXt chunk, so any A1111-aware tool reads the settings back, and
    A1111's `postprocessing` chunk for an extras upscale."""
    meta = None
    if infotext or postprocessing:
        meta = PngImagePlugin.PngInfo()
        for key, text in (("parameters", infotext), ("postprocessing", postprocessing)):
            if text:
                meta.add_text(key, text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def black_png(width: int, height: int) -> bytes:
    """What stands in for an image moderation withheld, where a dialect answers with pictures (A1111 does this)."""
    return encode_png(Image.new("RGB", (width, height)))


def media_type(data: bytes) -> str:
    """The MIME type of stored image bytes, by their magic number (inputs keep the client's format)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/png"


def read_infotext(image: Image.Image) -> str | None:
    """The `parameters` text of a PNG (or the EXIF UserComment A1111 writes for JPEG/WebP)."""
    text = image.info.get("parameters")
    if text:
        return str(text)
    exif = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
    if isinstance(exif, bytes):
        # UserComment starts with an 8-byte character-code prefix.
        code, body = exif[:8], exif[8:]
        return body.decode("utf-16-be" if code.startswith(b"UNICODE") else "utf-8", "replace").strip("\x00")
    return exif or None

