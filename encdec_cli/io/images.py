"""Image inputs of ``encdec image-to-text``: decoding with Pillow, checked.

An image that cannot be used raises ValueError with a message for its error record: a file Pillow
cannot identify (a text file named ``.png``, an empty file), a damaged one (a truncated JPEG), one
with no pixels, or one larger than ``MAX_IMAGE_PIXELS`` (a decompression bomb: a small file that
would decode into gigabytes). Items are planned by ``encdec_cli.io.inputs`` (``IMAGE_EXTENSIONS``).
"""

from __future__ import annotations

import io
import os
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"})
# Pillow's own default limit (about 89.5 megapixels: 1/4 GiB of 24-bit pixels); an image above it
# is refused here (Pillow only warns up to twice the limit)
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview) -> Image.Image:
    """The RGB image at a path or in file bytes, turned upright by its EXIF orientation."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ValueError("empty image (0 bytes)")
        fp, name = io.BytesIO(data), "image bytes"
    else:
        if os.path.isfile(source) and os.path.getsize(source) == 0:
            raise ValueError("empty image file (0 bytes)")
        fp, name = source, os.fsdecode(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"Image size ({w * h} pixels)")
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1]):,}" if found else "too many"
        raise ValueError(
            f"image of {size} pixels is larger than the limit of {MAX_IMAGE_PIXELS:,} pixels "
            "(a decompression bomb guard): scale it down first"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(f"not an image Pillow can read ({name})") from None
    except FileNotFoundError:
        raise ValueError(f"no such file: {name}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ValueError(f"damaged image ({e})") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ValueError(f"image has no pixels ({rgb.width} x {rgb.height})")
    return rgb
