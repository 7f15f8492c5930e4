"""Image I/O helpers: format sniffing, bomb-safe opening and small (draft-mode) decodes.

Everything here works on bytes in memory and touches no Pillow global: no
``Image.MAX_IMAGE_PIXELS`` and no ``ImageFile.LOAD_TRUNCATED_IMAGES`` is ever changed,
so the helpers are safe to call from many threads at once.

- :func:`sniff` names a format from its magic bytes (and tells HTML/text apart from
  binary junk), without Pillow.
- :func:`open_checked` opens an image lazily (header only) and refuses, before any
  pixel buffer exists, one whose declared ``width * height`` exceeds a limit.
- :func:`draft_small` / :func:`decode_small` decode a JPEG at 1/2, 1/4 or 1/8 scale in
  the DCT domain (``Image.draft``), which is several times cheaper than a full decode;
  other formats are decoded fully and reduced by an integer box filter.
- :func:`load_truncated_jpeg` decodes a JPEG whose end is missing by appending an EOI
  marker (libjpeg then fills what is missing with mid-grey) and
  :func:`decoded_rows` / :func:`image_decoded_rows` measure how many leading rows
  really decoded (the grey fill is found whether or not the file ends with EOI: a file
  cut short and given an EOI by a broken uploader decodes "successfully" with it).
- :func:`jpeg_scans` counts a JPEG's scans (a progressive JPEG cut short has fewer).
- :func:`decode_rgb` decodes a stored image whole (crop stage, serving);
  :func:`decode_square` an exported training image (OpenCV where installed).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

#: formats :func:`sniff` can name that are raster images
IMAGE_FORMATS = frozenset(
    {"jpeg", "png", "gif", "webp", "bmp", "tiff", "heic", "avif", "jp2", "ico", "psd", "svg"}
)
#: what :func:`sniff` returns for bytes that are not an image at all
NOT_IMAGE_FORMATS = frozenset({"html", "text", "pdf"})

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
JPEG_SOS = b"\xff\xda"

#: the value libjpeg gives pixels it never received data for (all-zero DCT blocks)
JPEG_FILL_VALUE = 128

_HEIC_BRANDS = {
    b"heic",
    b"heix",
    b"hevc",
    b"hevx",
    b"heim",
    b"heis",
    b"hevm",
    b"hevs",
    b"mif1",
    b"msf1",
}
_AVIF_BRANDS = {b"avif", b"avis"}


class ImageTooLarge(ValueError):
    """The header declares more pixels than allowed; nothing was decoded."""

    def __init__(self, width: int | None, height: int | None, max_pixels: int, detail: str = ""):
        self.width, self.height, self.max_pixels = width, height, max_pixels
        size = f"{width}x{height}" if width is not None else "its size"
        super().__init__(
            f"image declares {size} pixels, more than max_pixels={max_pixels:,}{detail}"
        )


# ---------------------------------------------------------------------------------------
# sniffing
# ---------------------------------------------------------------------------------------
def _sniff_text(head: bytes) -> str | None:
    for bom in (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"):
        if head.startswith(bom):
            head = head[len(bom) :]
            break
    if not head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut by the 1 KiB window is fine; anything earlier is not text
        if exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    stripped = text.lstrip().lower()
    if stripped.startswith("<"):
        if "<svg" in stripped:
            return "svg"
        return "html"
    return "text"


def sniff(data: bytes) -> str | None:
    """The format of ``data`` from its magic bytes.

    Images: ``jpeg png gif webp bmp tiff heic avif jp2 ico psd svg``. Not images:
    ``html`` (HTML or XML markup, e.g. an error page served as ``.jpg``), ``text``
    (other readable text, JSON…), ``pdf``. ``None`` for anything unknown (binary junk,
    or a format without a magic number such as TGA)."""
    if not data:
        return None
    head = bytes(data[:1024])
    if head.startswith(JPEG_SOI):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[4:8] == b"ftyp":
        major = head[8:12]
        box_len = int.from_bytes(head[0:4], "big")
        brands = {major} | {head[i : i + 4] for i in range(16, min(box_len, len(head)) - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIC_BRANDS:
            return "heic"
        return None  # an ISO media file that is not an image (mp4, mov…)
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jp2"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ico"
    if head[:4] == b"8BPS":
        return "psd"
    if head.startswith(b"%PDF"):
        return "pdf"
    return _sniff_text(head)


def has_jpeg_eoi(data: bytes) -> bool:
    """True when the JPEG's entropy-coded data is followed by its End Of Image marker.

    The common case is O(1): the data ends with ``FF D9`` (after optional zero
    padding). Otherwise an EOI counts only after the last Start Of Scan marker: the
    EXIF thumbnail that many cameras embed (before the first SOS) has its own EOI, and
    entropy-coded data never contains ``FF D9`` (0xFF bytes there are stuffed with
    0x00), so a trailer after the EOI is allowed. A file cut exactly after such a
    thumbnail passes this test; its decode then fails as truncated, which
    ``carflow.fixer`` handles the same way."""
    if data[-2:] == JPEG_EOI or data[-66:].rstrip(b"\x00").endswith(JPEG_EOI):
        return True
    sos = data.rfind(JPEG_SOS)
    if sos < 0:
        return False
    return data.rfind(JPEG_EOI) > sos


def jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS markers) of the main image of a JPEG.

    Segments are walked from SOI to the first SOS (so an EXIF thumbnail inside APP1,
    which has its own SOS, is skipped), then SOS markers are counted: entropy-coded data
    never contains ``FF DA`` (0xFF bytes there are stuffed). A baseline JPEG has 1 scan
    (3 for a non-interleaved one); libjpeg writes 10 for a progressive colour JPEG and 6
    for a grey one. 0 when no scan starts."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return 0
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return data.count(JPEG_SOS, pos)
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return 0


def is_progressive_jpeg(im: Image.Image) -> bool:
    return bool(im.info.get("progressive") or im.info.get("progression"))


# ---------------------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------------------
#: sniff() name → Pillow format name, to skip probing every other plugin
PIL_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
    "ico": "ICO",
    "psd": "PSD",
    "jp2": "JPEG2000",
    "avif": "AVIF",
}


def open_checked(data: bytes, max_pixels: int, fmt: str | None = None) -> Image.Image:
    """``Image.open`` on ``data`` (reads the header only) and refuse big images.

    Raises :class:`ImageTooLarge` when the declared ``width * height`` exceeds
    ``max_pixels``, before any pixel memory is allocated. Pillow's own bomb check (based
    on the ``Image.MAX_IMAGE_PIXELS`` global, raising above twice that) is reported the
    same way. Other failures propagate (``UnidentifiedImageError``, ``OSError``…).
    ``fmt`` (a :func:`sniff` name) limits Pillow to that format's plugin."""
    formats = [PIL_FORMATS[fmt]] if fmt in PIL_FORMATS else None
    try:
        im = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(None, None, max_pixels, f" ({exc})") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise ImageTooLarge(width, height, max_pixels)
    return im


def draft_request(size: tuple[int, int], target: int) -> tuple[int, int]:
    """The size to ask ``Image.draft`` for: short side ≥ ``target`` and long side
    ≥ ``2 * target`` (so the 64-pixel blur test of cleanvision and the 32×32 phash
    input are never upscaled with the default target 32)."""
    w, h = size
    return (2 * target, target) if w >= h else (target, 2 * target)


def draft_scale(size: tuple[int, int], target: int) -> int:
    """The reduction factor (1, 2, 4 or 8) :func:`draft_small` uses; the same rule as
    ``Image.draft`` for JPEG, so every format gets the same small size."""
    rw, rh = draft_request(size, target)
    scale = min(size[0] // max(rw, 1), size[1] // max(rh, 1))
    for factor in (8, 4, 2):
        if scale >= factor:
            return factor
    return 1


def reduce_to(im: Image.Image, target: int) -> Image.Image:
    """Box-reduce a decoded image by the factor :func:`draft_scale` picks."""
    factor = draft_scale(im.size, target)
    return im.reduce(factor) if factor > 1 else im


def draft_small(im: Image.Image, target: int) -> Image.Image:
    """Decode a just-opened image small: JPEG in draft mode (DCT scaling by 1/2, 1/4
    or 1/8, keeping the short side ≥ ``target`` and the long side ≥ ``2 * target``),
    anything else fully and then box-reduced by the same factor. Returns the decoded
    (loaded) image; its mode is what the file has (RGB for ordinary JPEGs)."""
    if im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L"):
        im.draft(im.mode, draft_request(im.size, target))
        im.load()
        return im
    im.load()
    return reduce_to(im, target)


def decode_small(data: bytes, target: int = 32, max_pixels: int = 40_000_000) -> Image.Image:
    """Open ``data`` (bomb-checked) and decode it small, as RGB.

    For a JPEG this decodes at 1/2, 1/4 or 1/8 scale (the smallest that keeps the
    short side ≥ ``target`` and the long side ≥ ``2 * target``). Ignores EXIF orientation: use ``carflow.fixer.fix_image`` for
    the full treatment."""
    im = open_checked(data, max_pixels)
    small = draft_small(im, target)
    return small if small.mode == "RGB" else small.convert("RGB")


# ---------------------------------------------------------------------------------------
# truncated JPEGs
# ---------------------------------------------------------------------------------------
def load_truncated_jpeg(data: bytes, max_pixels: int) -> Image.Image:
    """Decode a JPEG whose tail is missing, without touching ``LOAD_TRUNCATED_IMAGES``.

    An EOI marker is appended: libjpeg treats it as a premature end of data and fills
    every block it never received with mid-grey (value 128), which
    :func:`decoded_rows` then finds."""
    im = open_checked(bytes(data) + JPEG_EOI, max_pixels)
    im.load()
    return im


def decoded_rows(arr: np.ndarray, fill: int = JPEG_FILL_VALUE, max_partial: int = 16) -> int:
    """How many leading rows of a decoded truncated JPEG hold real data.

    The missing part is the tail of the image in MCU (block) order: whole trailing
    rows of ``fill`` plus, usually, one partial MCU row (up to 16 pixel rows) whose right
    part is ``fill``. Rows of that partial MCU row are not counted as decoded.
    ``arr`` is H×W or H×W×C."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    is_fill = (arr == fill).all(axis=2)
    height, width = is_fill.shape
    row_full = is_fill.all(axis=1)
    # trailing run of completely filled rows
    not_full = np.flatnonzero(~row_full)
    rows = int(not_full[-1]) + 1 if not_full.size else 0
    # the partial MCU row: its rows end in a run of fill at least one block (8 px) wide
    block = min(8, width)
    lowest = max(rows - max_partial, 0)
    while rows > lowest and is_fill[rows - 1, width - block :].all():
        rows -= 1
    return rows


def image_decoded_rows(
    im: Image.Image, fill: int = JPEG_FILL_VALUE, max_partial: int = 16, band_pixels: int = 1 << 20
) -> int:
    """:func:`decoded_rows` of a decoded image, without an array of the whole image.

    Any truncation leaves at least the bottom-right block as fill (it is the last one
    in every scan order), so the common case looks at 8 pixels only. Otherwise bands of
    about ``band_pixels`` are read from the bottom up until a row that is not all fill,
    and the partial MCU row above it is measured in one small band."""
    width, height = im.size
    if width == 0 or height == 0:
        return height
    corner = np.asarray(im.crop((max(width - 8, 0), height - 1, width, height)))
    if not (corner == fill).all():
        return height
    band = max(max_partial, band_pixels // width)
    last = 0  # rows above `last` hold at least one real pixel
    y1 = height
    while y1 > 0:
        y0 = max(0, y1 - band)
        arr = np.asarray(im.crop((0, y0, width, y1)))
        full = (arr == fill).reshape(y1 - y0, -1).all(axis=1)
        real = np.flatnonzero(~full)
        if real.size:
            last = y0 + int(real[-1]) + 1
            break
        y1 = y0
    top = max(0, last - max_partial)
    return top + decoded_rows(np.asarray(im.crop((0, top, width, last))), fill, max_partial) if last else 0


# ---------------------------------------------------------------------------------------
# the full decode of a stored image (the crop stage and serving)
# ---------------------------------------------------------------------------------------
#: decompression-bomb guard of :func:`decode_rgb` (the fixer's default ``max_pixels``)
DECODE_MAX_PIXELS = 40_000_000


def decode_rgb(data: bytes, max_pixels: int = DECODE_MAX_PIXELS) -> np.ndarray:
    """Bytes → upright RGB ``uint8`` array (EXIF orientation applied; bombs refused with
    :class:`ImageTooLarge`). What the crop stage decodes each stored image with, and what
    serving decodes the fixer's stored bytes with (:meth:`carflow.fixer.FixResult.stored_bytes`),
    so both hand the detector the same pixels."""
    from PIL import ImageOps

    with open_checked(data, max_pixels) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------
# the decode of an exported training image (training's and evaluation's TF-free reader)
# ---------------------------------------------------------------------------------------
_OPENCV: list = []


def opencv() -> Any:
    """OpenCV (a dependency; absent on a machine that installed only part of ours), else
    None; imported once."""
    if not _OPENCV:
        try:
            import cv2
        except ImportError:
            cv2 = None
        _OPENCV.append(cv2)
    return _OPENCV[0]


def decode_square(data: bytes, size: int) -> np.ndarray:
    """An exported image (an RGB JPEG, ``size``×``size`` by default) → uint8
    ``[size, size, 3]`` RGB, resized bilinearly when it is another size; no EXIF
    rotation (the export's pixels as stored). What the TensorFlow-free training input and
    evaluation read the export with.

    An image already ``size``×``size`` is decoded by OpenCV where it is installed: the same
    libjpeg-turbo decode as Pillow's, the same pixels (tested), in one call that releases
    the GIL (240-px JPEGs on this 2-core box: 1.2–1.6× Pillow's rate, noise to smooth).
    Pillow does the rest (draft mode for a JPEG more than twice the size)."""
    cv2 = opencv()
    if cv2 is not None:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr is not None and arr.shape[:2] == (size, size):
            return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and (im.width > 2 * size and im.height > 2 * size):
            im.draft("RGB", (size, size))
        rgb = im.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb)


__all__ = [
    "IMAGE_FORMATS",
    "NOT_IMAGE_FORMATS",
    "PIL_FORMATS",
    "ImageTooLarge",
    "UnidentifiedImageError",
    "DECODE_MAX_PIXELS",
    "decode_rgb",
    "decode_square",
    "decode_small",
    "decoded_rows",
    "draft_request",
    "draft_scale",
    "draft_small",
    "has_jpeg_eoi",
    "image_decoded_rows",
    "is_progressive_jpeg",
    "jpeg_scans",
    "load_truncated_jpeg",
    "open_checked",
    "reduce_to",
    "sniff",
]
