"""Fixer: every drop reason from a purpose-built input, every conversion, one decode.

All inputs are generated here; nothing touches the network or the disk outside tmp."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import resource
import struct
import sys
import time
import types
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from carflow.imageio import (
    ImageTooLarge,
    decode_small,
    decoded_rows,
    has_jpeg_eoi,
    open_checked,
    sniff,
)
from tasks.fix import (
    COLUMNS,
    REASONS,
    FixSettings,
    fix_image,
    inspect_image,
    inspect_schema,
    inspect_shard,
    shard_stats,
    to_int64,
)
from tasks.quality import QualitySettings


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _fallback_imagehash() -> types.ModuleType:
    """Stand-in for carflow/imagehash.py (same names) when that module is not there."""
    mod = types.ModuleType("carflow.imagehash")

    def _bits(a: np.ndarray) -> int:
        return int("".join("1" if b else "0" for b in a.ravel()), 2)

    mod.phash64 = lambda g: _bits(
        np.asarray(g, float)[:8, :8] > np.median(np.asarray(g, float)[:8, :8])
    )
    mod.dhash64 = lambda g: _bits(np.diff(np.asarray(g, int), axis=1) > 0)
    mod.pixel_sha256 = lambda img: hashlib.sha256(img.tobytes()).hexdigest()
    return mod


@pytest.fixture(autouse=True)
def _imagehash(monkeypatch):
    if importlib.util.find_spec("carflow.imagehash") is None:
        monkeypatch.setitem(sys.modules, "carflow.imagehash", _fallback_imagehash())


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
@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0" + b"\x00" * 40])
def test_empty(data):
    res = fix_image(data)
    assert (res.status, res.reason, res.out_bytes) == ("dropped", "empty", None)


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


def test_too_large_from_header_without_allocating():
    data = bomb_png(30000, 30000)  # 2.7 GB of RGB if it were ever allocated
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = fix_image(data)
    assert time.perf_counter() - t0 < 0.5
    assert (res.status, res.reason) == ("dropped", "too_large")
    res = fix_image(bomb_png(8000, 6000))  # over our 40 MP, under Pillow's own limit
    assert (res.reason, res.src_width, res.src_height) == ("too_large", 8000, 6000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB
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

    if not hasattr(imagehash, "gray_for_hash"):
        pytest.skip("carflow.imagehash has no gray_for_hash")
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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(data):
    res = fix_image(data)
    assert res.status in ("kept", "dropped")
    assert res.status == "kept" or res.reason is not None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([_SEED_JPEG, _SEED_PNG]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, 10_000),
)
def test_corrupted_images_never_raise(seed, edits, cut):
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    data = bytes(data[: max(cut, 20)])
    res = fix_image(data)
    row = inspect_image(data)
    assert res.status in ("kept", "dropped") and row["status"] in ("kept", "dropped")
    if res.status == "dropped":
        assert res.reason in REASONS
        assert res.out_bytes is None
    else:
        assert res.small is not None


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
