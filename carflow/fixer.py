"""The fixer's per-image decision: bytes + :class:`FixSettings` → :class:`FixResult`.

Pure (no storage, no manifest): the clean stage (``tasks/fix.py``: shards, quality scores,
hashes, stats) and serving (``serve/chain.py``: one upload, its ``reason`` mapped to an
HTTP status) call the same :func:`fix_image`, so a photo the pipeline drops is refused by
the API with the same reason, and a photo the pipeline fixes is served from the same
fixed bytes (:meth:`FixResult.stored_bytes`).

Drop reasons, in the order they are tested:

| reason | when |
|---|---|
| ``empty`` | 0 bytes |
| ``not_image`` | the magic bytes say HTML/XML, text or PDF, or nothing Pillow knows |
| ``unsupported_format`` | a recognised image format outside ``allowed_formats`` (TIFF, HEIC, AVIF, SVG, ICO… by default), or one Pillow identifies that has no magic number we know |
| ``too_large`` | declared ``width × height > max_pixels``; refused from the header, nothing allocated |
| ``too_small`` | shortest side < ``min_side`` (tested on the header and again on the output) |
| ``truncated`` | a JPEG whose decoded share of rows is < ``min_decoded_fraction`` (with or without its EOI marker), another format whose data ends early (Pillow's "truncated"/"Truncated File Read"/"incomplete", any case), or a file under ``min_bytes`` whose header does not parse |
| ``decode_error`` | anything else that went wrong; the message is in ``error`` |

(``missing``, an original that storage does not have, is set by the clean shard, not here.)

A kept image whose original bytes are already a clean RGB JPEG (EOI present, no grey
fill at the bottom, no EXIF orientation other than 1, not CMYK/grey, not MPO, baseline
or progressive) is kept as is: ``out_bytes`` is ``None`` and
only a draft-mode (1/2–1/8 scale) decode is made. Anything else is fully decoded,
fixed and re-encoded as a baseline RGB JPEG at ``jpeg_quality`` (``out_bytes``); the
caller stores those bytes as a new content-addressed object. Fixes, listed in
``actions``:

- ``reencode_truncated``: a JPEG without EOI is decoded up to where its data ends (an
  EOI is appended; nothing global is switched). libjpeg fills the missing blocks with
  grey 128; we find that fill (whole trailing rows plus the partial MCU row) and **crop
  the image to the rows that really decoded**, so no grey band reaches the dataset.
  ``decoded_fraction`` is that share of rows. The fill is looked for in *every* JPEG
  (8 pixels in the common case), because a file cut short and then given an EOI
  decodes without an error. A progressive JPEG cut after its first scan has every row
  at a lower quality: ``decoded_fraction`` is then None (unknown) and ``jpeg_scans``
  says how many scans it kept.
- ``mpo_to_jpeg``: an MPO (a JPEG with a second image appended, as phones write them)
  becomes its first image as a plain JPEG.
- ``exif_transpose``: EXIF orientation 2–8 applied (the output has no EXIF).
- ``first_frame``: animated GIF/WebP/PNG: frame 0.
- ``alpha_on_white``: RGBA/LA/PA and palette or colour-key transparency composited on
  white.
- ``<mode>_to_rgb`` (``cmyk_to_rgb``, ``p_to_rgb``, ``l_to_rgb``, ``i16_to_rgb``…):
  colour conversion; 16-bit grey is scaled to 8 bits, not clipped.
- ``<format>_to_jpeg`` (``png_to_jpeg``…): the source was not a JPEG.
- ``progressive_to_baseline``: only with ``keep_progressive=False``. By default a
  progressive JPEG is kept as it is: every decoder (Pillow, TensorFlow, browsers) reads
  it, and re-encoding would only cost quality.

Re-encoded output carries no EXIF; an RGB source's ICC profile is kept.

One decode, small: the quality checks and the hashes use ``FixResult.small``, the
output image at 1/2–1/8 scale (short side ≥ ``check_size``, long side ≥ twice that;
JPEG draft mode on the kept-as-is path, where it is the *only* decode, a box reduce of
the fixed image otherwise; photos still large at 1/8 are box-reduced further), plus the
32×32 and 8×9 grey hash inputs made from it as ``imagehash`` makes them (grey, then
Lanczos).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from carflow.imagehash import gray_for_hash
from carflow.imageio import (
    NOT_IMAGE_FORMATS,
    ImageTooLarge,
    draft_small,
    has_jpeg_eoi,
    image_decoded_rows,
    is_progressive_jpeg,
    jpeg_scans,
    load_truncated_jpeg,
    open_checked,
    reduce_to,
    sniff,
)
from carflow.manifest import DROPPED, KEPT
from carflow.settings import FixSettings, as_settings

#: bump when a change here changes any output column (part of the clean shards' cache key)
VERSION = "2"

#: an original that storage does not have (set by the clean shard, never by the fixer); a
#: shard with such a row is not stored as done, so a later run tries the image again
MISSING = "missing"

REASONS = (
    MISSING,
    "empty",
    "not_image",
    "unsupported_format",
    "too_large",
    "too_small",
    "truncated",
    "decode_error",
)

_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA": "rgb", "LA": "l", "PA": "p", "RGBa": "rgb", "La": "l"}
_GREY_DEEP = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


@dataclass
class FixResult:
    """What :func:`fix_image` decided. ``out_bytes is None`` on a kept image means the
    original bytes are stored as they are; ``small`` and the two hash inputs come from
    the one small decode of the output image (``None`` when dropped before decoding)."""

    status: str
    reason: str | None = None
    error: str | None = None
    #: re-encoded RGB JPEG to store instead of the original, or None
    out_bytes: bytes | None = None
    #: size of the output image
    width: int | None = None
    height: int | None = None
    src_format: str | None = None
    src_mode: str | None = None
    src_width: int | None = None
    src_height: int | None = None
    actions: list[str] = field(default_factory=list)
    #: share of rows that really decoded (truncated JPEGs; 1.0 for other decoded images;
    #: None for a progressive JPEG cut after its first scan: every row, fewer details)
    decoded_fraction: float | None = None
    #: scans present in a truncated progressive JPEG (libjpeg writes 10 for colour, 6 for grey)
    jpeg_scans: int | None = None
    #: the small decode of the output image (RGB, short side ≥ check_size and long side ≥ 2 × check_size where the image allows)
    small: Image.Image | None = field(default=None, repr=False)
    #: 32×32 grey (uint8), the input of ``phash64``
    gray32: np.ndarray | None = field(default=None, repr=False)
    #: 8 rows × 9 columns grey (uint8), the input of ``dhash64``
    gray9x8: np.ndarray | None = field(default=None, repr=False)

    @property
    def small_rgb(self) -> np.ndarray | None:
        return None if self.small is None else np.asarray(self.small)

    def stored_bytes(self, data: bytes) -> bytes | None:
        """What the clean stage stores for a kept image whose original bytes are
        ``data``: the re-encoded JPEG, else ``data`` itself (None when dropped). Every
        model stage after clean reads these bytes, so serving feeds its models the same."""
        if self.status != KEPT:
            return None
        return self.out_bytes if self.out_bytes is not None else data


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(_ORIENTATION)
    except Exception:  # a corrupt EXIF block is ignored, not fatal
        return None
    return value if value in _TRANSPOSE else None


#: pixels of a deep-grey image converted at once (bounds the temporary arrays)
_BAND_PIXELS = 1 << 18


def _deep_grey_to_l(im: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """16/32-bit grey or float → 8-bit ``L``, band by band, and the colour-key mask.

    16-bit values are scaled (``round(v / 257)``, in integers: no float copy of the
    image), ``I`` is scaled only when it holds values above 255, ``F`` in [0, 1] is
    multiplied by 255. The temporary arrays are one band of about 0.25 Mpx, so converting
    a 40 Mpx 16-bit PNG costs the 8-bit output, not several float64 copies of the input.
    Returns the ``L`` image and, when the PNG has a ``tRNS`` grey key, a boolean mask of
    the transparent pixels (else None)."""
    mode = im.mode
    width, height = im.size
    lo, hi = im.getextrema()
    key = im.info.get("transparency")
    key = key if isinstance(key, (int, float)) and not isinstance(key, bool) else None
    scale16 = mode.startswith("I;16") or (mode == "I" and hi > 255)
    unit_float = mode == "F" and hi <= 1.0
    out = np.empty((height, width), np.uint8)
    mask = np.zeros((height, width), bool) if key is not None else None
    band = max(1, _BAND_PIXELS // max(width, 1))
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        arr = np.asarray(im.crop((0, y0, width, y1)))
        if mask is not None:
            mask[y0:y1] = arr == key
        if mode == "F":
            part = np.rint(arr * 255.0 if unit_float else arr)
        elif scale16:  # round(v / 257) in integers (v / 257 never ends in .5)
            part = arr.astype(np.uint32 if mode.startswith("I;16") else np.int64)
            part *= 2
            part += 257
            part //= 514
        else:
            part = arr
        np.clip(part, 0, 255, out=out[y0:y1], casting="unsafe")
    return Image.fromarray(out, "L"), mask


def _on_white(rgba: Image.Image) -> Image.Image:
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _to_rgb(im: Image.Image, actions: list[str]) -> Image.Image:
    """Any mode → RGB. Transparency (an alpha channel, a palette's transparent
    entries, a ``tRNS`` colour key of an RGB, grey or 16-bit grey PNG) is composited on
    white (``alpha_on_white``); the colour conversion is ``<mode>_to_rgb``."""
    mode = im.mode
    has_key = im.info.get("transparency") is not None
    if mode == "RGB" and not has_key:
        return im
    if mode in _GREY_DEEP:
        grey, mask = _deep_grey_to_l(im)
        actions.append(f"{mode.lower().replace(';', '')}_to_rgb")
        if mask is not None and mask.any():
            grey.paste(255, mask=Image.fromarray(mask.view(np.uint8) * 255, "L"))
            actions.append("alpha_on_white")
        return grey.convert("RGB")
    if has_key and mode in ("P", "L", "RGB", "1"):
        base = {"P": "p", "L": "l", "RGB": "rgb", "1": "1"}[mode]
        out = _on_white(im.convert("RGBA"))  # Pillow applies the key/palette transparency
        actions.append("alpha_on_white")
        if base != "rgb":
            actions.append(f"{base}_to_rgb")
        return out
    if mode in _ALPHA_MODES:
        out = _on_white(im.convert("RGBA"))
        actions.append("alpha_on_white")
        if _ALPHA_MODES[mode] != "rgb":
            actions.append(f"{_ALPHA_MODES[mode]}_to_rgb")
        return out
    actions.append(f"{mode.lower().replace(';', '')}_to_rgb")
    if mode == "1":
        im = im.convert("L")
    return im.convert("RGB")


def _is_truncation(exc: BaseException) -> bool:
    """Pillow's ways of saying the data ended early ("image file is truncated",
    "Truncated File Read", "incomplete"…), in any case."""
    text = str(exc).lower()
    return "truncated" in text or "incomplete" in text


def _finish_small(res: FixResult, small: Image.Image, check_size: int) -> None:
    """Keep the small decode (RGB) and make the hash inputs from it. Big photos stay big
    even at 1/8 scale (4000×3000 → 500×375): those are box-reduced further so that the
    short side lies in [2, 4) × ``check_size`` and the per-image work stays bounded."""
    if small.mode != "RGB":
        small = small.convert("RGB")
    short = min(small.size)
    if short >= 4 * check_size:
        small = small.reduce(short // (2 * check_size))
    res.small = small
    res.gray32, res.gray9x8 = gray_for_hash(small)


def _drop(res: FixResult, reason: str, error: str | None = None) -> FixResult:
    res.status, res.reason, res.error = DROPPED, reason, error
    res.out_bytes = None
    res.small = res.gray32 = res.gray9x8 = None
    return res


class DecodeBudget:
    """Bounds the decoded-pixel memory that a shard's threads hold at once.

    Each full decode first takes its estimated size (:func:`decode_cost`) from the
    budget and waits while the others hold too much; an image larger than the whole
    budget waits until it can run alone. ``peak`` is the most that was ever held (for
    tests and stats)."""

    def __init__(self, limit_bytes: int):
        self.limit = max(1, int(limit_bytes))
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        cost = min(max(0, int(cost)), self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.held + cost <= self.limit)
            self.held += cost
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._cond:
                self.held -= cost
                self._cond.notify_all()


#: bytes per pixel of a decoded Pillow image (RGB is stored as 4 bytes a pixel)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "LA": 4, "PA": 4}


def decode_cost(im: Image.Image, small: bool = False) -> int:
    """Estimated peak bytes of fixing ``im`` (just opened, header only): the decoded
    source plus the RGB output (and the RGBA copy for transparency). A clean JPEG kept
    as is is only draft-decoded (1/64 of the pixels at 1/8 scale)."""
    pixels = im.width * im.height
    if small:
        return pixels * 4 // 16  # draft decode at 1/4 or smaller: a bound, not an estimate
    src = _MODE_BYTES.get(im.mode, 4)
    extra = 4 if ("transparency" in im.info or im.mode in _ALPHA_MODES) else 0
    return pixels * (src + 4 + extra)


def _fix(data: bytes, cfg: FixSettings, res: FixResult, budget: DecodeBudget | None = None) -> FixResult:
    if not data:
        return _drop(res, "empty", "0 bytes")

    fmt = sniff(data)
    res.src_format = fmt
    if fmt in NOT_IMAGE_FORMATS:
        return _drop(res, "not_image", f"content is {fmt}")
    if fmt is None:
        try:  # a format without a magic number that Pillow still knows (TGA…)?
            with Image.open(io.BytesIO(data)) as probe:
                res.src_format = (probe.format or "unknown").lower()
        except Exception:
            return _drop(res, "not_image", "unknown content")
        return _drop(
            res, "unsupported_format", f"format {res.src_format} is not in fix.allowed_formats"
        )
    if fmt not in cfg.allowed_formats:
        return _drop(res, "unsupported_format", f"format {fmt} is not in fix.allowed_formats")

    try:
        im = open_checked(data, cfg.max_pixels, fmt)
    except ImageTooLarge as exc:
        res.src_width, res.src_height = exc.width, exc.height
        return _drop(res, "too_large", str(exc))
    except Exception as exc:  # noqa: BLE001 - a header that ends early is a truncated file
        if len(data) < cfg.min_bytes or _is_truncation(exc):
            return _drop(res, "truncated", f"{len(data)} bytes, the header does not parse: {exc}"[:500])
        raise
    res.src_mode = im.mode
    res.src_width, res.src_height = im.size
    if min(im.size) < cfg.min_side:
        return _drop(res, "too_small", f"{im.width}x{im.height} < min_side {cfg.min_side}")

    is_jpeg = im.format in ("JPEG", "MPO")
    complete = not is_jpeg or has_jpeg_eoi(data)
    orientation = _orientation(im) if is_jpeg else None
    progressive = is_jpeg and is_progressive_jpeg(im)
    as_is = (
        im.format == "JPEG"  # an MPO (a phone's JPEG + a second image) is re-encoded
        and complete
        and im.mode == "RGB"
        and orientation is None
        and (cfg.keep_progressive or not progressive)
    )
    with budget.hold(decode_cost(im, small=as_is)) if budget is not None else nullcontext():
        return _decode(data, im, cfg, res, fmt, is_jpeg, complete, orientation, progressive, as_is)


def _decode(
    data: bytes,
    im: Image.Image,
    cfg: FixSettings,
    res: FixResult,
    fmt: str,
    is_jpeg: bool,
    complete: bool,
    orientation: int | None,
    progressive: bool,
    as_is: bool,
) -> FixResult:
    mpo = im.format == "MPO"
    # --- the common case: a clean RGB JPEG, kept as is, decoded small only ------------
    if as_is:
        try:
            small = draft_small(im, cfg.check_size)
        except OSError as exc:
            if not _is_truncation(exc):
                raise
            complete = False  # an EOI that was not the image's own: decode as truncated
        else:
            if image_decoded_rows(small) == small.height:
                res.width, res.height = res.src_width, res.src_height
                _finish_small(res, small, cfg.check_size)
                res.status, res.decoded_fraction = KEPT, 1.0
                return res
            # grey fill at the bottom although the file ends with EOI: it was cut and an
            # EOI appended. Decode it fully and measure the fill at full size.
            im.close()
            im = open_checked(data, cfg.max_pixels, fmt)

    # --- everything else: full decode, fix, re-encode ----------------------------------
    actions = res.actions
    if complete:
        if getattr(im, "is_animated", False) and not is_jpeg:
            im.seek(0)
            actions.append("first_frame")
        try:
            im.load()
            res.decoded_fraction = 1.0
        except OSError as exc:
            if not _is_truncation(exc):
                raise
            if not is_jpeg:
                res.decoded_fraction = 0.0
                return _drop(res, "truncated", f"{type(exc).__name__}: {exc}")
            complete = False
        if complete and not is_jpeg:
            orientation = _orientation(im)  # PNG/WebP EXIF may come after the pixels
    if not complete:
        im.close()
        im = load_truncated_jpeg(data, cfg.max_pixels)
    if is_jpeg:
        rows = image_decoded_rows(im) if im.mode in ("RGB", "L") else im.height
        cut = not complete or rows < im.height
        if cut:
            actions.append("reencode_truncated")
            res.decoded_fraction = rows / im.height
            if progressive:
                # a progressive JPEG cut after its first (DC) scan has every row, at a
                # lower quality: its decoded share is not known, only its scan count
                res.jpeg_scans = jpeg_scans(data)
                if rows == im.height:
                    res.decoded_fraction = None
            if rows == 0 or (res.decoded_fraction is not None and res.decoded_fraction < cfg.min_decoded_fraction):
                return _drop(
                    res,
                    "truncated",
                    f"only {rows / im.height:.1%} of rows decoded (< min_decoded_fraction {cfg.min_decoded_fraction})",
                )
            if rows < im.height:
                im = im.crop((0, 0, im.width, rows))
        if mpo:
            actions.append("mpo_to_jpeg")

    if orientation is not None:
        im = im.transpose(_TRANSPOSE[orientation])
        actions.append("exif_transpose")
    src_mode = res.src_mode
    out = _to_rgb(im, actions)
    if not is_jpeg:
        actions.append(f"{fmt}_to_jpeg")
    elif progressive and not cfg.keep_progressive:
        actions.append("progressive_to_baseline")

    res.width, res.height = out.size
    if min(out.size) < cfg.min_side:
        return _drop(res, "too_small", f"{out.width}x{out.height} < min_side {cfg.min_side}")

    buf = io.BytesIO()
    icc = im.info.get("icc_profile") if src_mode in ("RGB", "RGBA", "RGBX") else None
    out.save(buf, "JPEG", quality=cfg.jpeg_quality, icc_profile=icc)
    res.out_bytes = buf.getvalue()
    _finish_small(res, reduce_to(out, cfg.check_size), cfg.check_size)
    res.status = KEPT
    return res


def fix_image(data: bytes, cfg: FixSettings | None = None, budget: DecodeBudget | None = None) -> FixResult:
    """Classify one image and fix it if needed (see the module docstring). Never raises
    on bad input: data that ends early is ``truncated``, any other unexpected failure is
    ``dropped`` with reason ``decode_error``. ``budget`` bounds the memory of concurrent
    full decodes (:class:`DecodeBudget`)."""
    cfg = as_settings(FixSettings, cfg)
    res = FixResult(status=DROPPED)
    try:
        return _fix(bytes(data) if not isinstance(data, bytes) else data, cfg, res, budget)
    except Exception as exc:  # noqa: BLE001 - bad input must never stop a run
        message = f"{type(exc).__name__}: {exc}"
        return _drop(res, "truncated" if _is_truncation(exc) else "decode_error", message[:500])



__all__ = [
    "MISSING",
    "REASONS",
    "VERSION",
    "DecodeBudget",
    "FixResult",
    "FixSettings",
    "decode_cost",
    "fix_image",
]
