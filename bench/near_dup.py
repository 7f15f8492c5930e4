"""Near-duplicate search benchmark (and pHash radius tuning).

    .venv/bin/python bench/near_dup.py --n 1000000 --radius 8
    .venv/bin/python bench/near_dup.py --tune

**Search** (default): ``n`` 64-bit hashes, deterministic (``--seed``): ``n - planted``
uniformly random ones plus ``planted`` copies of random members with 1..radius random
bits flipped. The distinct values are searched with
:func:`carflow.imagehash.hamming_pairs` (exact multi-index hashing). Printed: time, peak
traced memory (tracemalloc; numpy arrays are traced) and the process's max RSS, pairs
found, recall on the planted pairs (must be 100%: the search is exact), and a brute-force
baseline (blocked N×N XOR + popcount) on a ``--baseline`` subsample, with the same
answer checked pair for pair and its time extrapolated to ``n`` (×(n/m)²).

Measured on the 2-core dev box (numpy 2.4, one thread): n=1,000,000, r=8: 4.3-4.8 s
idle, 6-8 s with other jobs on the box; 126 MiB peak traced, max RSS ~220-300 MiB for
the whole process; 10,161 pairs (10,000 planted + 161 random pairs that happen to lie
within 8 bits, as expected: 5e11 pairs × 2.4e-10); recall 100%; brute force on 20,000
(1.7-3.2 s) extrapolated to 1M: 4,300-8,000 s, i.e. MIH is ~800-1,000× faster.
r=10: 26-40 s, r=12: ~120 s (the candidate count grows as Σ C(21, ≤ t)).

**Tune** (``--tune``): generated car-like photos (sky/ground, a car body with wheels and
windows, background blocks, sensor noise) → JPEG, hashed the way the pipeline hashes
(``carflow.imageio.decode_small`` draft decode → ``gray_for_hash`` → pHash / dHash).
Positives are edits that should stay duplicates (re-encode at lower quality, 90% / 50%
resize, 3% crop, brightness, a small watermark, slight blur); negatives are other
photos, and "hard" negatives the same scene re-shot with the car moved and recoloured
(a different photo of a similar car). Prints the distance distributions and, per radius,
the recall on positives and the false-merge rate on negatives. Then, at the dedup
defaults, each edit's recall with and without the colour-thumbnail confirmation
(``DedupSettings.confirm_thumb``), and the *studio pairs*: every two of the demo's car
classes shot in one pose on a white background (``demo.render.render_studio``), how many
the hashes merge and how many survive the confirmation.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carflow.imagehash import (  # noqa: E402
    brute_force_pairs,
    dhash64,
    gray_for_hash,
    hamming_pairs,
    phash64,
    plan_search,
    popcount64,
)


# ---------------------------------------------------------------------------------------
# search benchmark
# ---------------------------------------------------------------------------------------
def random_flips(rng: np.random.Generator, count: int, max_bits: int) -> np.ndarray:
    """``count`` uint64 masks with 1..max_bits distinct random bits set."""
    k = rng.integers(1, max_bits + 1, size=count)
    ranks = np.argsort(rng.random((count, 64)), axis=1)  # a random bit order per mask
    chosen = ranks < k[:, None]
    weights = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))
    return (chosen * weights).sum(axis=1, dtype=np.uint64)


def make_hashes(n: int, radius: int, planted: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hashes, pair_a, pair_b)``: n shuffled hashes and the index pairs that were planted."""
    rng = np.random.default_rng(seed)
    planted = min(planted, n // 2)
    base = rng.integers(0, 2**64 - 1, size=n - planted, dtype=np.uint64, endpoint=True)
    src = rng.choice(n - planted, size=planted, replace=False)
    copies = base[src] ^ random_flips(rng, planted, max(radius, 1))
    hashes = np.concatenate([base, copies])
    perm = rng.permutation(n)  # perm[new] = old
    where = np.empty(n, dtype=np.int64)
    where[perm] = np.arange(n)
    return hashes[perm], where[src], where[np.arange(n - planted, n)]


def pair_codes(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    return lo.astype(np.int64) * n + hi


def bench_search(n: int, radius: int, planted: int, baseline: int, seed: int) -> dict:
    hashes, pa, pb = make_hashes(n, radius, planted, seed)
    plan = plan_search(n, radius)
    print(f"n={n:,} radius={radius} planted pairs={pa.size:,} seed={seed}")
    print(
        f"plan: substrings bits={plan.bits} radii={plan.radii} masks={plan.masks_per_substring} "
        f"est. candidates={plan.est_candidates:.3g} est. time={plan.est_cost:.1f}s"
    )

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    uniq, inverse = np.unique(hashes, return_inverse=True)  # as dedup does: distinct values only
    t_unique = time.perf_counter() - t0
    ui, uj = hamming_pairs(uniq, radius)
    t_total = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    found = np.unique(pair_codes(ui, uj, uniq.size))
    want = pair_codes(inverse[pa], inverse[pb], uniq.size)
    recall = float(np.isin(want, found).mean()) if want.size else 1.0
    print(
        f"MIH search: {t_total:.2f} s (np.unique {t_unique:.2f} s) over {uniq.size:,} distinct hashes; "
        f"peak traced memory {peak / 2**20:.0f} MiB; max RSS {rss1 / 1024:.0f} MiB (+{(rss1 - rss0) / 1024:.0f} MiB)"
    )
    print(f"pairs found: {ui.size:,}; planted-pair recall: {recall:.2%} ({int(round(recall * want.size)):,}/{want.size:,})")

    # brute-force baseline on a subsample that contains planted pairs
    m = min(baseline, n)
    rng = np.random.default_rng(seed + 1)
    take = min(pa.size, m // 4)
    extra = rng.choice(n, size=m, replace=False)
    sub_idx = np.unique(np.concatenate([pa[:take], pb[:take], extra]))[:m]
    if sub_idx.size < m:
        sub_idx = np.unique(np.concatenate([sub_idx, extra]))[:m]
    sub = hashes[sub_idx]
    t0 = time.perf_counter()
    bi, bj = brute_force_pairs(sub, radius)
    t_brute = time.perf_counter() - t0
    t0 = time.perf_counter()
    mi, mj = hamming_pairs(sub, radius)
    t_mih_sub = time.perf_counter() - t0
    same = np.array_equal(bi, mi) and np.array_equal(bj, mj)
    extrapolated = t_brute * (n / sub.size) ** 2
    print(
        f"brute force on {sub.size:,}: {t_brute:.2f} s, {bi.size:,} pairs; MIH on the same: {t_mih_sub:.3f} s, "
        f"{mi.size:,} pairs; identical: {same}"
    )
    print(
        f"brute force extrapolated to {n:,}: {extrapolated:,.0f} s → MIH is {extrapolated / t_total:,.0f}× faster"
    )
    return {
        "seconds": t_total,
        "peak_mib": peak / 2**20,
        "pairs": int(ui.size),
        "recall": recall,
        "brute_identical": same,
        "brute_extrapolated_s": extrapolated,
    }


# ---------------------------------------------------------------------------------------
# radius tuning on generated photos
# ---------------------------------------------------------------------------------------
def car_photo(seed: int, w: int = 640, h: int = 480, *, shift: float = 0.0, recolour: bool = False):
    """A generated car-like photo (PIL RGB). ``shift``/``recolour`` re-shoot the same scene
    with the car moved by that fraction of the width / in another colour."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    horizon = int(h * rng.uniform(0.35, 0.6))
    sky_top, sky_bot = rng.integers(60, 255, 3), rng.integers(60, 255, 3)
    ground = rng.integers(20, 200, 3)
    y = np.linspace(0, 1, horizon)[:, None, None]
    arr = np.empty((h, w, 3), dtype=np.float64)
    arr[:horizon] = sky_top * (1 - y) + sky_bot * y
    g = np.linspace(0.8, 1.2, h - horizon)[:, None, None]
    arr[horizon:] = np.clip(ground * g, 0, 255)
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(2, 7)):  # buildings, trees
        x0 = int(rng.uniform(-0.1, 1.0) * w)
        bw, bh = int(rng.uniform(0.05, 0.3) * w), int(rng.uniform(0.1, 0.5) * h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.rectangle([x0, horizon - bh, x0 + bw, horizon], fill=colour)
        else:
            d.ellipse([x0, horizon - bh, x0 + bw, horizon + bh // 4], fill=colour)
    car_rng = np.random.default_rng(seed + 10_000)
    cw, ch = int(car_rng.uniform(0.4, 0.7) * w), int(car_rng.uniform(0.18, 0.3) * h)
    cx = int(car_rng.uniform(0.05, 0.95 - cw / w) * w + shift * w)
    cy = int(horizon + car_rng.uniform(0.05, 0.25) * h)
    body = tuple(int(c) for c in car_rng.integers(0, 256, 3))
    if recolour:
        body = tuple(255 - c for c in body)
    d.rounded_rectangle([cx, cy - ch, cx + cw, cy], radius=ch // 4, fill=body)
    d.rounded_rectangle(
        [cx + cw // 5, cy - int(ch * 1.6), cx + int(cw * 0.75), cy - ch + 2], radius=ch // 5, fill=body
    )
    d.rectangle([cx + cw // 4, cy - int(ch * 1.45), cx + int(cw * 0.7), cy - ch - 2], fill=(40, 50, 70))
    for wx in (cx + cw // 6, cx + int(cw * 0.8)):
        r = ch // 2
        d.ellipse([wx - r, cy - r, wx + r, cy + r], fill=(15, 15, 15))
        d.ellipse([wx - r // 2, cy - r // 2, wx + r // 2, cy + r // 2], fill=(150, 150, 150))
    noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, 6, (h, w, 3))
    im = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return im.filter(ImageFilter.GaussianBlur(0.6))


def jpeg_bytes(im, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def pipeline_hashes(data: bytes) -> tuple[int, int]:
    """pHash, dHash as the clean stage computes them (draft decode, then grey + Lanczos)."""
    p, d, _ = pipeline_signature(data)
    return p, d


def pipeline_signature(data: bytes) -> tuple[int, int, np.ndarray]:
    """pHash, dHash and the 8×8 colour thumbnail (``colour_thumb``, 192 uint8), as the
    clean stage computes them from its one small decode."""
    from carflow.imagehash import colour_thumb
    from carflow.imageio import decode_small

    small = decode_small(data, 32)
    g32, g9 = gray_for_hash(small)
    return phash64(g32), dhash64(g9), np.frombuffer(colour_thumb(small), np.uint8)


def studio_pairs(pose_seeds: int = 3) -> list[tuple[str, str, int, int, float]]:
    """Every pair of the demo's car classes shot in one studio pose on white
    (``demo.render.render_studio``, the same frame and seed): different cars, same
    silhouette family. Returns (class a, class b, pHash, dHash, thumb distance)."""
    from itertools import combinations

    from carflow.imagehash import thumb_distance
    from demo.render import CAR_STYLES, jpeg, render_studio

    out = []
    for seed in range(pose_seeds):
        frac = (0.8, 0.7, 0.6)[seed % 3]
        sig = {k: pipeline_signature(jpeg(render_studio(st, (640, 480), np.random.default_rng(seed), frac=frac).image))
               for k, st in CAR_STYLES.items()}
        for a, b in combinations(sig, 2):
            (pa, da, ta), (pb, db, tb) = sig[a], sig[b]
            out.append((a, b, (pa ^ pb).bit_count(), (da ^ db).bit_count(), float(thumb_distance(ta, tb)[0])))
    return out


def edits(im) -> dict[str, bytes]:
    """Edits of one photo that a dedup stage should still call duplicates."""
    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

    w, h = im.size
    out = {
        "jpeg_q60": jpeg_bytes(im, 60),
        "resize90_q75": jpeg_bytes(im.resize((int(w * 0.9), int(h * 0.9)), Image.Resampling.LANCZOS), 75),
        "resize50": jpeg_bytes(im.resize((w // 2, h // 2), Image.Resampling.LANCZOS), 85),
        "crop3pct": jpeg_bytes(im.crop((int(w * 0.03), int(h * 0.03), int(w * 0.97), int(h * 0.97))), 90),
        "brighter10": jpeg_bytes(ImageEnhance.Brightness(im).enhance(1.1), 90),
        "blur1": jpeg_bytes(im.filter(ImageFilter.GaussianBlur(1.0)), 90),
    }
    marked = im.copy()
    d = ImageDraw.Draw(marked)
    d.rectangle([w - w // 5, h - h // 10, w - 8, h - 8], fill=(255, 255, 255))
    d.text((w - w // 5 + 6, h - h // 10 + 4), "DEALER", fill=(200, 0, 0))
    out["watermark"] = jpeg_bytes(marked, 90)
    return out


def tune(count: int, negatives: int, seed: int, radii: list[int], dhash_radius: int = 10) -> None:
    from tasks.dedup import connected_components

    t0 = time.perf_counter()
    pos: dict[str, list[tuple[int, int]]] = {}
    hard_p, hard_d = [], []
    orig_p, orig_d = [], []
    from carflow.imagehash import thumb_distance
    from carflow.settings import DedupSettings

    dflt = DedupSettings()
    for k in range(max(count, negatives)):
        im = car_photo(seed + k)
        p, dh, th = pipeline_signature(jpeg_bytes(im, 92))
        orig_p.append(p)
        orig_d.append(dh)
        if k >= count:
            continue
        for name, data in edits(im).items():
            ep, ed, et = pipeline_signature(data)
            pos.setdefault(name, []).append(
                ((p ^ ep).bit_count(), (dh ^ ed).bit_count(), float(thumb_distance(th, et)[0]))
            )
        reshot = car_photo(seed + k, shift=0.15 if k % 2 else -0.15, recolour=k % 3 == 0)
        hp, hd = pipeline_hashes(jpeg_bytes(reshot, 92))
        hard_p.append((p ^ hp).bit_count())
        hard_d.append((dh ^ hd).bit_count())
    op = np.array(orig_p, dtype=np.uint64)
    od = np.array(orig_d, dtype=np.uint64)
    m = op.size
    iu = np.triu_indices(m, 1)
    neg_p = popcount64(op[iu[0]] ^ op[iu[1]]).astype(int)
    neg_d = popcount64(od[iu[0]] ^ od[iu[1]]).astype(int)
    hard_p_a, hard_d_a = np.array(hard_p), np.array(hard_d)
    print(
        f"{count} photos × {len(pos)} edits + a re-shot each; {m} different photos = {neg_p.size:,} pairs "
        f"({time.perf_counter() - t0:.0f} s)\n"
    )

    def q(a):
        return "min {:2d}  p5 {:4.1f}  median {:4.1f}  p95 {:4.1f}  max {:2d}".format(
            int(np.min(a)), *np.percentile(a, [5, 50, 95]), int(np.max(a))
        )

    for title, col, hard, neg in (("pHash", 0, hard_p_a, neg_p), ("dHash", 1, hard_d_a, neg_d)):
        print(f"{title} distances")
        for name, vals in pos.items():
            print(f"  same photo, {name:<13} {q(np.array([v[col] for v in vals]))}")
        print(f"  re-shot (car moved)      {q(hard)}")
        print(f"  different photos         {q(neg)}")

    all_p = np.array([v[0] for vals in pos.values() for v in vals])
    all_d = np.array([v[1] for vals in pos.values() for v in vals])
    print(
        f"\n        pHash only: caught  re-shot  different  false  largest  | + dHash ≤ {dhash_radius}: caught  re-shot  "
        "different  false  largest"
    )
    print(
        "radius        edits  merged  pairs      pairs  cluster  |                edits  merged  pairs      pairs  cluster"
    )
    for r in radii:
        i, j = hamming_pairs(op, r)
        big = np.bincount(connected_components(m, i, j)).max()
        ok = popcount64(od[i] ^ od[j]) <= dhash_radius
        big_d = np.bincount(connected_components(m, i[ok], j[ok])).max()
        both = (all_p <= r) & (all_d <= dhash_radius)
        print(
            f"{r:6d}  {np.mean(all_p <= r):11.1%}  {np.mean(hard_p_a <= r):6.1%}  {np.mean(neg_p <= r):9.4%}  "
            f"{i.size:5d}  {big:7d}  |  {np.mean(both):19.1%}  "
            f"{np.mean((hard_p_a <= r) & (hard_d_a <= dhash_radius)):6.1%}  "
            f"{np.mean((neg_p <= r) & (neg_d <= dhash_radius)):9.4%}  {int(ok.sum()):5d}  {big_d:7d}"
        )

    # the defaults (pHash ≤ hamming_radius, dHash ≤ dhash_radius), with and without the
    # colour-thumbnail confirmation, per edit; then studio pairs of different cars
    r, rd, rt = dflt.hamming_radius, dflt.dhash_radius, dflt.thumb_radius
    print(f"\ndefaults: pHash ≤ {r}, dHash ≤ {rd}; confirmed: + colour thumbnail ≤ {rt:g}")
    print(f"  {'edit':<14s} {'hashes':>7s} {'+ thumb':>8s}   thumb distance p50 / max")
    for name, vals in pos.items():
        a = np.array(vals)
        hashed = (a[:, 0] <= r) & (a[:, 1] <= rd)
        print(f"  {name:<14s} {hashed.mean():7.1%} {(hashed & (a[:, 2] <= rt)).mean():8.1%}   "
              f"{np.median(a[:, 2]):5.1f} / {a[:, 2].max():5.1f}")
    studio = np.array([x[2:] for x in studio_pairs()], dtype=float)
    hashed = (studio[:, 0] <= r) & (studio[:, 1] <= rd)
    print(f"  studio pairs (different cars, one pose, white; {len(studio)} pairs): merged by hashes "
          f"{int(hashed.sum())}, + thumb {int((hashed & (studio[:, 2] <= rt)).sum())}; thumb distance of the "
          f"hash-merged ones: min {studio[hashed, 2].min() if hashed.any() else float('nan'):.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--radius", type=int, default=8)
    ap.add_argument("--planted", type=int, default=10_000, help="near pairs planted (1..radius bits flipped)")
    ap.add_argument("--baseline", type=int, default=20_000, help="brute-force subsample size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tune", action="store_true", help="tune the pHash radius on generated photos instead")
    ap.add_argument("--photos", type=int, default=200, help="--tune: photos to edit (positives)")
    ap.add_argument("--negatives", type=int, default=1000, help="--tune: different photos (negatives)")
    a = ap.parse_args(argv)
    if a.tune:
        tune(a.photos, a.negatives, a.seed, list(range(2, 17, 2)))
        return 0
    res = bench_search(a.n, a.radius, a.planted, a.baseline, a.seed)
    return 0 if res["recall"] == 1.0 and res["brute_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
