"""Perceptual and pixel hashes, and an exact Hamming-radius pair search over them.

Hashes (numpy only; the definitions follow the ``imagehash`` package, 4.3.x):

- :func:`phash64`: ``imagehash.phash`` (hash_size 8, highfreq_factor 4). A 32×32 grey
  image, a 2-D DCT-II along axis 0 then axis 1 (scipy's ``fftpack.dct`` with its default
  ``norm=None``: ``y[k] = 2 Σ x[n] cos(πk(2n+1)/2N)``, *not* orthonormal; a uniform scale
  would not matter, but the orthonormal DC weight would change the median), the top-left
  8×8 block *including* the DC term, bit = coefficient > median of that block. Here the
  DCT is a matrix product with a precomputed cosine matrix. The coefficients are rounded
  to 6 decimals before the comparison so that coefficients that are exactly zero in
  exact arithmetic (symmetric or flat images: banners!) compare as 0 on every machine
  instead of as ±1e-13 noise. On such tie-heavy inputs imagehash's own bits are noise;
  everywhere else the bits are identical (``tests/test_imagehash.py`` checks this).
- :func:`dhash64`: ``imagehash.dhash``: 8 rows × 9 columns grey, bit = right > left.
- Bit order as imagehash's hex string: the first (top-left) element is the most
  significant bit, so ``phash64(g) == int(str(imagehash.phash(img)), 16)``.
- :func:`gray_for_hash`: ``convert('L')`` then a Lanczos resize, as imagehash does.
- :func:`pixel_sha256`: sha256 of ``"<w>x<h>:RGB:"`` + the RGB pixel bytes: equal for
  files with equal pixels and different bytes (metadata, container).

Hashes are Python ints in ``[0, 2**64)``. Manifests store them as **int64** (the same 64
bits viewed as signed; :func:`to_int64` / :func:`to_uint64`). XOR and popcount do not
care which view is used.

Pair search (:func:`hamming_pairs`): all pairs within Hamming distance ``radius``,
exactly, without an N×N matrix. It is multi-index hashing (Norouzi et al., *Fast Exact
Search in Hamming Space with Multi-Index Hashing*) with the general pigeonhole principle
(Qin et al., *GPH*, 2018): cut the 64 bits into ``m`` substrings and give substring ``i``
a radius ``t_i`` with ``Σ t_i = radius − m + 1``; if ``d(x, y) ≤ radius`` then
``d_i(x, y) ≤ t_i`` for at least one ``i`` (otherwise ``Σ d_i ≥ Σ (t_i + 1) > radius``).
``t_i = −1`` means substring ``i`` is not probed.

Why not the classic ``m = radius + 1`` exact substrings: for radius 8 that is 9
substrings of ~7 bits, so 1M random hashes fill each of 128 buckets with ~7,800 and
give ~3.5e10 candidate pairs. The cost of a split is roughly
``Σ_i [ n/2 · (V_i − 1) probes + n²/2 · V_i / 2^b_i candidates ]`` with
``V_i = Σ_{k≤t_i} C(b_i, k)``; candidates are cheapest when ``b_i ≈ log2 n``. For 1M
hashes and radius 8 :func:`plan_search` picks 3 substrings of 22/21/21 bits with radius
2 each: 718 masks, ~1.4e8 candidates (measured ~4.5 s on the idle 2-core box; radius 10:
~20-40 s; radius 12: ~120 s). Substrings are at most 24 bits (direct-address tables of
2^b counts), so m ≥ 3; for much larger n the candidate count grows as n².

The hash bits are first interleaved (substring ``i`` = bits ``i, i+m, …``): pHash bits
are biased and correlated (the DC bit is always 1, neighbouring low frequencies move
together), and contiguous substrings of real pHashes collide far more often than random
ones. On pHashes of 3,000 generated car photos, interleaving halved the substring
collision rate (0.52% → 0.25% of pairs, vs 0.028% for random hashes): at 1M such
hashes that is ~1.3e9 candidates, ~30 s, instead of ~2.6e9.

Each substring is a direct-address table (bucket counts + CSR offsets of the items
sorted by substring). Mask 0 pairs the items inside each bucket; for every non-zero
flip mask of ≤ ``t_i`` bits, each item with key ``k`` is paired with bucket
``k ^ mask`` (only when ``k < k ^ mask``, so each pair once); the candidate pairs are
expanded in bounded chunks (``chunk``) and verified with a vectorised popcount. A pair
is reported only by the first substring whose test it passes, so there is no
de-duplication pass. Everything is numpy sort/bincount/repeat; Python loops run over
masks (hundreds), never over hashes. Threads do not help (numpy's fancy indexing,
repeat and nonzero hold the GIL).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

HASH_BITS = 64
PHASH_SIZE = 8
PHASH_HIGHFREQ = 4
PHASH_IMG = PHASH_SIZE * PHASH_HIGHFREQ  # 32
#: the resize filter imagehash calls ANTIALIAS
RESAMPLE = Image.Resampling.LANCZOS

_U64_MASK = (1 << 64) - 1


# ---------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _dct_matrix(n: int, k: int) -> np.ndarray:
    """Rows 0..k-1 of scipy.fftpack's unnormalised DCT-II matrix of size n:
    ``C[k, j] = 2 cos(π k (2j + 1) / 2n)``."""
    kk = np.arange(k, dtype=np.float64)[:, None]
    jj = np.arange(n, dtype=np.float64)[None, :]
    c = 2.0 * np.cos(np.pi * kk * (2.0 * jj + 1.0) / (2.0 * n))
    c.setflags(write=False)
    return c


def bits_to_int(bits: np.ndarray) -> int:
    """A boolean array (row-major, first element = most significant bit) as an int."""
    flat = np.asarray(bits, dtype=bool).ravel()
    if flat.size != HASH_BITS:
        raise ValueError(f"expected {HASH_BITS} bits, got {flat.size}")
    return int.from_bytes(np.packbits(flat).tobytes(), "big")


def phash_dct(gray: np.ndarray) -> np.ndarray:
    """The 8×8 low-frequency block of the 2-D DCT of a 32×32 grey image (scipy scaling)."""
    g = np.asarray(gray, dtype=np.float64)
    if g.shape != (PHASH_IMG, PHASH_IMG):
        raise ValueError(f"phash64 needs a {PHASH_IMG}x{PHASH_IMG} grey array, got shape {g.shape}")
    c = _dct_matrix(PHASH_IMG, PHASH_SIZE)
    return c @ g @ c.T


def phash64(gray: np.ndarray) -> int:
    """imagehash's pHash of a 32×32 grey array (``gray_for_hash(img)[0]``) as an int."""
    low = np.round(phash_dct(gray), 6)
    return bits_to_int(low > np.median(low))


def dhash64(gray: np.ndarray) -> int:
    """imagehash's dHash of an 8-row × 9-column grey array (``gray_for_hash(img)[1]``)."""
    g = np.asarray(gray)
    if g.shape != (PHASH_SIZE, PHASH_SIZE + 1):
        raise ValueError(f"dhash64 needs an 8x9 (rows x columns) grey array, got shape {g.shape}")
    return bits_to_int(g[:, 1:] > g[:, :-1])


def gray_for_hash(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(32×32, 8×9)`` uint8 grey arrays, the inputs of :func:`phash64` and :func:`dhash64`,
    made as imagehash makes them: ``convert('L')`` first, then a Lanczos resize. Pass the
    already small (draft-mode) decode; resizing a full-size photo costs more than hashing."""
    grey = img if img.mode == "L" else img.convert("L")
    g32 = np.asarray(grey.resize((PHASH_IMG, PHASH_IMG), RESAMPLE))
    g9x8 = np.asarray(grey.resize((PHASH_SIZE + 1, PHASH_SIZE), RESAMPLE))
    return g32, g9x8


#: side of the colour thumbnail that confirms near-duplicate pairs (8×8 RGB = 192 bytes)
THUMB_SIDE = 8


def colour_thumb(img: Image.Image) -> bytes:
    """An 8×8 RGB box-filtered thumbnail of ``img`` (pass the small decode), as 192
    bytes: the colour and coarse layout that pHash/dHash, computed on grey, do not see."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return rgb.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX).tobytes()


def thumb_distance(a: np.ndarray, b: np.ndarray, q: float = 95.0) -> np.ndarray:
    """Distance between colour thumbnails, row by row: ``a`` and ``b`` are ``(n, 192)``
    uint8 arrays (:func:`colour_thumb`). Each thumbnail's per-channel mean is removed
    (a global brightness change is not a difference), then per cell the largest channel
    difference is taken, and the distance is its ``q``-th percentile over the 64 cells:
    a different car (another colour or shape over a tenth of the frame) is far even on
    the same white studio background (≥ 18.6 on the demo's studio pairs that the hashes
    merge), while re-encodes, resizes and +10 % brightness stay ≤ 13.1
    (``bench/near_dup.py --tune``). The 95th percentile (the 4th largest of 64 cells)
    still sees a car that fills a tenth of the frame."""
    x = np.asarray(a, np.float32).reshape(-1, THUMB_SIDE * THUMB_SIDE, 3)
    y = np.asarray(b, np.float32).reshape(-1, THUMB_SIDE * THUMB_SIDE, 3)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    cell = np.abs(x - y).max(axis=2)
    return np.percentile(cell, q, axis=1)


def phash_image(img: Image.Image) -> int:
    return phash64(gray_for_hash(img)[0])


def dhash_image(img: Image.Image) -> int:
    return dhash64(gray_for_hash(img)[1])


def pixel_sha256(img: Image.Image) -> str:
    """sha256 hex of the image's RGB pixels and size (metadata and container ignored)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:RGB:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# int64 <-> uint64, popcount
# ---------------------------------------------------------------------------------------
def to_int64(u64):
    """Unsigned 64-bit hash(es) → the same bits as int64. Scalars give a Python int,
    arrays an int64 array (a view where the input already is uint64)."""
    if isinstance(u64, (int, np.integer)):
        v = int(u64) & _U64_MASK
        return v - (1 << 64) if v >> 63 else v
    a = np.asarray(u64)
    if a.dtype == np.int64:
        return a
    if a.dtype != np.uint64:
        a = a.astype(np.uint64)
    return a.view(np.int64)


def to_uint64(i64):
    """int64 (signed view) hash(es) → unsigned. Scalars give a Python int, arrays uint64."""
    if isinstance(i64, (int, np.integer)):
        return int(i64) & _U64_MASK
    a = np.asarray(i64)
    if a.dtype == np.uint64:
        return a
    if a.dtype != np.int64:
        a = a.astype(np.int64)
    return a.view(np.uint64)


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each 64-bit element (uint8 array)."""
    a = np.ascontiguousarray(to_uint64(np.asarray(x)))
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(a)
    return _POP8[a.view(np.uint8)].reshape(*a.shape, 8).sum(axis=-1, dtype=np.uint8)  # pragma: no cover


def hamming(a, b) -> np.ndarray | int:
    """Hamming distance(s) between hashes (ints or arrays, signed or unsigned)."""
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return ((int(a) ^ int(b)) & _U64_MASK).bit_count()
    return popcount64(to_uint64(np.asarray(a)) ^ to_uint64(np.asarray(b)))


# ---------------------------------------------------------------------------------------
# exact pair search within a Hamming radius
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchPlan:
    """Substrings ``(shift, bits)`` of the (bit-permuted) 64-bit hash and their radii.

    ``perm``: bit ``p`` of the permuted hash is bit ``perm[p]`` of the hash (None: no
    permutation). Hamming distances do not change under a bit permutation; the default
    interleaves the bits (substring ``i`` of ``m`` holds bits ``i, i+m, i+2m, …``), which
    spreads pHash's correlated low-frequency bits over all substrings."""

    radius: int
    shifts: tuple[int, ...]
    bits: tuple[int, ...]
    radii: tuple[int, ...]
    est_candidates: float = 0.0
    est_cost: float = 0.0
    perm: tuple[int, ...] | None = None

    @property
    def masks_per_substring(self) -> tuple[int, ...]:
        return tuple(_ball(b, t) for b, t in zip(self.bits, self.radii, strict=True))


def _ball(bits: int, t: int) -> int:
    """Number of bit strings within distance t of a ``bits``-bit string."""
    return sum(math.comb(bits, k) for k in range(t + 1)) if t >= 0 else 0


def _split(m: int) -> list[int]:
    """Substring widths: as equal as possible, the wider ones first."""
    base, extra = divmod(HASH_BITS, m)
    return [base + 1] * extra + [base] * (m - extra)


def interleave_perm(m: int) -> tuple[int, ...]:
    """Bit order that makes substring ``i`` (of the :func:`_split` widths) hold the hash
    bits ``i, i+m, i+2m, …``."""
    return tuple(k for i in range(m) for k in range(i, HASH_BITS, m))


def permute_bits(h: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    """Bit ``p`` of the result = bit ``perm[p]`` of ``h`` (uint64 arrays)."""
    if perm is None or tuple(perm) == tuple(range(HASH_BITS)):
        return h
    out = np.zeros_like(h)
    one = np.uint64(1)
    for dst, src in enumerate(perm):
        out |= ((h >> np.uint64(src)) & one) << np.uint64(dst)
    return out


#: cost-model constants (seconds), fitted on the 2-core dev box: per (non-zero mask × item)
#: probe, per candidate pair expanded and verified, per mask, per table slot, per item
#: and substring (sort, gathers)
_C_PROBE, _C_CAND, _C_MASK, _C_SLOT, _C_ITEM = 3.6e-9, 22e-9, 30e-6, 3e-9, 100e-9


def plan_search(n: int, radius: int, max_bits: int = 24) -> SearchPlan:
    """Pick the substring split with the lowest estimated cost for ``n`` uniformly random
    hashes (real perceptual hashes are clustered, so more candidates than estimated).
    Substrings are at most ``max_bits`` wide (direct-address tables of 2**bits slots)."""
    if radius < 0:
        raise ValueError("radius must be >= 0")
    best: SearchPlan | None = None
    m_min = max(1, math.ceil(HASH_BITS / max_bits))
    for m in range(m_min, max(m_min, radius + 1, 16) + 1):
        bits = _split(m)
        total = radius - m + 1  # GPH: Σ t_i
        # spread Σ t_i as evenly as possible; larger radii on the wider substrings
        base, extra = divmod(total, m) if total >= 0 else (-1, 0)
        if total < 0:  # fewer probed substrings than m: probe the widest (radius+1) exactly
            radii = [0] * (radius + 1) + [-1] * (m - radius - 1)
        else:
            radii = [base + 1] * extra + [base] * (m - extra)
        cost = cands = 0.0
        for b, t in zip(bits, radii, strict=True):
            if t < 0:
                continue
            v = _ball(b, t)
            slots = 1 << b
            c = n * (n - 1) / 2 * v / slots
            cands += c
            cost += v * _C_MASK + (v - 1) * _C_PROBE * n / 2  # each item probes half the masks
            cost += _C_CAND * c + _C_SLOT * slots + _C_ITEM * n
        shifts = tuple(int(s) for s in np.cumsum([0, *bits[:-1]]))
        plan = SearchPlan(radius, shifts, tuple(bits), tuple(radii), cands, cost, interleave_perm(m))
        if best is None or plan.est_cost < best.est_cost:
            best = plan
    assert best is not None
    return best


@lru_cache(maxsize=64)
def _flip_masks(bits: int, t: int) -> tuple[np.ndarray, ...]:
    """Non-zero masks of ≤ t set bits within ``bits`` bits, grouped by their top bit."""
    groups: list[list[int]] = [[] for _ in range(bits)]
    for k in range(1, t + 1):
        for combo in itertools.combinations(range(bits), k):
            groups[max(combo)].append(sum(1 << i for i in combo))
    return tuple(np.array(g, dtype=np.int64) for g in groups)


def _expand(a_pos: np.ndarray, b_start: np.ndarray, b_len: np.ndarray, chunk: int):
    """Yield ``(a, b)`` position pairs: ``a_pos[i]`` with every ``b`` in
    ``[b_start[i], b_start[i] + b_len[i])``, in chunks of about ``chunk`` pairs."""
    keep = b_len > 0
    if not keep.all():
        a_pos, b_start, b_len = a_pos[keep], b_start[keep], b_len[keep]
    if a_pos.size == 0:
        return
    ends = np.cumsum(b_len)
    lo = 0
    while lo < a_pos.size:
        # rows lo..hi-1 hold about `chunk` pairs (at least one row)
        base = int(ends[lo - 1]) if lo else 0
        hi = int(np.searchsorted(ends, base + chunk, side="right"))
        hi = max(hi, lo + 1)
        lens = b_len[lo:hi]
        n = int(ends[hi - 1]) - base
        row = np.repeat(np.arange(lo, hi), lens)
        offs = np.arange(n, dtype=np.int64) - np.repeat(ends[lo:hi] - lens - base, lens)
        yield a_pos[row], b_start[row] + offs
        lo = hi


def _search_substring(
    h: np.ndarray,
    shift: int,
    bits: int,
    t: int,
    radius: int,
    earlier: list[tuple[np.uint64, int]],
    chunk: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pairs found through one substring: substring distance ≤ ``t``, full distance ≤
    ``radius``, and not found through an ``earlier`` substring ``(mask, t_j)``."""
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    key = ((h >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
    order = np.argsort(key, kind="stable")
    hs = h[order]  # hashes in bucket order
    skey = key[order]
    del key
    counts = np.bincount(skey, minlength=1 << bits).astype(np.int32)  # int32: cache-friendlier gathers
    starts = (np.cumsum(counts, dtype=np.int64) - counts).astype(np.int32)
    r = np.uint8(radius)

    def verify(a: np.ndarray, b: np.ndarray) -> None:
        x = hs[a] ^ hs[b]
        ok = popcount64(x) <= r
        for m_j, t_j in earlier:  # found by an earlier substring already
            ok &= popcount64(x & m_j) > t_j
        if ok.any():
            ia, ib = order[a[ok]], order[b[ok]]
            out_i.append(np.minimum(ia, ib))
            out_j.append(np.maximum(ia, ib))

    # mask 0: pairs inside one bucket (positions p < q)
    buckets = np.flatnonzero(counts > 1)
    if buckets.size:
        mc = counts[buckets].astype(np.int64)
        ms = starts[buckets].astype(np.int64)
        tot = int(mc.sum())
        pos = np.repeat(ms, mc) + (np.arange(tot) - np.repeat(np.cumsum(mc) - mc, mc))
        end = np.repeat(ms + mc, mc)
        for a, b in _expand(pos, pos + 1, end - pos - 1, chunk):
            verify(a, b)

    # masks of 1..t bits: each item p (key k) against bucket k ^ mask, only k < k ^ mask
    # (⇔ the mask's top bit is not set in k), so each bucket pair is visited once.
    # Threads do not help here: fancy indexing, repeat and nonzero hold the GIL
    # (measured 4.3 s with one thread, 4.4 s with two on the 2-core box).
    groups = _flip_masks(bits, t) if t > 0 else ()
    for top, masks in enumerate(groups):
        if masks.size == 0:
            continue
        low_pos = np.flatnonzero((skey & (1 << top)) == 0)
        low_key = skey[low_pos]
        for mask in masks.tolist():
            partner = low_key ^ mask
            pc = counts[partner]
            hit = np.flatnonzero(pc > 0)  # 5x faster than flatnonzero(pc)
            if hit.size:
                b0 = starts[partner[hit]].astype(np.int64)
                for a, b in _expand(low_pos[hit], b0, pc[hit].astype(np.int64), chunk):
                    verify(a, b)
    return out_i, out_j


def hamming_pairs(
    hashes: np.ndarray,
    radius: int,
    *,
    plan: SearchPlan | None = None,
    chunk: int = 1 << 20,
) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs ``(i, j)``, ``i < j``, with ``popcount(h[i] ^ h[j]) <= radius``.

    ``hashes``: 64-bit hashes (int64 or uint64 array; duplicates allowed, they pair at
    distance 0). Exact: every such pair is returned once, sorted by ``(i, j)``. Memory is
    O(n + 2**bits + chunk); time grows with the number of candidate pairs, which for
    uniformly random hashes the plan keeps near ``n**2 / 2**21`` (see :func:`plan_search`;
    clustered hashes, as real pHashes are, give more)."""
    h = np.ascontiguousarray(to_uint64(np.asarray(hashes).ravel()))
    n = h.size
    empty = np.empty(0, dtype=np.int64)
    if not 0 <= radius <= HASH_BITS:
        raise ValueError(f"radius must be in 0..{HASH_BITS}, got {radius}")
    if n < 2:
        return empty, empty.copy()
    if plan is None:
        plan = plan_search(n, radius)
    elif plan.radius != radius:
        raise ValueError(f"plan is for radius {plan.radius}, not {radius}")
    if sum(plan.bits) != HASH_BITS or sum(plan.radii) < radius - len(plan.radii) + 1:
        raise ValueError(f"plan is not exact for radius {radius}: needs {HASH_BITS} bits and Σ radii ≥ radius − m + 1")
    h = permute_bits(h, plan.perm)

    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    earlier: list[tuple[np.uint64, int]] = []
    for shift, bits, t in zip(plan.shifts, plan.bits, plan.radii, strict=True):
        if t < 0:
            continue
        si, sj = _search_substring(h, shift, bits, t, radius, earlier, chunk)
        out_i += si
        out_j += sj
        earlier.append((np.uint64(((1 << bits) - 1) << shift), t))

    if not out_i:
        return empty, empty.copy()
    i = np.concatenate(out_i)
    j = np.concatenate(out_j)
    srt = np.lexsort((j, i))
    return i[srt], j[srt]


def brute_force_pairs(hashes: np.ndarray, radius: int, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Reference O(n²) search in row blocks (for tests and the benchmark baseline)."""
    h = to_uint64(np.asarray(hashes).ravel())
    n = h.size
    out_i, out_j = [], []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        d = popcount64(h[lo:hi, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= radius)
        ii = ii + lo
        keep = jj > ii
        out_i.append(ii[keep])
        out_j.append(jj[keep])
    if not out_i:
        e = np.empty(0, dtype=np.int64)
        return e, e.copy()
    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    srt = np.lexsort((j, i))
    return i[srt], j[srt]
