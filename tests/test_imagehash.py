"""carflow.imagehash: pHash/dHash (agreement with the imagehash package), pixel hash,
int64/uint64 views, popcount, and the exact Hamming pair search against brute force."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter, PngImagePlugin

from carflow.imagehash import (
    SearchPlan,
    _split,
    brute_force_pairs,
    dhash64,
    gray_for_hash,
    hamming,
    hamming_pairs,
    phash64,
    phash_dct,
    pixel_sha256,
    plan_search,
    popcount64,
    to_int64,
    to_uint64,
)
from tasks.dedup import DedupSettings

RADIUS = DedupSettings().hamming_radius


# ---------------------------------------------------------------------------------------
# generated photos
# ---------------------------------------------------------------------------------------
def photo(seed: int, w: int = 480, h: int = 360) -> Image.Image:
    """A varied generated photo: a two-colour gradient, 4-9 random shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:h, 0:w]
    t = (np.cos(angle) * x / w + np.sin(angle) * y / h + 1) / 3
    arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(4, 10)):
        x0, y0 = rng.integers(-w // 4, w, 1)[0], rng.integers(-h // 4, h, 1)[0]
        x1, y1 = x0 + rng.integers(w // 10, w // 2), y0 + rng.integers(h // 10, h // 2)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            d.rectangle([x0, y0, x1, y1], fill=fill)
        elif kind == 1:
            d.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def jpeg(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def hashes_of(im: Image.Image) -> tuple[int, int]:
    g32, g9 = gray_for_hash(im)
    return phash64(g32), dhash64(g9)


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [photo(s) for s in range(16)]


# ---------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------
def test_gray_for_hash_shapes_and_dtype(photos):
    g32, g9 = gray_for_hash(photos[0])
    assert g32.shape == (32, 32) and g9.shape == (8, 9)
    assert g32.dtype == np.uint8 and g9.dtype == np.uint8
    # an 'L' image gives the same arrays as its RGB source converted
    g32l, g9l = gray_for_hash(photos[0].convert("L"))
    assert np.array_equal(g32, g32l) and np.array_equal(g9, g9l)


def test_hashes_are_64_bit_ints_and_deterministic(photos):
    p, d = hashes_of(photos[1])
    assert isinstance(p, int) and isinstance(d, int)
    assert 0 <= p < 2**64 and 0 <= d < 2**64
    assert hashes_of(photos[1]) == (p, d)
    assert hashes_of(photos[1].copy()) == (p, d)  # identical image, identical hash


def test_phash_has_32_bits_set_so_distances_are_even(photos):
    """Bit = coefficient > median of 64 distinct values: exactly 32 ones, so the distance
    between two pHashes is always even (radius 8 and 9 behave the same)."""
    for im in photos[:8]:
        assert hashes_of(im)[0].bit_count() == 32


def test_phash_input_validation():
    with pytest.raises(ValueError, match="32x32"):
        phash64(np.zeros((16, 16)))
    with pytest.raises(ValueError, match="8x9"):
        dhash64(np.zeros((9, 8)))


def test_flat_image_hash_is_stable():
    """Exact zeros in the DCT compare as 0, not as float noise: a flat image has only
    the DC bit set, on every machine."""
    assert phash64(np.full((32, 32), 120, np.uint8)) == 1 << 63
    assert phash64(np.zeros((32, 32), np.uint8)) == 0
    assert dhash64(np.full((8, 9), 7, np.uint8)) == 0


def test_dct_matches_scipy_fftpack():
    fftpack = pytest.importorskip("scipy.fftpack")
    g = np.random.default_rng(0).integers(0, 256, (32, 32)).astype(np.float64)
    want = fftpack.dct(fftpack.dct(g, axis=0), axis=1)[:8, :8]
    assert np.allclose(phash_dct(g), want, rtol=1e-10, atol=1e-8)


def test_agrees_with_imagehash_package(photos):
    imagehash = pytest.importorskip("imagehash")
    extra = [photos[0].resize((97, 61)), photos[3].convert("L"), decode(jpeg(photos[5], 40))]
    images = [*photos, *extra]
    for k, im in enumerate(images):
        p, d = hashes_of(im)
        assert p == int(str(imagehash.phash(im)), 16)
        assert d == int(str(imagehash.dhash(im)), 16)
        other = images[(k + 1) % len(images)]  # a different image: a distance that is not 0
        want = imagehash.phash(im) - imagehash.phash(other)
        assert hamming(p, hashes_of(other)[0]) == want
        assert want > 0 or np.array_equal(np.asarray(im), np.asarray(other))


def test_reencoded_and_resized_copy_is_within_radius(photos):
    for im in photos:
        p, d = hashes_of(decode(jpeg(im, 92)))
        w, h = im.size
        variants = [
            decode(jpeg(im, 60)),  # another JPEG quality
            decode(jpeg(im.resize((int(w * 0.9), int(h * 0.9)), Image.Resampling.LANCZOS), 75)),  # 90%, re-encoded
            decode(jpeg(im.resize((w // 2, h // 2), Image.Resampling.LANCZOS), 85)),
        ]
        for v in variants:
            vp, _ = hashes_of(v)
            assert hamming(p, vp) <= RADIUS


def test_different_images_are_beyond_radius(photos):
    ph = [hashes_of(decode(jpeg(im)))[0] for im in photos]
    dists = [hamming(a, b) for a, b in itertools.combinations(ph, 2)]
    assert min(dists) > RADIUS
    assert 24 <= np.median(dists) <= 40  # about half the bits differ


def test_pixel_sha256_ignores_metadata_but_not_pixels_or_size(photos):
    im = photos[2]
    plain, tagged = io.BytesIO(), io.BytesIO()
    im.save(plain, "PNG")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-uploaded by dealer")
    im.save(tagged, "PNG", pnginfo=info)
    assert plain.getvalue() != tagged.getvalue()
    assert pixel_sha256(decode(plain.getvalue())) == pixel_sha256(decode(tagged.getvalue())) == pixel_sha256(im)
    assert pixel_sha256(im) != pixel_sha256(photos[3])
    # same bytes, other shape
    a = Image.frombytes("RGB", (2, 3), bytes(range(18)))
    b = Image.frombytes("RGB", (3, 2), bytes(range(18)))
    assert pixel_sha256(a) != pixel_sha256(b)
    # an 'L' image hashes as its RGB conversion
    assert pixel_sha256(im.convert("L")) == pixel_sha256(im.convert("L").convert("RGB"))
    assert len(pixel_sha256(im)) == 64


# ---------------------------------------------------------------------------------------
# int64 / uint64 / popcount
# ---------------------------------------------------------------------------------------
@given(st.integers(0, 2**64 - 1))
def test_int64_roundtrip_scalar(u):
    s = to_int64(u)
    assert -(2**63) <= s < 2**63 and to_uint64(s) == u
    assert (s < 0) == (u >= 2**63)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=50), st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_popcount_and_int64_views_arrays(xs, ys):
    a = np.array(xs, dtype=np.uint64)
    s = to_int64(a)
    assert s.dtype == np.int64 and np.array_equal(to_uint64(s), a)
    assert popcount64(a).tolist() == [x.bit_count() for x in xs]
    assert popcount64(s).tolist() == [x.bit_count() for x in xs]  # signed view: same bits
    n = min(len(xs), len(ys))
    b = np.array(ys[:n], dtype=np.uint64)
    assert hamming(a[:n], to_int64(b)).tolist() == [(x ^ y).bit_count() for x, y in zip(xs, ys, strict=False)]


# ---------------------------------------------------------------------------------------
# exact pair search
# ---------------------------------------------------------------------------------------
def _pairs(i, j) -> set[tuple[int, int]]:
    return set(zip(i.tolist(), j.tolist(), strict=True))


def planted(seed: int, n: int, radius: int, frac: float = 0.3, centres: int = 0) -> np.ndarray:
    """n hashes: random ones, copies with ≤ radius+2 bits flipped (pairs around the
    border), and optionally tight clusters around a few centres."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    k = int(n * frac)
    for idx in range(k):
        src = base[rng.integers(0, n)]
        flips = rng.choice(64, size=rng.integers(0, radius + 3), replace=False)
        base[idx] = src ^ np.uint64(sum(1 << int(b) for b in flips))
    for c in range(centres):
        centre = base[c]
        for idx in range(k + c * 20, min(n, k + (c + 1) * 20)):
            flips = rng.choice(64, size=rng.integers(0, 4), replace=False)
            base[idx] = centre ^ np.uint64(sum(1 << int(b) for b in flips))
    return rng.permutation(base)


@pytest.mark.parametrize("radius", [0, 1, 3, 5, 8, 10, 13])
def test_hamming_pairs_equals_brute_force(radius):
    h = planted(radius, 3000, radius, centres=5)
    got = hamming_pairs(h, radius)
    want = brute_force_pairs(h, radius)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[0].size > 0
    assert (got[0] < got[1]).all()


@pytest.mark.parametrize("m", [3, 4, 6, 9])
def test_every_substring_split_is_exact(m):
    """Forced plans: classic MIH (m = r+1, exact substrings) and GPH splits with radius
    > 0 per substring, one with an unprobed substring (t = -1)."""
    radius = 8
    total = radius - m + 1
    radii = [total // m] * (m - total % m) + [total // m + 1] * (total % m)
    bits = _split(m)
    shifts = tuple(int(s) for s in np.cumsum([0, *bits[:-1]]))
    plan = SearchPlan(radius, shifts, tuple(bits), tuple(radii))
    h = planted(m, 1500, radius, centres=3)
    assert _pairs(*hamming_pairs(h, radius, plan=plan)) == _pairs(*brute_force_pairs(h, radius))
    unprobed = SearchPlan(3, (0, 21, 42), (21, 21, 22), (-1, 1, 1))  # Σt = 3 - 3 + 1
    assert _pairs(*hamming_pairs(h, 3, plan=unprobed)) == _pairs(*brute_force_pairs(h, 3))
    rng = np.random.default_rng(m)
    shuffled = SearchPlan(radius, shifts, tuple(bits), tuple(radii), perm=tuple(rng.permutation(64).tolist()))
    assert _pairs(*hamming_pairs(h, radius, plan=shuffled)) == _pairs(*brute_force_pairs(h, radius))
    with pytest.raises(ValueError, match="not exact"):
        hamming_pairs(h, 3, plan=SearchPlan(3, (0, 21, 42), (21, 21, 22), (-1, 0, 1)))


def test_tiny_chunks_and_big_buckets():
    """A tight ball of 300 hashes (everything shares substrings) searched with chunks
    of 7 pairs: chunk boundaries inside one bucket pair."""
    rng = np.random.default_rng(5)
    centre = np.uint64(0x0123456789ABCDEF)
    flips = [rng.choice(64, size=rng.integers(0, 5), replace=False) for _ in range(300)]
    h = np.array([centre ^ np.uint64(sum(1 << int(b) for b in f)) for f in flips], dtype=np.uint64)
    h = np.concatenate([h, rng.integers(0, 2**63, size=200, dtype=np.uint64)])
    want = brute_force_pairs(h, 6)
    got = hamming_pairs(h, 6, chunk=7)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_duplicates_pair_at_distance_zero():
    h = np.array([5, 5, 5, 2**63 + 5], dtype=np.uint64)
    assert _pairs(*hamming_pairs(h, 0)) == {(0, 1), (0, 2), (1, 2)}
    assert _pairs(*hamming_pairs(to_int64(h), 1)) == {(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)}


def test_small_inputs():
    assert hamming_pairs(np.array([], dtype=np.int64), 8)[0].size == 0
    assert hamming_pairs(np.array([7], dtype=np.int64), 8)[0].size == 0
    with pytest.raises(ValueError):
        plan_search(10, -1)


def test_plan_for_a_million_hashes_at_radius_8():
    """The documented design point: 3 substrings of 21/21/22 bits, radius 2 each (GPH),
    not the classic 9 substrings of ~7 bits (buckets of ~7,800)."""
    plan = plan_search(1_000_000, 8)
    assert plan.bits == (22, 21, 21) and plan.radii == (2, 2, 2)
    assert plan.perm == tuple(k for i in range(3) for k in range(i, 64, 3))
    assert plan.est_candidates < 2e8
    assert plan_search(1_000_000, 8).est_cost < plan_search(1_000_000, 10).est_cost


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8),
    flips=st.lists(st.tuples(st.integers(0, 7), st.sets(st.integers(0, 63), max_size=12)), max_size=40),
    noise=st.lists(st.integers(0, 2**64 - 1), max_size=20),
    radius=st.integers(0, 12),
)
def test_property_search_equals_brute_force(seeds, flips, noise, radius):
    """Random sets with planted near pairs: a few seeds, copies of them with up to 12
    bits flipped, plus unrelated hashes."""
    vals = list(seeds) + [seeds[s % len(seeds)] ^ sum(1 << b for b in bits) for s, bits in flips] + list(noise)
    h = np.array(vals, dtype=np.uint64)
    got = hamming_pairs(to_int64(h), radius)
    want = brute_force_pairs(h, radius)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
