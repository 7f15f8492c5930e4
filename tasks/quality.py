"""Quality checks, scored from the small decode that ``tasks.fix`` already made.

The scores use cleanvision's definitions (``cleanvision/issue_managers/image_property.py``,
cleanvision 0.3.7) and its default parameters, so a carflow score and a cleanvision
score of the same image can be compared directly. An image has an issue when its score
is *below* the threshold, as in cleanvision.

| check | score (cleanvision) | default threshold |
|---|---|---|
| dark | 99th percentile of per-pixel brightness ``sqrt(.241 R² + .691 G² + .068 B²)/255`` | 0.32 |
| light | 1 − 5th percentile of that brightness | 0.05 |
| low_information | ``min(0.1 · Image.entropy(), 1)`` | 0.3 |
| blurry | image resized to longest side 64 (bicubic), grey, ``FIND_EDGES``; ``min(1−e^(−0.01·std(edges)) + s, 1)`` where ``s = 1−e^(−0.01·std(grey histogram))`` counts only above 0.18 | 0.29 |
| grayscale | 0 when the source image is stored as ``L`` (one grey channel), else 1 | score == 0 |
| odd_aspect_ratio | ``min(w/h, h/w)`` | 0.35 |
| odd_size | set-level: distance of ``sqrt(w·h)`` from the middle of the IQR fences (``iqr_factor`` 3), see :func:`odd_size_scores` | 0.5 (1.0 when all sizes are equal) |

Where our numbers can differ from cleanvision's:

- **Small decode.** cleanvision computes brightness and entropy on the full-size image
  and blurriness on a bicubic resize of it. We compute all of them on the draft-mode
  decode (JPEG DCT scaling to 1/2–1/8, other formats box-reduced) of the *output* image.
  Brightness percentiles move a little; entropy is lower on the smaller image (box
  averaging removes pixel noise), so low_information errs towards flagging; blurriness
  resizes from the small decode to the same 64-pixel target, so it agrees closely.
  Measured on the test images (``test_close_to_cleanvision``), max |ours − cleanvision|:
  dark 0.02, light 0.04, blurry 0.03, low_information 0.09; grayscale and aspect ratio
  exact. Note that cleanvision's blurry score has a step: the
  grey-histogram term (≈0.18) counts only above ``color_threshold``, so an image right
  at that edge can differ by ~0.18 when the small decode moves it across.
  ``tests/test_quality.py`` measures the agreement.
- **Output, not source.** We score the fixed image: RGB, EXIF orientation applied, alpha
  composited on white. cleanvision scores the file as Pillow opens it, so for palette,
  RGBA, LA or CMYK files its brightness/entropy are computed on other channels
  (palette indices, four bands…). For RGB and ``L`` sources the definitions coincide;
  for ``L`` sources we score the grey channel, exactly as cleanvision does.
- **grayscale.** cleanvision only looks at the stored mode. We keep that score, and also
  report ``colorfulness`` (mean over the pixels of the 64-pixel blur resize of
  ``(max(R,G,B) − min(R,G,B)) / 255``);
  the grayscale check also fires when colorfulness is below
  ``grayscale_colorfulness_threshold`` (default 0.01: a black-and-white photo saved as
  RGB). Set it to 0 for cleanvision's behaviour.
- **odd_size** needs the whole set's size distribution; a per-image score does not
  exist. :func:`quality_scores` returns the raw ``sqrt_area`` (cleanvision's ``size``,
  ``sqrt(w·h)``); the stage computes :func:`odd_size_scores` (or :func:`flag_odd_size`)
  over all kept images of the manifest and adds ``odd_size`` to their flags.

Defaults: every check only *flags* (the image stays ``kept`` and the check is listed
in ``quality_flags``); set ``<check>_action: drop`` to drop instead, or ``off`` to skip.
Flag-only keeps every decision reversible: a dataset builder can filter on the flags
later without re-running the stage, while unusable images (empty, not an image,
truncated, tiny, bombs) are already dropped by the fixer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageFilter

from carflow.manifest import DROPPED
from carflow.settings import QualitySettings

#: checks in the order they are applied (the first ``drop`` check names the reason)
CHECKS = ("dark", "light", "low_information", "blurry", "grayscale", "odd_aspect_ratio", "odd_size")

#: cleanvision's MAX_RESOLUTION_FOR_BLURRY_DETECTION
BLUR_MAX_RESOLUTION = 64


# ---------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------
_BRIGHT_W = np.array([241, 691, 68], dtype=np.int32)  # cleanvision's weights × 1000


def brightness(arr: np.ndarray) -> np.ndarray:
    """cleanvision's per-pixel perceived brightness in [0, 1]:
    ``sqrt(0.241 R² + 0.691 G² + 0.068 B²) / 255`` (grey images: ``v / 255``)."""
    if arr.ndim == 2:
        return arr / 255.0
    return np.sqrt(_brightness_key(arr) / 1000.0) / 255.0


def _brightness_key(arr: np.ndarray) -> np.ndarray:
    """``1000 × (255 · brightness)²`` as exact integers: same order as the brightness."""
    a = arr.reshape(-1, arr.shape[-1])[:, :3].astype(np.int32)
    return (a * a) @ _BRIGHT_W


def brightness_percentiles(arr: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(brightness(arr), qs)``, computed on the integer keys (a monotone
    transform), with only the few order statistics needed taken through the sqrt."""
    if arr.ndim == 2:
        return [v / 255.0 for v in percentiles(arr.ravel(), qs)]
    key = _brightness_key(arr)
    n = key.size
    pos = [(n - 1) * q / 100.0 for q in qs]
    kth = sorted({int(p) for p in pos} | {min(int(p) + 1, n - 1) for p in pos})
    part = np.partition(key, kth)
    out = []
    for p in pos:
        lo = int(p)
        hi = min(lo + 1, n - 1)
        v_lo = math.sqrt(part[lo] / 1000.0) / 255.0
        v_hi = math.sqrt(part[hi] / 1000.0) / 255.0
        out.append(v_lo + (v_hi - v_lo) * (p - lo))
    return out


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, qs)`` (linear interpolation) via one partial sort."""
    n = values.size
    pos = [(n - 1) * q / 100.0 for q in qs]
    kth = sorted(
        {int(math.floor(p)) for p in pos} | {min(int(math.floor(p)) + 1, n - 1) for p in pos}
    )
    part = np.partition(values, kth)
    out = []
    for p in pos:
        lo = int(math.floor(p))
        hi = min(lo + 1, n - 1)
        frac = p - lo
        out.append(float(part[lo] + (part[hi] - part[lo]) * frac))
    return out


def _colorfulness(arr: np.ndarray) -> float:
    """Mean of ``(max(R,G,B) - min(R,G,B)) / 255`` over the pixels (0 for grey)."""
    if arr.ndim != 3:
        return 0.0
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float(spread.mean()) / 255.0


_LEVELS = np.arange(256, dtype=np.float64)


def _hist_mean_var(hist: list[int]) -> tuple[float, float]:
    """Mean and (population) variance of an 8-bit image from its histogram, as
    ``ImageStat.Stat`` computes them."""
    h = np.asarray(hist, dtype=np.float64)
    n = h.sum()
    mean = float(h @ _LEVELS) / n
    return mean, float(h @ (_LEVELS * _LEVELS)) / n - mean * mean


def blur_target(width: int, height: int) -> tuple[int, int]:
    """The size cleanvision resizes a ``width × height`` image to before the blur test."""
    ratio = max(width, height) / BLUR_MAX_RESOLUTION
    if ratio <= 1:
        return width, height
    return max(int(width // ratio), 1), max(int(height // ratio), 1)


def quality_scores(
    small_rgb: np.ndarray | Image.Image,
    width: int,
    height: int,
    *,
    src_mode: str | None = None,
    cfg: QualitySettings | None = None,
) -> dict[str, Any]:
    """Per-image quality scores from the small decode of an image whose full size is
    ``width × height``. ``src_mode`` is the Pillow mode of the source file (only
    ``"L"`` changes anything: grey sources are scored on one channel, as cleanvision
    does). Keys: ``width height aspect_ratio sqrt_area dark_score light_score entropy
    low_information_score blurriness blurry_score grayscale_score colorfulness
    odd_aspect_ratio_score``."""
    cfg = cfg or QualitySettings()
    img = (
        small_rgb if isinstance(small_rgb, Image.Image) else Image.fromarray(np.asarray(small_rgb))
    )
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    grey_source = src_mode in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F")
    if grey_source and img.mode != "L":
        img = img.convert("L")  # equal channels: exact
    arr = np.asarray(img)

    # brightness (dark / light)
    p5, p99 = brightness_percentiles(arr, (5, 99))
    # entropy (low information)
    entropy = float(img.entropy())
    low_info = min(cfg.low_information_normalizing_factor * entropy, 1.0)
    # blurriness on the 64-pixel resize, with the target taken from the full size
    # resize first, then grey, as cleanvision does: grey-then-resize is cheaper but moves
    # the grey-histogram spread, and the blurry score jumps by ~0.18 where that spread
    # crosses cleanvision's color_threshold
    small = (
        img.resize(blur_target(width, height), Image.Resampling.BICUBIC)
        if max(width, height) > BLUR_MAX_RESOLUTION
        else img
    )
    grey = small if small.mode == "L" else small.convert("L")
    blurriness = math.sqrt(
        max(_hist_mean_var(grey.filter(ImageFilter.FIND_EDGES).histogram())[1], 0.0)
    )
    hist = np.asarray(grey.histogram(), dtype=np.float64)
    hist_std = math.sqrt(max(float(hist @ hist) / hist.size - (hist.sum() / hist.size) ** 2, 0.0))
    nf = cfg.blurry_normalizing_factor
    blur = 1 - math.exp(-blurriness * nf)
    std_score = 1 - math.exp(-hist_std * nf)
    if std_score <= cfg.blurry_color_threshold:
        std_score = 0.0
    # colour, on the 64-pixel resize too (it is our own score; fewer pixels)
    colorfulness = _colorfulness(np.asarray(small)) if small.mode == "RGB" else 0.0
    aspect = min(width / height, height / width) if width and height else 0.0
    return {
        "width": int(width),
        "height": int(height),
        "aspect_ratio": float(aspect),
        "odd_aspect_ratio_score": float(aspect),
        "sqrt_area": math.sqrt(width) * math.sqrt(height),
        "dark_score": float(p99),
        "light_score": float(1 - p5),
        "entropy": entropy,
        "low_information_score": float(low_info),
        "blurriness": float(blurriness),
        "blurry_score": float(min(blur + std_score, 1.0)),
        "grayscale_score": 0 if src_mode == "L" else 1,
        "colorfulness": colorfulness,
    }


def odd_size_scores(sizes: Any, iqr_factor: float = 3.0) -> tuple[np.ndarray, float]:
    """cleanvision's set-level odd-size scores for ``sizes`` (``sqrt(w·h)`` of each
    image) and the threshold that goes with them (0.5, or 1.0 when every size is the
    same). An image is odd-sized when its score is below the threshold."""
    size = np.asarray(sizes, dtype=np.float64)
    if size.size == 0:
        return size, 0.5
    q1, q3 = np.percentile(size, [25, 75])
    iqr = q3 - q1
    lo, hi = q1 - iqr_factor * iqr, q3 + iqr_factor * iqr
    mid, gap = (lo + hi) / 2, hi - lo
    if gap > 0:
        norm, threshold = gap, 0.5
    else:
        norm, threshold = mid, 1.0
    if norm == 0:
        return np.ones_like(size), threshold
    return 1 - np.clip(np.abs(size - mid) / norm, 0, 1), threshold


def flag_odd_size(sizes: Any, cfg: QualitySettings | None = None) -> np.ndarray:
    """Boolean mask of odd-sized images in a set (the stage calls this over the manifest)."""
    cfg = cfg or QualitySettings()
    scores, threshold = odd_size_scores(sizes, cfg.odd_size_iqr_factor)
    if cfg.odd_size_threshold is not None:
        threshold = cfg.odd_size_threshold
    return scores < threshold


# ---------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------
#: settings that change a per-image *score* (part of a shard's cache key); every other
#: quality setting (thresholds, actions, odd_size) is a decision applied in the reduce step
SCORE_SETTINGS = ("low_information_normalizing_factor", "blurry_normalizing_factor", "blurry_color_threshold")


def scoring_settings(cfg: QualitySettings | dict | None = None) -> QualitySettings:
    """``cfg`` with every check ``off``: what a shard scores with (scores, no decisions)."""
    cfg = cfg if isinstance(cfg, QualitySettings) else QualitySettings(**(cfg or {}))
    return cfg.model_copy(update={f"{c}_action": "off" for c in CHECKS})


def _values(scores: Any, key: str, n: int) -> np.ndarray:
    """Column ``key`` of ``scores`` (a mapping or an Arrow table) as float64, NaN for
    null or absent."""
    names = scores.column_names if hasattr(scores, "column_names") else scores
    if key not in names:
        return np.full(n, np.nan)
    col = scores[key]
    if hasattr(col, "to_numpy") and hasattr(col, "null_count"):  # Arrow
        return np.asarray(col.cast("float64").to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.array([np.nan if v is None else v for v in np.atleast_1d(col)], dtype=np.float64)


def issue_masks(scores: Any, cfg: QualitySettings | None = None, n: int | None = None) -> dict[str, np.ndarray]:
    """Per check (in :data:`CHECKS` order, actions ``off`` left out), a boolean mask of
    the images that fail it. ``scores`` holds score columns (an Arrow table or a mapping
    of equal-length sequences); a null or absent score never fails. ``odd_size`` is only
    judged where ``odd_size_score`` is given."""
    cfg = cfg or QualitySettings()
    if n is None:
        n = scores.num_rows if hasattr(scores, "num_rows") else len(next(iter(scores.values()), []))

    def below(key: str, threshold: float) -> np.ndarray:
        v = _values(scores, key, n)
        with np.errstate(invalid="ignore"):
            return ~np.isnan(v) & (v < threshold)

    masks: dict[str, np.ndarray] = {}
    for check in CHECKS:
        if getattr(cfg, f"{check}_action") == "off":
            continue
        if check == "dark":
            m = below("dark_score", cfg.dark_threshold)
        elif check == "light":
            m = below("light_score", cfg.light_threshold)
        elif check == "low_information":
            m = below("low_information_score", cfg.low_information_threshold)
        elif check == "blurry":
            m = below("blurry_score", cfg.blurry_threshold)
        elif check == "grayscale":
            m = (_values(scores, "grayscale_score", n) == 0) | below(
                "colorfulness", cfg.grayscale_colorfulness_threshold
            )
        elif check == "odd_aspect_ratio":
            m = below("aspect_ratio", cfg.odd_aspect_ratio_threshold)
        else:  # odd_size
            threshold = cfg.odd_size_threshold
            if threshold is None:
                t = _values(scores, "odd_size_threshold", n)
                threshold = np.where(np.isnan(t), 0.5, t)
            v = _values(scores, "odd_size_score", n)
            with np.errstate(invalid="ignore"):
                m = ~np.isnan(v) & (v < threshold)
        masks[check] = m
    return masks


def apply_quality(
    scores: dict[str, Any], cfg: QualitySettings | None = None
) -> tuple[list[str], str | None]:
    """``(flags, drop_reason)`` of one image: every check the image fails (whose action
    is not ``off``), and the first failed check whose action is ``drop`` (else ``None``).
    ``odd_size`` is only judged when ``scores`` has an ``odd_size_score``."""
    cfg = cfg or QualitySettings()
    masks = issue_masks({k: [v] for k, v in scores.items()}, cfg, n=1)
    flags = [check for check, m in masks.items() if m[0]]
    drop = next((c for c in flags if getattr(cfg, f"{c}_action") == "drop"), None)
    return flags, drop


def quality_decisions(scores: Any, cfg: QualitySettings | None = None, active: np.ndarray | None = None):
    """:func:`apply_quality` over a table of per-image scores at once (the reduce step):
    ``(flags, drop)`` as Arrow arrays, ``list<string>`` flags in check order and the
    first ``drop`` check (null when none). Rows outside ``active`` get ``[]`` and null."""
    import pyarrow as pa

    cfg = cfg or QualitySettings()
    n = scores.num_rows
    masks = issue_masks(scores, cfg, n)
    if active is not None:
        masks = {c: m & active for c, m in masks.items()}
    names = list(masks)
    matrix = np.stack([masks[c] for c in names], axis=1) if names else np.zeros((n, 0), bool)
    _, cols = np.nonzero(matrix)  # row-major: each row's flags in check order
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(matrix.sum(axis=1), out=offsets[1:])
    flags = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(np.array(names, dtype=object)[cols] if names else [], pa.string())
    )
    drop = np.full(n, None, dtype=object)
    for c in reversed(names):  # the first drop check in order wins
        if getattr(cfg, f"{c}_action") == "drop":
            drop[masks[c]] = c
    return flags, pa.array(drop, pa.string())


def _append_flag(flags: pa.Array | pa.ChunkedArray, mask: np.ndarray, flag: str) -> pa.Array:
    """``flags`` (list<string>) with ``flag`` appended on the rows of ``mask``."""
    if isinstance(flags, pa.ChunkedArray):
        flags = flags.combine_chunks()
    n = len(flags)
    parents = pc.list_parent_indices(flags).to_numpy()
    add = np.flatnonzero(mask)
    all_parents = np.concatenate([parents, add])
    order = np.argsort(all_parents, kind="stable")
    values = pa.concat_arrays([pc.list_flatten(flags).cast(pa.string()), pa.array([flag] * add.size, pa.string())])
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(all_parents, minlength=n), out=offsets[1:])
    nulls = flags.is_null().to_numpy(zero_copy_only=False) & ~mask
    return pa.ListArray.from_arrays(pa.array(offsets), values.take(pa.array(order)), mask=pa.array(nulls))


def apply_odd_size(table: pa.Table, cfg: QualitySettings) -> pa.Table:
    """``odd_size`` is a set-level check (cleanvision's IQR rule) over the kept rows of the
    whole manifest (an Arrow table with ``status``, ``reason``, ``width``, ``height``,
    ``quality_flags``): flags them, and drops them with reason ``odd_size`` when
    ``quality.odd_size_action`` is ``drop``."""
    if cfg.odd_size_action == "off":
        return table
    kept = pc.and_(pc.not_equal(table["status"], DROPPED), pc.is_valid(table["width"]))
    kept = pc.fill_null(kept, False).to_numpy(zero_copy_only=False)
    if not kept.any():
        return table
    w = table["width"].cast(pa.float64()).to_numpy(zero_copy_only=False)[kept]
    h = table["height"].cast(pa.float64()).to_numpy(zero_copy_only=False)[kept]
    odd = np.zeros(len(kept), dtype=bool)
    odd[np.flatnonzero(kept)] = flag_odd_size(np.sqrt(w * h), cfg)
    def put(t: pa.Table, name: str, values: Any) -> pa.Table:
        return t.set_column(t.schema.get_field_index(name), name, values)

    table = put(table, "quality_flags", _append_flag(table["quality_flags"], odd, "odd_size"))
    if cfg.odd_size_action == "drop":
        mask = pa.array(odd)
        table = put(table, "status", pc.if_else(mask, DROPPED, table["status"]))
        table = put(table, "reason", pc.if_else(mask, "odd_size", table["reason"]))
    return table


__all__ = [
    "CHECKS",
    "QualitySettings",
    "apply_odd_size",
    "apply_quality",
    "blur_target",
    "brightness",
    "brightness_percentiles",
    "flag_odd_size",
    "odd_size_scores",
    "issue_masks",
    "percentiles",
    "quality_decisions",
    "quality_scores",
    "scoring_settings",
]

