"""Fix stage: make every image a clean RGB JPEG, or drop it with a reason, from ONE decode.

Pure functions first; the shard/Prefect wiring lives elsewhere.

- :func:`fix_image` classifies one image's bytes and, when needed, re-encodes it.
- :func:`inspect_image` = :func:`fix_image` + quality scores (``tasks.quality``) +
  perceptual/pixel hashes (``carflow.imagehash``), all from the one small decode that
  the fixer made. Its dict holds the manifest columns of the clean stage.
- :func:`inspect_shard` runs :func:`inspect_image` over ``(image_id, bytes)`` pairs.

Drop reasons, in the order they are tested:

| reason | when |
|---|---|
| ``empty`` | 0 bytes, or fewer than ``min_bytes`` that are not an image (a tiny real image, e.g. a 43-byte 1×1 GIF, is ``too_small``) |
| ``not_image`` | the magic bytes say HTML/XML, text or PDF, or nothing Pillow knows |
| ``unsupported_format`` | a recognised image format outside ``allowed_formats`` (TIFF, HEIC, AVIF, SVG, ICO… by default), or one Pillow identifies that has no magic number we know |
| ``too_large`` | declared ``width × height > max_pixels``; refused from the header, nothing allocated |
| ``too_small`` | shortest side < ``min_side`` (tested on the header and again on the output) |
| ``truncated`` | a JPEG without its end whose decoded share of rows is < ``min_decoded_fraction``, or another format whose data ends early |
| ``decode_error`` | anything else that went wrong; the message is in ``error`` |

A kept image whose original bytes are already a clean RGB JPEG (EOI present, no EXIF
orientation other than 1, not CMYK/grey, baseline or progressive) is kept as is: ``out_bytes`` is ``None`` and
only a draft-mode (1/2–1/8 scale) decode is made. Anything else is fully decoded,
fixed and re-encoded as a baseline RGB JPEG at ``jpeg_quality`` (``out_bytes``); the
caller stores those bytes as a new content-addressed object. Fixes, listed in
``actions``:

- ``reencode_truncated``: a JPEG without EOI is decoded up to where its data ends (an
  EOI is appended; nothing global is switched). libjpeg fills the missing blocks with
  grey 128; we find that fill (whole trailing rows plus the partial MCU row) and **crop
  the image to the rows that really decoded**, so no grey band reaches the dataset.
  ``decoded_fraction`` is that share of rows.
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

import hashlib
import io
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from carflow.imagehash import to_int64
from carflow.imageio import (
    NOT_IMAGE_FORMATS,
    ImageTooLarge,
    decoded_rows,
    draft_small,
    has_jpeg_eoi,
    is_progressive_jpeg,
    load_truncated_jpeg,
    open_checked,
    reduce_to,
    sniff,
)
from carflow.manifest import DROPPED, KEPT
from carflow.settings import FixSettings, QualitySettings, as_settings
from tasks.quality import apply_quality, quality_scores

STAGE = "fix"
#: bump when a change here changes any output column (it is part of the cache key)
VERSION = "1"


REASONS = (
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
    #: share of rows that really decoded (truncated JPEGs; 1.0 for other decoded images)
    decoded_fraction: float | None = None
    #: the small decode of the output image (RGB, short side ≥ check_size and long side ≥ 2 × check_size where the image allows)
    small: Image.Image | None = field(default=None, repr=False)
    #: 32×32 grey (uint8), the input of ``phash64``
    gray32: np.ndarray | None = field(default=None, repr=False)
    #: 8 rows × 9 columns grey (uint8), the input of ``dhash64``
    gray9x8: np.ndarray | None = field(default=None, repr=False)

    @property
    def small_rgb(self) -> np.ndarray | None:
        return None if self.small is None else np.asarray(self.small)


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(_ORIENTATION)
    except Exception:  # a corrupt EXIF block is ignored, not fatal
        return None
    return value if value in _TRANSPOSE else None


def _to_rgb(im: Image.Image, actions: list[str]) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if "transparency" in im.info and mode in ("P", "L", "RGB"):
        im = im.convert("RGBA" if mode != "L" else "LA")
        mode_base = {"P": "p", "L": "l", "RGB": "rgb"}[mode]
        mode = im.mode
    else:
        mode_base = _ALPHA_MODES.get(mode)
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        actions.append("alpha_on_white")
        if mode_base != "rgb":
            actions.append(f"{mode_base}_to_rgb")
        return out
    if mode in _GREY_DEEP:
        arr = np.asarray(im)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    actions.append(f"{mode.lower().replace(';', '')}_to_rgb")
    if im.mode == "1":
        im = im.convert("L")
    return im.convert("RGB")


def _is_truncation(exc: OSError) -> bool:
    return "truncated" in str(exc) or "incomplete" in str(exc)


def _hash_inputs(small: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The grey 32×32 (phash) and 8×9 (dhash) arrays, resized as imagehash does
    (grey first, then Lanczos)."""
    grey = small.convert("L")
    return (
        np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS)),
        np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS)),
    )


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
    res.gray32, res.gray9x8 = _hash_inputs(small)


def _drop(res: FixResult, reason: str, error: str | None = None) -> FixResult:
    res.status, res.reason, res.error = DROPPED, reason, error
    res.out_bytes = None
    res.small = res.gray32 = res.gray9x8 = None
    return res


def _decodes(data: bytes) -> bool:
    """A few bytes that still decode as an image (a 1×1 GIF is 43 bytes)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - anything Pillow cannot read is not a tiny image
        return False


def _fix(data: bytes, cfg: FixSettings, res: FixResult) -> FixResult:
    if not data or (len(data) < cfg.min_bytes and not _decodes(data)):
        return _drop(res, "empty", f"{len(data)} bytes")

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
    res.src_mode = im.mode
    res.src_width, res.src_height = im.size
    if min(im.size) < cfg.min_side:
        return _drop(res, "too_small", f"{im.width}x{im.height} < min_side {cfg.min_side}")

    is_jpeg = im.format in ("JPEG", "MPO")
    complete = not is_jpeg or has_jpeg_eoi(data)
    orientation = _orientation(im) if is_jpeg else None
    progressive = is_jpeg and is_progressive_jpeg(im)

    # --- the common case: a clean RGB JPEG, kept as is, decoded small only ------------
    if (
        is_jpeg
        and complete
        and im.mode == "RGB"
        and orientation is None
        and (cfg.keep_progressive or not progressive)
    ):
        try:
            small = draft_small(im, cfg.check_size)
        except OSError as exc:
            if not _is_truncation(exc):
                raise
            complete = False  # an EOI that was not the image's own: decode as truncated
        else:
            res.width, res.height = res.src_width, res.src_height
            _finish_small(res, small, cfg.check_size)
            res.status, res.decoded_fraction = KEPT, 1.0
            return res

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
        rows = decoded_rows(np.asarray(im))
        res.decoded_fraction = rows / im.height
        if rows == 0 or res.decoded_fraction < cfg.min_decoded_fraction:
            return _drop(
                res,
                "truncated",
                f"only {res.decoded_fraction:.1%} of rows decoded (< min_decoded_fraction {cfg.min_decoded_fraction})",
            )
        if rows < im.height:
            im = im.crop((0, 0, im.width, rows))
        actions.append("reencode_truncated")

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


def fix_image(data: bytes, cfg: FixSettings | None = None) -> FixResult:
    """Classify one image and fix it if needed (see the module docstring). Never raises
    on bad input: an unexpected failure is ``dropped`` with reason ``decode_error``."""
    cfg = as_settings(FixSettings, cfg)
    res = FixResult(status=DROPPED)
    try:
        return _fix(bytes(data) if not isinstance(data, bytes) else data, cfg, res)
    except Exception as exc:  # noqa: BLE001 - bad input must never stop a run
        message = f"{type(exc).__name__}: {exc}"
        return _drop(res, "decode_error", message[:500])


# ---------------------------------------------------------------------------------------
# the single pass: fix + quality + hashes
# ---------------------------------------------------------------------------------------
#: columns of :func:`inspect_image`'s dict (besides ``image_id`` from :func:`inspect_shard`)
SCORE_COLUMNS = (
    "aspect_ratio",
    "sqrt_area",
    "dark_score",
    "light_score",
    "entropy",
    "low_information_score",
    "blurriness",
    "blurry_score",
    "grayscale_score",
    "colorfulness",
)
COLUMNS = (
    "status",
    "reason",
    "error",
    "fix_actions",
    "src_format",
    "src_mode",
    "width",
    "height",
    "decoded_fraction",
    "out_bytes",
    "out_image_id",
    *SCORE_COLUMNS,
    "quality_flags",
    "phash",
    "dhash",
    "pixel_hash",
)


def inspect_schema(with_out_bytes: bool = True):
    """The Arrow schema of :func:`inspect_shard`'s rows (``image_id`` first), so a shard
    whose lists are all empty or whose scores are all null still gets typed columns:
    ``pa.Table.from_pylist(rows, schema=inspect_schema())``."""
    import pyarrow as pa

    types = {
        "image_id": pa.string(),
        "status": pa.string(),
        "reason": pa.string(),
        "error": pa.string(),
        "fix_actions": pa.list_(pa.string()),
        "src_format": pa.string(),
        "src_mode": pa.string(),
        "width": pa.int64(),
        "height": pa.int64(),
        "decoded_fraction": pa.float64(),
        "out_bytes": pa.binary(),
        "out_image_id": pa.string(),
        **{c: pa.float64() for c in SCORE_COLUMNS},
        "grayscale_score": pa.int64(),
        "quality_flags": pa.list_(pa.string()),
        "phash": pa.int64(),
        "dhash": pa.int64(),
        "pixel_hash": pa.string(),
    }
    names = ["image_id", *COLUMNS]
    if not with_out_bytes:
        names.remove("out_bytes")
    return pa.schema([pa.field(n, types[n]) for n in names])


def _hashers():
    from carflow import imagehash  # another engineer's module; imported on first use

    return imagehash


def inspect_image(
    data: bytes,
    fix_cfg: FixSettings | None = None,
    quality_cfg: QualitySettings | None = None,
) -> dict[str, Any]:
    """One decode → the clean stage's columns for one image.

    ``phash``/``dhash`` are stored as **signed int64** (the 64 hash bits reinterpreted;
    XOR/popcount distances are unchanged; :func:`to_int64`). ``pixel_hash`` is
    ``pixel_sha256`` of the small decode (equal for files whose coded pixels are
    identical but whose bytes differ, e.g. metadata-only edits). A quality check with
    action ``drop`` sets ``status='dropped'`` and ``reason`` to the check name; hashes
    and scores are still filled in for such rows. Never raises on bad input (a missing
    ``carflow.imagehash`` or an invalid config does raise)."""
    fix_cfg = as_settings(FixSettings, fix_cfg)
    quality_cfg = as_settings(QualitySettings, quality_cfg)
    ih = _hashers()  # a missing hash module is a broken install, not a bad image: raise
    res = fix_image(data, fix_cfg)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        status=res.status,
        reason=res.reason,
        error=res.error,
        fix_actions=list(res.actions),
        src_format=res.src_format,
        src_mode=res.src_mode,
        width=res.width,
        height=res.height,
        decoded_fraction=res.decoded_fraction,
        out_bytes=res.out_bytes,
        out_image_id=hashlib.sha256(res.out_bytes).hexdigest()
        if res.out_bytes is not None
        else None,
        quality_flags=[],
    )
    if res.status != KEPT or res.small is None:
        return row
    try:
        scores = quality_scores(
            res.small, res.width, res.height, src_mode=res.src_mode, cfg=quality_cfg
        )
        for key in SCORE_COLUMNS:
            row[key] = scores[key]
        flags, drop = apply_quality(scores, quality_cfg)
        row["quality_flags"] = flags
        row["phash"] = to_int64(ih.phash64(res.gray32))
        row["dhash"] = to_int64(ih.dhash64(res.gray9x8))
        row["pixel_hash"] = ih.pixel_sha256(res.small)
    except Exception as exc:  # noqa: BLE001
        row.update(
            status=DROPPED,
            reason="decode_error",
            error=f"{type(exc).__name__}: {exc}"[:500],
            out_bytes=None,
            out_image_id=None,
        )
        return row
    if drop is not None:
        row.update(status=DROPPED, reason=drop, out_bytes=None, out_image_id=None)
    return row


def inspect_shard(
    items: Iterable[tuple[str, bytes]],
    fix_cfg: FixSettings | None = None,
    quality_cfg: QualitySettings | None = None,
    *,
    workers: int = 1,
    put_image: Callable[[bytes], str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`inspect_image` over ``(image_id, bytes)`` pairs → one dict per item, in
    input order, each starting with ``image_id``.

    ``workers > 1`` uses a thread pool: Pillow releases the GIL while decoding and
    resizing, so on the 2-core dev box 2 threads give ~1.7× one thread (``bench/clean.py``;
    2 shards in 2 processes, as Prefect's process runner or Dask run them, give ~2×). Use
    ``workers=1`` when the engine already runs one shard per core. At most
    ``4 × workers`` images are in flight, so ``items`` may be a lazy generator. With ``put_image`` each
    re-encoded image is handed to it as soon as it is made (it returns the new
    image_id, which must equal ``out_image_id``) and ``out_bytes`` is dropped from the
    row, so a shard's re-encoded bytes are never all held in memory."""
    fix_cfg = as_settings(FixSettings, fix_cfg)
    quality_cfg = as_settings(QualitySettings, quality_cfg)

    def one(item: tuple[str, bytes]) -> dict[str, Any]:
        image_id, data = item
        row = inspect_image(data, fix_cfg, quality_cfg)
        if put_image is not None and row["out_bytes"] is not None:
            stored = put_image(row["out_bytes"])
            if stored != row["out_image_id"]:
                raise RuntimeError(
                    f"put_image returned {stored!r}, expected {row['out_image_id']!r}"
                )
            row["out_bytes"] = None
        return {"image_id": image_id, **row}

    if workers <= 1:
        return [one(item) for item in items]
    out: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="carflow-fix") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(one, item))
            if len(pending) >= 4 * workers:
                out.append(pending.popleft().result())
        while pending:
            out.append(pending.popleft().result())
    return out


def shard_stats(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counters for a shard's rows (status, reasons, actions, flags) for the stats file
    and the Prefect artifact."""
    from collections import Counter

    status: Counter = Counter()
    reasons: Counter = Counter()
    actions: Counter = Counter()
    flags: Counter = Counter()
    for r in rows:
        status[r.get("status")] += 1
        if r.get("reason"):
            reasons[r["reason"]] += 1
        actions.update(r.get("fix_actions") or [])
        flags.update(r.get("quality_flags") or [])
    return {
        "images": sum(status.values()),
        "status": dict(status),
        "reasons": dict(sorted(reasons.items())),
        "actions": dict(sorted(actions.items())),
        "quality_flags": dict(sorted(flags.items())),
    }


__all__ = [
    "COLUMNS",
    "FixResult",
    "FixSettings",
    "REASONS",
    "SCORE_COLUMNS",
    "as_settings",
    "fix_image",
    "inspect_image",
    "inspect_schema",
    "inspect_shard",
    "shard_stats",
    "to_int64",
]
