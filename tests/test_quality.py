"""Quality scores from the small decode: cleanvision's definitions, checked on generated
images and, where cleanvision is installed, against cleanvision itself."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tasks.fix import FixSettings, fix_image
from tasks.quality import (
    CHECKS,
    QualitySettings,
    apply_quality,
    blur_target,
    flag_odd_size,
    odd_size_scores,
    percentiles,
    quality_scores,
)


def photo(w: int = 320, h: int = 240, seed: int = 0, noise: float = 10.0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + 2 * y) % 256], -1).astype(float)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        arr[y0 : y0 + rng.integers(10, h // 2), x0 : x0 + rng.integers(10, w // 2)] = rng.integers(
            0, 256, 3
        )
    arr += rng.normal(0, noise, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def scores_of(im: Image.Image, cfg: QualitySettings | None = None) -> dict:
    """Through the real path: encode, fix (one small decode), score."""
    res = fix_image(jpeg(im))
    assert res.status == "kept", res.reason
    return quality_scores(res.small, res.width, res.height, src_mode=res.src_mode, cfg=cfg)


def flags_of(im: Image.Image, cfg: QualitySettings | None = None) -> list[str]:
    return apply_quality(scores_of(im, cfg), cfg)[0]


def test_black_is_dark():
    s = scores_of(Image.new("RGB", (320, 240), (2, 2, 2)))
    assert s["dark_score"] < 0.05
    assert "dark" in apply_quality(s)[0]
    assert "dark" not in flags_of(photo())


def test_white_is_light():
    s = scores_of(Image.new("RGB", (320, 240), (254, 254, 254)))
    assert s["light_score"] < 0.02
    assert "light" in apply_quality(s)[0]
    assert "light" not in flags_of(photo())


def test_uniform_is_low_information():
    s = scores_of(Image.new("RGB", (320, 240), (90, 140, 60)))
    assert s["low_information_score"] < 0.2  # log2(3) bits: three equal histogram peaks
    assert "low_information" in apply_quality(s)[0]
    assert "low_information" not in flags_of(photo())


def test_blurred_scores_below_sharp():
    sharp = photo(640, 480, noise=3)
    blurred = sharp.filter(ImageFilter.GaussianBlur(12))
    s_sharp, s_blur = scores_of(sharp), scores_of(blurred)
    assert s_blur["blurriness"] < s_sharp["blurriness"]
    assert s_blur["blurry_score"] < s_sharp["blurry_score"]
    # a smooth, edge-free colour gradient is blurry by cleanvision's rule (a wide grey
    # histogram and almost no edges); cleanvision scores it 0.270
    y, x = np.mgrid[0:480, 0:640]
    ramp = (x / 640 * 0.5 + y / 480 * 0.5) * 255
    smooth = Image.fromarray(np.stack([ramp, ramp * 0.8, ramp * 0.6], -1).astype(np.uint8))
    assert scores_of(smooth)["blurry_score"] == pytest.approx(0.270, abs=0.01)
    assert "blurry" in flags_of(smooth)
    assert "blurry" not in flags_of(sharp)


def test_grayscale_detection():
    grey_file = fix_image(jpeg(photo().convert("L")))
    s = quality_scores(
        grey_file.small, grey_file.width, grey_file.height, src_mode=grey_file.src_mode
    )
    assert s["grayscale_score"] == 0 and "grayscale" in apply_quality(s)[0]
    # a black-and-white photo stored as RGB: caught by colorfulness, not by the mode
    grey_rgb = scores_of(photo().convert("L").convert("RGB"))
    assert grey_rgb["grayscale_score"] == 1 and grey_rgb["colorfulness"] < 0.01
    assert "grayscale" in apply_quality(grey_rgb)[0]
    assert (
        "grayscale"
        not in apply_quality(grey_rgb, QualitySettings(grayscale_colorfulness_threshold=0))[0]
    )
    colour = scores_of(photo())
    assert colour["colorfulness"] > 0.1 and "grayscale" not in apply_quality(colour)[0]


def test_odd_aspect_ratio():
    s = scores_of(photo(640, 160))
    assert s["aspect_ratio"] == pytest.approx(0.25)
    assert "odd_aspect_ratio" in apply_quality(s)[0]
    assert "odd_aspect_ratio" not in flags_of(photo(640, 480))
    assert scores_of(photo(160, 640))["aspect_ratio"] == pytest.approx(0.25)


def test_actions_flag_drop_off():
    s = scores_of(Image.new("RGB", (320, 240), (2, 2, 2)))
    flags, drop = apply_quality(s)
    assert drop is None and {"dark", "low_information"} <= set(flags)
    flags, drop = apply_quality(
        s, QualitySettings(dark_action="drop", low_information_action="drop")
    )
    assert drop == "dark"  # the first failed drop check, in CHECKS order
    flags, drop = apply_quality(s, QualitySettings(dark_action="off"))
    assert "dark" not in flags and drop is None
    with pytest.raises(ValueError):
        QualitySettings(dark_action="delete")
    with pytest.raises(ValueError):
        QualitySettings(dark_threshold=1.5)


def test_odd_size_set_level():
    sizes = [np.sqrt(640 * 480)] * 40 + [np.sqrt(600 * 450)] * 40 + [np.sqrt(6000 * 4500), 8.0]
    mask = flag_odd_size(sizes)
    assert mask[-2] and mask[-1] and not mask[:80].any()
    scores, threshold = odd_size_scores([100.0] * 5)
    assert threshold == 1.0 and (scores == 1).all()
    s = {"odd_size_score": 0.2}
    assert apply_quality(s)[0] == ["odd_size"]


def test_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 4801):
        v = rng.random(n)
        assert percentiles(v, (5, 99)) == pytest.approx(list(np.percentile(v, [5, 99])))


def test_blur_target_matches_cleanvision_rule():
    assert blur_target(640, 480) == (64, 48)
    assert blur_target(1000, 333) == (64, 21)
    assert blur_target(50, 40) == (50, 40)


# ---------------------------------------------------------------------------------------
# against cleanvision itself
# ---------------------------------------------------------------------------------------
def _cleanvision_scores(im: Image.Image) -> dict:
    """cleanvision's per-image scores, computed by its own property classes with its
    default parameters on the image as Pillow opens it (what Imagelab does per file)."""
    import pandas as pd
    from cleanvision.issue_managers.image_property_issue_manager import ImagePropertyIssueManager

    manager = ImagePropertyIssueManager()
    out = {}
    for issue in ("dark", "light", "low_information", "blurry", "grayscale", "odd_aspect_ratio"):
        prop = manager.image_properties[issue]
        raw = pd.DataFrame([prop.calculate(im)])
        scores = prop.get_scores(
            raw_scores=raw[prop.score_columns], issue_type=issue, **manager.params[issue]
        )
        out[issue] = float(scores[f"{issue}_score"].iloc[0])
    return out


TOLERANCE = {
    "dark": 0.05,
    "light": 0.05,
    "blurry": 0.05,
    "low_information": 0.15,
    "grayscale": 0,
    "odd_aspect_ratio": 1e-9,
}
OURS = {
    "dark": "dark_score",
    "light": "light_score",
    "low_information": "low_information_score",
    "blurry": "blurry_score",
    "grayscale": "grayscale_score",
    "odd_aspect_ratio": "aspect_ratio",
}


def test_close_to_cleanvision():
    pytest.importorskip("cleanvision")
    y, x = np.mgrid[0:480, 0:640]
    ramp = (x / 640 * 0.5 + y / 480 * 0.5) * 255
    images = [
        photo(640, 480, seed=1),
        photo(640, 480, seed=2).filter(ImageFilter.GaussianBlur(6)),
        Image.fromarray((np.asarray(photo(800, 600, seed=3)) * 0.2).astype(np.uint8)),  # dark
        Image.fromarray(
            (255 - (255 - np.asarray(photo(800, 600, seed=4))) * 0.1).astype(np.uint8)
        ),  # light
        photo(1024, 768, seed=5, noise=2),
        photo(1600, 1200, seed=8),
        photo(900, 300, seed=6),
        photo(640, 480, seed=7).convert("L"),
        Image.new("RGB", (640, 480), (40, 90, 200)),
        Image.fromarray(np.stack([ramp, ramp * 0.8, ramp * 0.6], -1).astype(np.uint8)),  # blurry
    ]
    worst = dict.fromkeys(TOLERANCE, 0.0)
    for im in images:
        data = jpeg(im)
        theirs = _cleanvision_scores(Image.open(io.BytesIO(data)))
        res = fix_image(data, FixSettings())
        ours = quality_scores(res.small, res.width, res.height, src_mode=res.src_mode)
        for issue, key in OURS.items():
            diff = abs(ours[key] - theirs[issue])
            worst[issue] = max(worst[issue], diff)
            assert diff <= TOLERANCE[issue], (issue, im.size, ours[key], theirs[issue])
        # the same issues are found, except for a score sitting right at a threshold
        cv_cfg = QualitySettings(grayscale_colorfulness_threshold=0)
        ours_flags = set(apply_quality(ours, cv_cfg)[0])
        for issue in OURS:
            threshold = {
                "grayscale": 1,
                **{k: getattr(cv_cfg, f"{k}_threshold") for k in OURS if k != "grayscale"},
            }[issue]
            theirs_flag = theirs[issue] < threshold
            if abs(theirs[issue] - threshold) > TOLERANCE[issue]:
                assert (issue in ours_flags) == theirs_flag, (
                    issue,
                    im.size,
                    ours[OURS[issue]],
                    theirs[issue],
                )
    print("max |ours - cleanvision|:", {k: round(v, 4) for k, v in worst.items()})


def test_decisions_over_a_table_match_the_per_image_rule():
    """The reduce step's vectorised decisions (quality_decisions) give, row by row, what
    apply_quality gives for one image: flags in check order, the first drop check, nulls
    never failing, inactive rows left alone."""
    import pyarrow as pa

    from tasks.quality import quality_decisions

    rng = np.random.default_rng(3)
    n = 400
    cols = {k: rng.random(n) for k in ("dark_score", "light_score", "low_information_score", "blurry_score",
                                        "colorfulness", "aspect_ratio")}
    cols["grayscale_score"] = rng.integers(0, 2, n)
    table = pa.table({k: pa.array(v, mask=rng.random(n) < 0.1) for k, v in cols.items()})
    cfg = QualitySettings(dark_threshold=0.5, dark_action="drop", blurry_threshold=0.4, blurry_action="drop",
                          light_threshold=0.3, low_information_action="off",
                          grayscale_colorfulness_threshold=0.2)
    active = rng.random(n) < 0.9
    flags, drop = quality_decisions(table, cfg, active=active)
    rows = table.to_pylist()
    for i in range(n):
        want = apply_quality(rows[i], cfg) if active[i] else ([], None)
        assert (flags[i].as_py(), drop[i].as_py()) == want, i
    assert sum(d is not None for d in drop.to_pylist()) > 50  # both drop checks fired
    assert {f for fl in flags.to_pylist() for f in fl} == {"dark", "light", "blurry", "grayscale", "odd_aspect_ratio"}


def test_a_shard_scores_without_deciding():
    """A shard's settings make scores only (every check off): what the shard stores does
    not depend on a threshold or an action."""
    from tasks.quality import scoring_settings

    cfg = scoring_settings(QualitySettings(dark_action="drop", blurry_normalizing_factor=0.02))
    assert all(getattr(cfg, f"{c}_action") == "off" for c in CHECKS)
    assert cfg.blurry_normalizing_factor == 0.02
    dark = Image.new("RGB", (96, 64), (5, 5, 5))
    assert apply_quality(scores_of(dark, cfg), cfg) == ([], None)
