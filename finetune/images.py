"""Decode any image file a user may have into a plain RGB picture, or say clearly why not."""

from __future__ import annotations

import contextlib
import re
import struct
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, features

from .config import LONG_IMAGE_RATIO, SQUASH_SHARE

# JPEG 2000: satellite tiles (Sentinel-2) and scanned slides come in it, often 16-bit; Pillow's
# wheels read it (OpenJPEG).
JPEG2000_EXTENSIONS = frozenset({".jp2", ".j2k", ".j2c", ".jpf", ".jpx"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
                              *JPEG2000_EXTENSIONS})
PLUGIN_EXTENSIONS = {".heic": "pillow-heif", ".heif": "pillow-heif", ".avif": "pillow-avif-plugin"}
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as viewers show them
MAX_ASPECT = 100  # longer side / shorter side beyond which an image is skipped (banners, strips)

# The exceptions Pillow's own fuzzing harness accepts from a decoder, plus the bomb error.
DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, MemoryError, NotImplementedError, OverflowError,
    EOFError, IndexError, KeyError, TypeError, struct.error, Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class ImageDecodeError(Exception):
    """A file that is not a usable image; str() is the reason shown to the user."""


def is_candidate_image(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in PLUGIN_EXTENSIONS


@dataclass(frozen=True)
class ImageFacts:
    """What an image file is, as stored (for `finetune check`)."""

    width: int
    height: int
    mode: str  # Pillow's mode of the file: RGB, L, P, RGBA, I;16, CMYK, ...
    grayscale: bool  # no colour, whatever the mode (X-rays saved as RGB JPEGs too)


GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def load_rgb(path: Path, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Fully decode `path` into an upright RGB image.

    `min_side`: the shorter side the caller will resize to; JPEGs are then decoded at a
    reduced scale (libjpeg's draft mode) that still covers it, which makes big phone photos
    several times cheaper to read.
    """
    return to_rgb(decode(path, max_pixels, min_side)[0])


def inspect_image(path: Path, max_pixels: int, min_side: int | None = None) -> ImageFacts:
    """Decode `path` as training does (ImageDecodeError if that fails) and say what it is."""
    image, (w, h), mode = decode(path, max_pixels, min_side)
    if mode in GRAY_MODES:
        return ImageFacts(w, h, mode, True)
    small = np.asarray(to_rgb(image).resize((32, 32), Image.BILINEAR), dtype=np.int16)
    # JPEG's colour subsampling leaves a little noise in the channels of a grey picture.
    spread = max(int(np.abs(small[..., 0] - small[..., 1]).max()), int(np.abs(small[..., 1] - small[..., 2]).max()))
    return ImageFacts(w, h, mode, spread <= 8)


DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_REASON = "DICOM, not read: export the images as PNG, whose 16-bit greyscale is kept"


# How image files begin, whatever their name says: (offset, bytes, the suffix that kind takes).
IMAGE_MARKS = ((0, b"\xff\xd8\xff", ".jpg"), (0, b"\x89PNG\r\n\x1a\n", ".png"), (0, b"GIF8", ".gif"),
               (0, b"II*\x00", ".tif"), (0, b"MM\x00*", ".tif"), (8, b"WEBP", ".webp"), (4, b"ftypheic", ".heic"),
               (4, b"ftypheix", ".heic"), (4, b"ftypmif1", ".heic"), (4, b"ftypavif", ".avif"))


def long_side_ratio(path: Path) -> float | None:
    """How many times as long as wide an image is, from its header (no decoding); None where it
    cannot be read (its decoding says why, later)."""
    try:
        with warnings.catch_warnings():  # (a corrupt EXIF block, a size over Pillow's bomb limit: said when it is decoded)
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
    except Exception:  # (any failure to read a header: the image is judged when it is decoded)
        return None
    return aspect_ratio(w, h)


def aspect_ratio(w: int, h: int) -> float:
    """How many times as long as wide: the longer side over the shorter, whichever way it stands."""
    return max(w, h) / max(1, min(w, h))


def squashes(ratios: list[float]) -> bool:
    """--fit auto's rule, on images' aspect ratios: at least SQUASH_SHARE of them LONG_IMAGE_RATIO or more."""
    return bool(ratios) and sum(r >= LONG_IMAGE_RATIO for r in ratios) >= SQUASH_SHARE * len(ratios)


def file_head(path: Path) -> bytes:
    """A file's first bytes, as far as what is told from them reaches (DICOM's mark ends at 132);
    b"" where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError:
        return b""


def suffix_by_content(path: Path, head: bytes | None = None) -> str | None:
    """The suffix of the image kind a file's first bytes show (None: none we know, or unreadable):
    a photo saved without its extension, an iPhone's HEIC renamed to .jpg."""
    head = file_head(path) if head is None else head
    return next((suffix for at, mark, suffix in IMAGE_MARKS if head[at:at + len(mark)] == mark), None)


def is_dicom(path: Path, head: bytes | None = None) -> bool:
    """By its suffix, or its "DICM" mark at byte 128: exported series often have names without
    one, such as 1.2.840.113619.2.55.3.1."""
    return path.suffix.lower() in DICOM_SUFFIXES or (file_head(path) if head is None else head)[128:132] == b"DICM"


def too_many_pixels(size: str, max_pixels: int) -> str:
    return f"{size} is over the {max_pixels:,}-pixel limit (possible decompression bomb); --max-pixels N reads it"


def bomb_size(error: Exception) -> str:
    """'144,000,000 pixels' from Pillow's message ('Image size (144000000 pixels) exceeds ...')."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found.group(1)):,} pixels" if found else "its size"


_PILLOW_LIMIT = threading.Lock()
_PILLOW_DEFAULT_LIMIT = Image.MAX_IMAGE_PIXELS  # (read at import: the global itself is raised by other threads)


@contextlib.contextmanager
def pillow_allows(max_pixels: int) -> Iterator[None]:
    """Pillow's own decompression-bomb limit (a module global, 89,478,485 pixels by default, checked
    when a file is opened and, for TIFF, again when it is loaded) raised to `max_pixels` while
    the block runs, where that is larger: without it a larger --max-pixels read nothing more.
    Under a lock (threads may decode at once), taken only then: the default limit needs none.
    (Compared with Pillow's limit as it was at import: the global may be another thread's, raised
    for its block, and restored while this one's runs.)"""
    if _PILLOW_DEFAULT_LIMIT is None or max_pixels <= _PILLOW_DEFAULT_LIMIT:
        yield  # (its limit is no stricter than ours; the check after opening applies ours)
        return
    with _PILLOW_LIMIT:
        default = Image.MAX_IMAGE_PIXELS  # (a library user's own setting, None included, comes back after)
        if default is not None:
            Image.MAX_IMAGE_PIXELS = max(default, max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = default


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # (gone since it was opened: the reason given is then the format's)
        return None


def decode(path: Path, max_pixels: int, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int], str]:
    """(the decoded, upright image in its own mode, the stored size, the stored mode)."""
    suffix = path.suffix.lower()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's other warnings are about metadata (a corrupt EXIF block, common in scraped
            # photo sets) of pixels it decodes: noise on stderr that names no file.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with pillow_allows(max_pixels), Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(too_many_pixels(f"{w}x{h} pixels", max_pixels))
                if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
                    # Resizing the short side to the crop size would make the long side enormous.
                    raise ImageDecodeError(f"{w}x{h}: aspect ratio over {MAX_ASPECT}:1, not a photo to classify")
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)  # animated images: the first frame
                if min_side and im.format == "JPEG":
                    scale = min(w, h) / min_side
                    if scale >= 2:
                        im.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
                mode = im.mode
                im.load()
                return ImageOps.exif_transpose(im), (w, h), mode
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # (Pillow's check, at our limit)
        raise ImageDecodeError(too_many_pixels(bomb_size(e), max_pixels)) from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except Image.UnidentifiedImageError:
        if suffix in PLUGIN_EXTENSIONS and not pillow_reads(suffix):  # (Pillow reads AVIF itself from 11.2)
            raise ImageDecodeError(f"{suffix} needs a Pillow plugin: pip install {PLUGIN_EXTENSIONS[suffix]}") from None
        head = file_head(path)  # (read once for its image kind and its DICOM mark)
        actual = suffix_by_content(path, head)
        if actual in PLUGIN_EXTENSIONS and not pillow_reads(actual):  # (an iPhone's HEIC renamed to .jpg)
            raise ImageDecodeError(f"a {actual[1:].upper()} image named {suffix or 'without a suffix'}: it needs a Pillow "
                                   f"plugin: pip install {PLUGIN_EXTENSIONS[actual]}") from None
        if _size_or_none(path) == 0:
            raise ImageDecodeError("empty file (0 bytes)") from None
        if is_dicom(path, head):
            raise ImageDecodeError(DICOM_REASON) from None
        raise ImageDecodeError("not an image, or a damaged one (format not recognised)") from None
    except DECODE_ERRORS as e:
        reason = str(e) or type(e).__name__
        if suffix in JPEG2000_EXTENSIONS and not features.check("jpg_2000"):  # (the header reads without OpenJPEG)
            reason += ": this Pillow was built without OpenJPEG; pip install --force-reinstall pillow"
        raise ImageDecodeError(f"cannot decode: {reason}") from None


def pillow_reads(suffix: str) -> bool:
    """Whether Pillow, with the plugins installed, has a reader for files of this suffix."""
    Image.init()  # (registers the plugins that are there)
    return suffix in Image.registered_extensions()


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or losing transparency badly."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scale_to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


# What 16-bit greyscale files hold: medical exports (X-rays, CT, MRI from DICOM) often 12 bits
# (0..4,095) or 10, scientific cameras 14. Scaling those by 65,535, as torchvision and OpenCV do,
# left a 12-bit X-ray 16 grey levels of 256 (BENCHMARKS.md, "Greyscale deeper than 8 bits").
BIT_DEPTHS_TOPS = (255.0, 1023.0, 4095.0, 16383.0, 65535.0)
FEWEST_GREY_LEVELS = 16  # a picture the shared scale would leave fewer than this many is stretched to its own range


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth greyscale to 0..255 (a plain convert clips). 16-bit: the range of the
    smallest usual bit depth (8, 10, 12, 14 or 16 bits) that holds the picture's values, so that
    the images of one device, sharing a depth, share a scale (all but a picture so dark that its
    values fit a smaller depth: it is brightened), unless that would leave it fewer than
    FEWEST_GREY_LEVELS grey levels: then its own range. Signed values (CT's Hounsfield
    units, stored as 32-bit ints or floats: lungs and fat are below 0) start the scale at the
    picture's lowest, where clipping them would turn all of them black."""
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":  # (a float TIFF's NaN or inf pixels would make every pixel NaN; integers have none)
        finite = a[np.isfinite(a)]
        peak, low = (float(finite.max()), float(finite.min())) if finite.size else (0.0, 0.0)
        a = np.nan_to_num(a, nan=low, posinf=peak, neginf=low)
    else:
        peak, low = (float(a.max()), float(a.min())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        top = next(t for t in BIT_DEPTHS_TOPS if peak <= t)
    elif im.mode == "F":
        top = max(peak, 1.0)
    else:  # 32-bit ints: the picture's own range
        top = max(peak, 255.0)
    own_low, low = low, min(low, 0.0)
    if 0 < peak - own_low < FEWEST_GREY_LEVELS / 255.0 * (top - low):
        # (a picture whose values span a sliver of its depth, 30,000 +- 100 of 65,535: the shared scale
        # left it one grey level, and training went on at chance; it gets its own range instead)
        low, top = own_low, peak
    a = np.clip((a - low) / (top - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(a, mode="L").convert("RGB")
