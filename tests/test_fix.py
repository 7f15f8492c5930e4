"""Fixer: every drop reason from a purpose-built input, every conversion, one decode.

All inputs are generated here; nothing touches the network or the disk outside tmp."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from carflow.imageio import (
    NOT_IMAGE_FORMATS,
    ImageTooLarge,
    decode_small,
    decoded_rows,
    has_jpeg_eoi,
    image_decoded_rows,
    jpeg_scans,
    open_checked,
    sniff,
)
from tasks.fix import (
    COLUMNS,
    REASONS,
    DecodeBudget,
    FixSettings,
    fix_image,
    inspect_image,
    inspect_schema,
    inspect_shard,
    shard_stats,
    to_int64,
)
from tasks.quality import QualitySettings

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def photo(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    """A colourful, noisy, non-grey test photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack(
        [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + 2 * y) % 256], -1
    ).astype(float)
    arr[h // 4 : h // 2, w // 4 : w // 2] = (220, 30, 40)
    arr += rng.normal(0, 14, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(im: Image.Image | None = None, **kw) -> bytes:
    return encode(im if im is not None else photo(), "JPEG", quality=kw.pop("quality", 90), **kw)


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + tag
        + payload
        + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
    )


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels (the data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    text = png_chunk(b"tEXt", b"Comment\x00" + b"a bomb " * 20)  # over min_bytes
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + text
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def assert_rgb_jpeg(res) -> Image.Image:
    """A kept result's stored image (re-encoded or original) is a baseline RGB JPEG of
    the reported size."""
    assert res.status == "kept", (res.reason, res.error)
    assert res.out_bytes is not None
    out = Image.open(io.BytesIO(res.out_bytes))
    assert out.format == "JPEG" and out.mode == "RGB"
    assert not out.info.get("progressive") and not out.info.get("progression")
    assert out.size == (res.width, res.height)
    assert 0x0112 not in out.getexif()
    out.load()
    return out


# ---------------------------------------------------------------------------------------
# imageio
# ---------------------------------------------------------------------------------------
def test_sniff_formats():
    assert sniff(jpeg()) == "jpeg"
    assert sniff(encode(photo(), "PNG")) == "png"
    assert sniff(encode(photo(), "GIF")) == "gif"
    assert sniff(encode(photo(), "WEBP")) == "webp"
    assert sniff(encode(photo(), "BMP")) == "bmp"
    assert sniff(encode(photo(), "TIFF")) == "tiff"
    assert sniff(b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 50) == "heic"
    assert sniff(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1" + b"\x00" * 50) == "avif"
    assert sniff(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 50) is None
    assert sniff(b"<!DOCTYPE html><html><body>404</body></html>") == "html"
    assert sniff(b"\xef\xbb\xbf  <?xml version='1.0'?><Error>AccessDenied</Error>") == "html"
    assert sniff(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>') == "svg"
    assert sniff(b'{"error": "not found"}') == "text"
    assert sniff("Zugriff verweigert – bitte später".encode()) == "text"
    assert sniff(b"%PDF-1.7\n...") == "pdf"
    assert sniff(bytes(range(256))) is None
    assert sniff(b"") is None


def test_has_jpeg_eoi_ignores_an_eoi_before_the_scan():
    data = jpeg()
    # a COM segment carrying FF D9 (as an EXIF thumbnail would) right after SOI
    payload = b"thumb\xff\xd8\xff\xd9"
    with_com = data[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    assert Image.open(io.BytesIO(with_com)).size == (320, 240)
    assert has_jpeg_eoi(with_com)
    assert has_jpeg_eoi(with_com + b"\x00" * 10)  # padding after EOI
    assert not has_jpeg_eoi(with_com[: len(with_com) // 2])
    assert not has_jpeg_eoi(data[:-2])


def test_open_checked_refuses_from_the_header():
    with pytest.raises(ImageTooLarge) as err:
        open_checked(bomb_png(8000, 6000), max_pixels=40_000_000)  # below Pillow's own limit
    assert (err.value.width, err.value.height) == (8000, 6000)
    with pytest.raises(ImageTooLarge):
        open_checked(bomb_png(30000, 30000), max_pixels=40_000_000)  # Pillow's bomb error, mapped
    assert open_checked(jpeg(), max_pixels=320 * 240).size == (320, 240)


def test_decode_small_uses_draft_scale():
    small = decode_small(jpeg(photo(640, 480)), target=32)
    assert small.mode == "RGB" and small.size == (80, 60)  # 1/8: short ≥ 32, long ≥ 64
    assert decode_small(jpeg(photo(640, 480)), target=64).size == (160, 120)
    assert decode_small(encode(photo(640, 480), "PNG"), target=32).size == (80, 60)


def test_decoded_rows_finds_fill_and_partial_mcu_row():
    arr = np.full((100, 64, 3), 7, np.uint8)
    assert decoded_rows(arr) == 100
    arr[80:] = 128
    assert decoded_rows(arr) == 80
    arr[64:80, 32:] = 128  # a partial MCU row
    assert decoded_rows(arr) == 64


# ---------------------------------------------------------------------------------------
# drop reasons
# ---------------------------------------------------------------------------------------
def test_empty_means_zero_bytes():
    res = fix_image(b"")
    assert (res.status, res.reason, res.out_bytes) == ("dropped", "empty", None)


def test_tiny_files_are_judged_by_their_content():
    one_px = encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    assert len(one_px) < 100  # under min_bytes, but a valid image
    assert fix_image(one_px).reason == "too_small"
    # a JPEG that ends inside its header
    assert fix_image(b"\xff\xd8\xff\xe0" + b"\x00" * 40).reason == "truncated"


def test_truncated_file_read_is_truncated():
    """Pillow's "Truncated File Read" (a PNG cut inside a chunk before its pixels)."""
    data = encode(photo(), "PNG", pnginfo=_text_chunk("Comment", "x" * 5000))
    cut = data[: data.index(b"tEXt") + 2000]
    with pytest.raises(OSError, match="Truncated File Read"):
        Image.open(io.BytesIO(cut)).load()
    res = fix_image(cut)
    assert (res.status, res.reason) == ("dropped", "truncated"), res.error


def _text_chunk(key: str, value: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(key, value)
    return info


@pytest.mark.parametrize(
    "data",
    [
        b"<!DOCTYPE html><html><head><title>Not Found</title></head><body>"
        + b"x" * 200
        + b"</body></html>",
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NoSuchKey</Code>"
        + b" " * 200
        + b"</Error>",
        b"Service temporarily unavailable. " * 10,
        bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
    ],
)
def test_not_image(data):
    res = fix_image(data)
    assert (res.status, res.reason) == ("dropped", "not_image")


def test_unsupported_format_tiff_and_allow_list():
    tiff = encode(photo(), "TIFF")
    res = fix_image(tiff)
    assert (res.status, res.reason, res.src_format) == ("dropped", "unsupported_format", "tiff")
    allowed = fix_image(tiff, FixSettings(allowed_formats=["jpeg", "tif"]))
    assert "tiff_to_jpeg" in allowed.actions
    assert_rgb_jpeg(allowed)


def test_unsupported_format_without_magic_number():
    tga = encode(photo(), "TGA")  # Pillow knows it, sniff cannot name it
    assert sniff(tga) is None
    res = fix_image(tga)
    assert (res.reason, res.src_format) == ("unsupported_format", "tga")


def test_allowed_formats_setting_is_validated():
    with pytest.raises(ValueError, match="unknown image format"):
        FixSettings(allowed_formats=["jpeg", "exe"])
    with pytest.raises(ValueError):
        FixSettings(max_pixels=0)


_PEAK_RSS = """
import json, struct, zlib
from tasks.fix import fix_image
{helpers}


def hwm():  # this process's own peak RSS (ru_maxrss keeps the parent's high-water mark across exec)
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1])


fix_image(bomb_png(64, 64))  # warm up: imports, Pillow plugins
before = hwm()
reasons = [fix_image(bomb_png(*size)).reason for size in ((30000, 30000), (8000, 6000))]
after = hwm()
print(json.dumps({"reasons": reasons, "grew_kib": after - before, "before_kib": before}))
"""


def test_too_large_from_header_without_allocating():
    """Measured in a fresh process (its own VmHWM): this test process's high-water mark
    is already far above what a decoded bomb would need, so ru_maxrss here could not
    move (and a child's ru_maxrss starts from the parent's)."""
    import inspect

    helpers = inspect.getsource(png_chunk) + inspect.getsource(bomb_png)
    script = _PEAK_RSS.replace("{helpers}", helpers)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reasons"] == ["too_large", "too_large"]
    assert out["before_kib"] < 1_000_000  # the fresh process is small, so growth would show
    assert out["grew_kib"] < 50_000  # a decode would add ≥ 144 MB (8000×6000 RGB)
    res = fix_image(bomb_png(8000, 6000))  # over our 40 MP, under Pillow's own limit
    assert (res.reason, res.src_width, res.src_height) == ("too_large", 8000, 6000)
    assert fix_image(jpeg(), FixSettings(max_pixels=1000)).reason == "too_large"


def test_too_small():
    res = fix_image(jpeg(photo(200, 40)))
    assert (res.status, res.reason) == ("dropped", "too_small")
    assert fix_image(jpeg(photo(200, 40)), FixSettings(min_side=32)).status == "kept"


def _grey_band_rows(out: Image.Image) -> int:
    """Trailing rows that are (nearly) the uniform grey libjpeg fills missing data with."""
    arr = np.asarray(out).astype(int)
    grey = (np.abs(arr - 128) <= 6).all(axis=2).mean(axis=1) > 0.5
    n = 0
    for row in grey[::-1]:
        if not row:
            break
        n += 1
    return n


def test_truncated_jpeg_95_percent_is_cropped_and_reencoded():
    data = jpeg(photo(320, 240, seed=3))
    cut = data[: int(len(data) * 0.95)]
    res = fix_image(cut)
    assert res.status == "kept", (res.reason, res.error)
    assert "reencode_truncated" in res.actions
    assert 0.9 <= res.decoded_fraction < 1.0
    out = assert_rgb_jpeg(res)
    assert res.width == 320 and res.height < 240
    assert res.height == round(res.decoded_fraction * 240)
    assert _grey_band_rows(out) == 0
    # the kept rows are the original's rows
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)[: res.height]
    assert np.abs(np.asarray(out).astype(int) - ref).mean() < 4
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing global was switched


def test_truncated_jpeg_30_percent_is_dropped():
    data = jpeg(photo(320, 240, seed=4))
    res = fix_image(data[: int(len(data) * 0.3)])
    assert (res.status, res.reason) == ("dropped", "truncated")
    assert 0.1 < res.decoded_fraction < 0.5
    assert res.out_bytes is None
    assert (
        fix_image(data[: int(len(data) * 0.3)], FixSettings(min_decoded_fraction=0.2)).status
        == "kept"
    )


def test_truncated_png_is_truncated():
    data = encode(photo(), "PNG")
    res = fix_image(data[: len(data) // 2])
    assert (res.status, res.reason) == ("dropped", "truncated")


# ---------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------
def test_clean_rgb_jpeg_is_kept_as_is():
    data = jpeg(photo(640, 480))
    res = fix_image(data)
    assert (res.status, res.reason, res.out_bytes, res.actions) == ("kept", None, None, [])
    assert (res.width, res.height, res.src_format, res.src_mode) == (640, 480, "jpeg", "RGB")
    assert res.decoded_fraction == 1.0
    assert res.small.size == (80, 60) and res.small.mode == "RGB"  # the draft decode
    assert res.small_rgb.shape == (60, 80, 3)
    assert res.gray32.shape == (32, 32) and res.gray9x8.shape == (8, 9)


def test_small_decode_is_bounded_for_big_photos():
    big = photo(400, 300).resize((4000, 3000))  # cheap to make, still a 12 MP JPEG
    res = fix_image(jpeg(big))
    assert res.out_bytes is None and (res.width, res.height) == (4000, 3000)
    assert res.small.size == (100, 75)  # 1/8 draft (500x375), then box-reduced by 5


def test_hash_inputs_match_imagehash_gray_for_hash():
    from carflow import imagehash

    res = fix_image(jpeg(photo(640, 480)))
    g32, g9x8 = imagehash.gray_for_hash(res.small)
    assert np.array_equal(g32, res.gray32) and np.array_equal(g9x8, res.gray9x8)


def test_progressive_jpeg_kept_unless_configured():
    data = jpeg(photo(), progressive=True)
    assert fix_image(data).out_bytes is None
    res = fix_image(data, FixSettings(keep_progressive=False))
    assert "progressive_to_baseline" in res.actions
    assert_rgb_jpeg(res)


def test_cmyk_jpeg_to_rgb():
    res = fix_image(jpeg(photo().convert("CMYK")))
    assert res.src_mode == "CMYK" and "cmyk_to_rgb" in res.actions
    out = assert_rgb_jpeg(res)
    ref = np.asarray(photo().reduce(8)).astype(int)  # block means: JPEG noise averages out
    assert np.abs(np.asarray(out.reduce(8)).astype(int) - ref).mean() < 8


def test_grey_jpeg_to_rgb():
    res = fix_image(jpeg(photo().convert("L")))
    assert res.src_mode == "L" and "l_to_rgb" in res.actions
    assert_rgb_jpeg(res)


def test_palette_png_to_rgb():
    res = fix_image(encode(photo().convert("P"), "PNG"))
    assert res.actions == ["p_to_rgb", "png_to_jpeg"]
    assert_rgb_jpeg(res)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white(mode):
    im = photo().convert(mode)
    alpha = Image.new("L", im.size, 255)
    alpha.paste(0, (0, 0, 96, 96))  # a fully transparent corner over dark pixels
    im.putalpha(alpha)
    res = fix_image(encode(im, "PNG"))
    assert "alpha_on_white" in res.actions
    out = np.asarray(assert_rgb_jpeg(res)).astype(int)
    assert (out[8:88, 8:88] >= 245).all()  # transparent → white
    assert out[150:, 150:].mean() < 230  # opaque part unchanged


def test_palette_transparency_gif_on_white():
    im = photo().convert("P")
    im.info["transparency"] = int(np.asarray(im)[0, 0])
    data = encode(im, "GIF", transparency=int(np.asarray(im)[0, 0]))
    res = fix_image(data)
    assert "alpha_on_white" in res.actions
    assert (np.asarray(assert_rgb_jpeg(res))[0, 0] >= 245).all()


def test_16_bit_grey_png_is_scaled_not_clipped():
    arr = np.tile(np.linspace(0, 65535, 256), (128, 1)).astype(np.uint16)  # dark left, bright right
    res = fix_image(encode(Image.fromarray(arr), "PNG"))
    out = np.asarray(assert_rgb_jpeg(res)).astype(int)
    assert out[:, :40].mean() < 30 and out[:, -40:].mean() > 225 and 100 < out.mean() < 155


def test_exif_orientation_6_is_applied():
    # stored 256x128: left half red, right half blue; orientation 6 = rotate 90° clockwise
    im = Image.new("RGB", (256, 128), (220, 20, 20))
    im.paste((20, 20, 220), (128, 0, 256, 128))
    exif = Image.Exif()
    exif[0x0112] = 6
    res = fix_image(jpeg(im, exif=exif.tobytes()))
    assert "exif_transpose" in res.actions
    out = np.asarray(assert_rgb_jpeg(res)).astype(int)
    assert (res.width, res.height) == (128, 256)  # upright: portrait
    top, bottom = out[:100].mean(axis=(0, 1)), out[-100:].mean(axis=(0, 1))
    assert top[0] > 180 and top[2] < 60  # red on top
    assert bottom[2] > 180 and bottom[0] < 60  # blue at the bottom
    # the small decode and hashes come from the upright image too
    assert res.small.size[0] < res.small.size[1]


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (128, 96), c) for c in ((230, 20, 20), (20, 230, 20), (20, 20, 230))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    res = fix_image(data)
    assert "first_frame" in res.actions
    out = np.asarray(assert_rgb_jpeg(res)).astype(int).mean(axis=(0, 1))
    assert out[0] > 200 and out[1] < 50


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_other_formats_become_jpeg(fmt):
    res = fix_image(encode(photo(), fmt))
    assert f"{fmt.lower()}_to_jpeg" in res.actions
    assert_rgb_jpeg(res)


def test_every_kept_output_is_an_rgb_jpeg():
    inputs = [
        jpeg(photo(640, 480)),
        jpeg(photo().convert("CMYK")),
        jpeg(photo().convert("L")),
        encode(photo().convert("RGBA"), "PNG"),
        encode(photo().convert("P"), "PNG"),
        encode(photo().convert("LA"), "PNG"),
        encode(photo(), "WEBP", lossless=True),
        jpeg(photo(), progressive=True),
    ]
    for data in inputs:
        res = fix_image(data)
        assert res.status == "kept"
        stored = res.out_bytes if res.out_bytes is not None else data
        im = Image.open(io.BytesIO(stored))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (res.width, res.height)
        assert res.small.mode == "RGB" and res.gray32.dtype == np.uint8


# ---------------------------------------------------------------------------------------
# bad input never raises
# ---------------------------------------------------------------------------------------
_SEED_JPEG = jpeg(photo(96, 80))
_SEED_PNG = encode(photo(96, 80).convert("RGBA"), "PNG")


def _pillow_reads(data: bytes) -> bool:
    """Plain Pillow decodes the first frame without an error."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
@example(b"")
@example(b"<html><body>gone</body></html>")
def test_random_bytes_never_raise(data):
    res = fix_image(data)
    assert res.status in ("kept", "dropped")
    if not data:
        assert res.reason == "empty"
    elif sniff(data) in NOT_IMAGE_FORMATS or (sniff(data) is None and not _pillow_reads(data)):
        assert res.reason == "not_image", (res.reason, res.error)
    else:
        assert res.status == "kept" or res.reason is not None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([_SEED_JPEG, _SEED_PNG]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, 10_000),
)
@example(_SEED_JPEG, [(0, 0xFF)], 10_000)  # unchanged
@example(_SEED_PNG, [(0, 0x89)], 10_000)  # unchanged
@example(_SEED_PNG, [(0, 0x89)], len(_SEED_PNG) // 2)  # cut in the pixels
@example(_SEED_JPEG, [(len(_SEED_JPEG) - 300, 0x55)], 10_000)  # a flipped byte in the scan
def test_corrupted_images_never_raise(seed, edits, cut):
    """Each reason must be the right one, not just any: a fixer that dropped every image
    as ``decode_error`` fails here."""
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    data = bytes(data[: max(cut, 20)])
    res = fix_image(data)
    row = inspect_image(data)
    assert res.status in ("kept", "dropped") and row["status"] in ("kept", "dropped")
    assert (row["status"], row["reason"]) == (res.status, res.reason)
    if res.status == "dropped":
        assert res.reason in REASONS
        assert res.out_bytes is None
        if res.reason == "decode_error":  # only what Pillow cannot read either
            assert not _pillow_reads(data), res.error
        if res.reason == "truncated":  # only what really ends early
            assert len(data) < len(seed) or not _pillow_reads(data) or seed is _SEED_JPEG, res.error
    else:
        assert res.small is not None
        assert res.out_bytes is not None or data.endswith(b"\xff\xd9")
    if data == seed:
        assert res.status == "kept"


def test_decode_error_has_a_message():
    data = bytearray(jpeg())
    sof = data.find(b"\xff\xc0")
    data[sof + 9] = 0  # zero components: the header is invalid
    res = fix_image(bytes(data))
    assert res.status == "dropped" and res.reason == "decode_error" and res.error


# ---------------------------------------------------------------------------------------
# the single pass
# ---------------------------------------------------------------------------------------
def test_inspect_image_columns_kept_and_dropped():
    row = inspect_image(jpeg(photo(640, 480)))
    assert set(row) == set(COLUMNS)
    assert row["status"] == "kept" and row["out_bytes"] is None and row["out_image_id"] is None
    for key in ("phash", "dhash"):
        assert isinstance(row[key], int) and -(2**63) <= row[key] < 2**63
    assert isinstance(row["pixel_hash"], str) and len(row["pixel_hash"]) == 64
    assert 0 <= row["dark_score"] <= 1 and row["quality_flags"] == []
    assert (row["width"], row["height"]) == (640, 480)

    png = inspect_image(encode(photo(), "PNG"))
    assert png["out_image_id"] == hashlib.sha256(png["out_bytes"]).hexdigest()

    bad = inspect_image(b"<html>" + b" " * 200)
    assert set(bad) == set(COLUMNS)
    assert (bad["status"], bad["reason"], bad["phash"], bad["dark_score"]) == (
        "dropped",
        "not_image",
        None,
        None,
    )


def test_inspect_image_quality_drop():
    black = jpeg(Image.new("RGB", (200, 150), (3, 3, 3)))
    row = inspect_image(black)
    assert row["status"] == "kept" and "dark" in row["quality_flags"]
    row = inspect_image(black, quality_cfg=QualitySettings(dark_action="drop"))
    assert (row["status"], row["reason"]) == ("dropped", "dark")
    assert row["phash"] is not None  # still hashed: dedup may want it


def test_hashes_match_for_same_pixels_different_bytes():
    im = photo(400, 300)
    a = jpeg(im)
    b = jpeg(im, comment=b"re-uploaded")  # metadata-only difference
    assert a != b
    ra, rb = inspect_image(a), inspect_image(b)
    assert (ra["phash"], ra["dhash"], ra["pixel_hash"]) == (
        rb["phash"],
        rb["dhash"],
        rb["pixel_hash"],
    )
    assert inspect_image(jpeg(photo(400, 300, seed=9)))["pixel_hash"] != ra["pixel_hash"]


def test_to_int64():
    assert to_int64(0) == 0
    assert to_int64(2**63 - 1) == 2**63 - 1
    assert to_int64(2**63) == -(2**63)
    assert to_int64(2**64 - 1) == -1


@pytest.mark.parametrize("workers", [1, 2])
def test_inspect_shard_order_ids_and_put_image(workers):
    datas = [jpeg(photo(160, 120, seed=i)) for i in range(6)] + [b"", encode(photo(), "PNG")]
    ids = [hashlib.sha256(d).hexdigest() for d in datas]
    stored: dict[str, bytes] = {}

    def put(b: bytes) -> str:
        key = hashlib.sha256(b).hexdigest()
        stored[key] = b
        return key

    rows = inspect_shard(
        ((i, d) for i, d in zip(ids, datas, strict=True)), workers=workers, put_image=put
    )
    assert [r["image_id"] for r in rows] == ids
    assert list(rows[0])[0] == "image_id"
    assert rows[6]["reason"] == "empty"
    assert rows[7]["out_bytes"] is None and rows[7]["out_image_id"] in stored
    stats = shard_stats(rows)
    assert (
        stats["images"] == 8
        and stats["reasons"] == {"empty": 1}
        and stats["actions"]["png_to_jpeg"] == 1
    )


def test_inspect_schema_types_an_all_broken_shard():
    import pyarrow as pa

    rows = inspect_shard([("a", b""), ("b", b"<html>" + b" " * 200)])
    table = pa.Table.from_pylist(rows, schema=inspect_schema())
    assert table.schema.field("fix_actions").type == pa.list_(pa.string())
    assert table.schema.field("phash").type == pa.int64()
    good = inspect_shard([("c", jpeg()), ("d", encode(photo(), "PNG"))])
    for r in good:
        r.pop("out_bytes")
    assert pa.Table.from_pylist(good, schema=inspect_schema(with_out_bytes=False)).num_rows == 2


def test_inspect_shard_threads_give_the_same_rows():
    datas = [jpeg(photo(160, 120, seed=i)) for i in range(5)] + [
        encode(photo(), "PNG"),
        b"junk" * 50,
    ]
    items = [(str(i), d) for i, d in enumerate(datas)]
    assert inspect_shard(items, workers=1) == inspect_shard(items, workers=3)


def test_inspect_shard_accepts_other_settings_objects():
    rows = inspect_shard([("x", jpeg())], {"min_side": 500}, QualitySettings().model_dump())
    assert rows[0]["reason"] == "too_small"
    with pytest.raises(ValueError):
        inspect_shard([("x", jpeg())], {"no_such_setting": 1})


# ---------------------------------------------------------------------------------------
# odd files from the wild
# ---------------------------------------------------------------------------------------
def test_truncated_jpeg_with_eoi_appended_is_cropped():
    """A file cut short whose uploader appended FF D9 decodes without an error; the grey
    fill is what gives it away."""
    data = jpeg(photo(320, 240, seed=5))
    cut = data[: int(len(data) * 0.95)] + b"\xff\xd9"
    assert has_jpeg_eoi(cut) and _pillow_reads(cut)
    res = fix_image(cut)
    assert "reencode_truncated" in res.actions
    assert 0.85 <= res.decoded_fraction < 1.0
    out = assert_rgb_jpeg(res)
    assert res.height == round(res.decoded_fraction * 240) and _grey_band_rows(out) == 0
    half = fix_image(data[: len(data) // 2] + b"\xff\xd9")  # 54% grey fill: not kept whole
    assert (half.reason, half.status) == ("truncated", "dropped")
    assert 0.3 < half.decoded_fraction < 0.7


def test_grey_fill_check_leaves_real_grey_alone():
    """An image whose bottom is mid-grey but not libjpeg's exact fill is kept as is."""
    im = photo(320, 240, seed=6)
    arr = np.asarray(im).copy()
    arr[200:] = 128
    arr[200:, ::7] = 131  # a real grey band still has detail
    res = fix_image(jpeg(Image.fromarray(arr)))
    assert (res.status, res.out_bytes, res.decoded_fraction) == ("kept", None, 1.0)


def test_image_decoded_rows_matches_decoded_rows():
    arr = np.full((300, 64, 3), 9, np.uint8)
    arr[250:] = 128
    arr[240:250, 40:] = 128
    im = Image.fromarray(arr)
    assert image_decoded_rows(im, band_pixels=64 * 16) == decoded_rows(arr) == 240
    assert image_decoded_rows(Image.fromarray(np.full((40, 64, 3), 128, np.uint8))) == 0
    assert image_decoded_rows(photo()) == 240


def test_progressive_jpeg_cut_short_records_what_is_known():
    data = jpeg(photo(320, 240, seed=7), progressive=True)
    total = jpeg_scans(data)
    assert total >= 6
    # cut after the 4th scan starts: every row has its DC scan, details are missing
    sos = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    cut = data[: sos[3] + 40]
    res = fix_image(cut)
    assert res.status == "kept" and "reencode_truncated" in res.actions
    assert res.decoded_fraction is None  # not 1.0: how much is missing is not known
    assert res.jpeg_scans == 4
    row = inspect_image(cut)
    assert row["decoded_fraction"] is None and row["jpeg_scans"] == 4
    assert fix_image(data).jpeg_scans is None  # a whole file: nothing to record


def test_jpeg_scans_skips_the_exif_thumbnail():
    thumb = jpeg(photo(32, 24))
    payload = b"Exif\x00\x00" + thumb
    data = jpeg()
    with_app1 = data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    assert jpeg_scans(with_app1) == 1
    assert jpeg_scans(jpeg(progressive=True)) >= 6


def test_rgb_colour_key_transparency_on_white():
    arr = np.asarray(photo()).copy()
    arr[:96, :96] = (0, 255, 0)  # the colour key: bright green
    data = encode(Image.fromarray(arr), "PNG", transparency=(0, 255, 0))
    assert Image.open(io.BytesIO(data)).mode == "RGB"
    res = fix_image(data)
    assert "alpha_on_white" in res.actions
    out = np.asarray(assert_rgb_jpeg(res)).astype(int)
    assert (out[8:88, 8:88] >= 245).all()  # white, not green
    assert out[150:, 150:].mean() < 230


def test_16_bit_grey_colour_key_on_white():
    arr = np.tile(np.linspace(0, 40000, 256), (128, 1)).astype(np.uint16)
    arr[:, :64] = 0  # black, and transparent through the tRNS key
    data = encode(Image.fromarray(arr), "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    res = fix_image(data)
    assert "alpha_on_white" in res.actions
    out = np.asarray(assert_rgb_jpeg(res)).astype(int)
    assert (out[:, 4:56] >= 245).all()  # white, not black
    assert 70 < out[:, 128:192].mean() < 125  # the rest scaled as before (20k–30k → 78–117)


def test_16_bit_grey_conversion_makes_no_float_copies():
    """numpy reports its allocations to tracemalloc: converting a 2 Mpx 16-bit PNG must
    not allocate float64 copies of it (16 MB each); the 8-bit output is 2 MB."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65535, (1000, 2000), dtype=np.uint16)
    im = Image.open(io.BytesIO(encode(Image.fromarray(arr), "PNG")))
    im.load()
    from carflow.fixer import _to_rgb

    tracemalloc.start()
    try:
        out = _to_rgb(im, [])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, f"{peak / 2**20:.1f} MiB traced"
    want = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(out)[:, :, 0], want)  # same values as the float formula


def test_mpo_becomes_a_plain_jpeg():
    left = photo(320, 240, seed=8)
    right = left.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # the other eye, say
    buf = io.BytesIO()
    left.save(buf, "MPO", save_all=True, append_images=[right])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    res = fix_image(data)
    assert "mpo_to_jpeg" in res.actions
    out = assert_rgb_jpeg(res)
    stored = Image.open(io.BytesIO(res.out_bytes))
    assert stored.format == "JPEG" and getattr(stored, "n_frames", 1) == 1
    assert data.count(b"\xff\xd8") == 2 and res.out_bytes.count(b"\xff\xd8") == 1  # one image
    got = np.asarray(out.reduce(8)).astype(int)  # block means: JPEG noise averages out
    to_left = np.abs(got - np.asarray(left.reduce(8)).astype(int)).mean()
    to_right = np.abs(got - np.asarray(right.reduce(8)).astype(int)).mean()
    assert to_left < 6 < to_right  # the first image


def test_decode_budget_bounds_concurrent_decodes():
    """Four threads over 1 Mpx PNGs with a budget of about two images: never more is
    held, everything still completes (an image over the whole budget runs alone)."""
    datas = [encode(photo(1000, 1000, seed=i), "PNG") for i in range(6)]
    per_image = 1000 * 1000 * 8  # decode_cost of an RGB PNG: source + RGB output
    budget = DecodeBudget(2 * per_image + 1)
    seen = []
    orig_hold = budget.hold

    def spy(cost):
        seen.append(threading.current_thread().name)
        return orig_hold(cost)

    budget.hold = spy
    rows = inspect_shard([(str(i), d) for i, d in enumerate(datas)], workers=4, budget=budget)
    assert [r["status"] for r in rows] == ["kept"] * 6
    assert len(set(seen)) > 1  # the threads really ran concurrently through the budget
    assert per_image <= budget.peak <= budget.limit
    assert budget.held == 0
    small = DecodeBudget(per_image // 2)  # smaller than one image: each runs alone
    assert [r["status"] for r in inspect_shard([("a", datas[0]), ("b", datas[1])], workers=2, budget=small)] == [
        "kept",
        "kept",
    ]
    assert small.peak == small.limit
