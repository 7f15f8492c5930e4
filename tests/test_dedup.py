"""Dedup stage: exact and near duplicates, union-find clusters, representative rule,
placeholders, label conflicts, rows already dropped; all on generated tables (and a few
generated photos)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from carflow.imagehash import dhash64, gray_for_hash, phash64, pixel_sha256, to_int64, to_uint64
from tasks.dedup import (
    DedupSettings,
    as_dedup_settings,
    connected_components,
    dedup_manifest,
    dedup_stats,
    hash_column,
    leader_clusters,
)

BASE = 0x0F0F_3C3C_5A5A_A5A5  # an arbitrary pHash
FAR = 0xF0F0_C3C3_A5A5_5A5A  # 64 bits away from BASE


def flip(h: int, *bits: int) -> int:
    for b in bits:
        h ^= 1 << int(b)
    return h


def row(image_id: str, listing_id: str, phash: int | None = BASE, **kw) -> dict:
    r = {
        "image_id": image_id,
        "source_id": image_id,
        "listing_id": listing_id,
        "label": "bmw 3 series",
        "width": 640,
        "height": 480,
        "status": "kept",
        "reason": None,
        "pixel_hash": f"px-{image_id}",
        "phash": None if phash is None else to_int64(phash),
        "dhash": None if phash is None else to_int64(phash),
        "first_seen": 0,
    }
    r.update(kw)
    if "dhash" in kw and kw["dhash"] is not None:
        r["dhash"] = to_int64(kw["dhash"])
    return r


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in ("phash", "dhash"):
        df[col] = df[col].astype("Int64")
    return df


def by_row(out: pd.DataFrame, image_id: str, listing_id: str) -> pd.Series:
    hit = out[(out["image_id"] == image_id) & (out["listing_id"] == listing_id)]
    assert len(hit) == 1
    return hit.iloc[0]


def kept(out: pd.DataFrame) -> list[tuple[str, str]]:
    k = out[out["status"] == "kept"]
    return sorted(zip(k["image_id"], k["listing_id"], strict=True))


# ---------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------
def test_settings_defaults_and_conversion():
    cfg = DedupSettings()
    assert (cfg.hamming_radius, cfg.use_dhash, cfg.placeholder_min_listings) == (8, True, 5)
    assert as_dedup_settings(None) == cfg
    assert as_dedup_settings({"hamming_radius": 4}).hamming_radius == 4
    with pytest.raises(ValidationError):
        as_dedup_settings({"hamming_radus": 4})  # typo
    with pytest.raises(ValidationError):
        DedupSettings(placeholder_min_listings=1)
    from carflow.settings import DedupSettings as GlobalDedup

    assert as_dedup_settings(GlobalDedup(hamming_radius=6)).hamming_radius == 6


# ---------------------------------------------------------------------------------------
# union-find
# ---------------------------------------------------------------------------------------
def test_connected_components_small():
    comp = connected_components(7, np.array([1, 2, 5, 6]), np.array([2, 3, 6, 4]))
    assert comp.tolist() == [0, 1, 1, 1, 4, 4, 4]
    assert connected_components(3, np.array([], int), np.array([], int)).tolist() == [0, 1, 2]
    # a long chain given in the worst order still ends in one component
    n = 2000
    chain = np.arange(n - 1)[::-1]
    assert (connected_components(n, chain + 1, chain) == 0).all()


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 40),
    edges=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39)), max_size=60),
)
def test_connected_components_match_reference(n, edges):
    edges = [(a % n, b % n) for a, b in edges]
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    want = [min(i for i in range(n) if find(i) == find(x)) for x in range(n)]
    u = np.array([a for a, _ in edges], dtype=np.int64)
    v = np.array([b for _, b in edges], dtype=np.int64)
    assert connected_components(n, u, v).tolist() == want


# ---------------------------------------------------------------------------------------
# exact duplicates
# ---------------------------------------------------------------------------------------
def test_same_image_in_two_listings_keeps_the_first_occurrence():
    df = frame([row("img-a", "L2", first_seen=5), row("img-a", "L1", first_seen=3), row("img-z", "L3", phash=FAR)])
    out = dedup_manifest(df, DedupSettings())
    assert kept(out) == [("img-a", "L1"), ("img-z", "L3")]
    dup = by_row(out, "img-a", "L2")
    assert (dup["status"], dup["reason"], dup["dup_of"], dup["dup_cluster"]) == ("dropped", "duplicate", "img-a", "img-a")
    first = by_row(out, "img-a", "L1")
    assert bool(first["is_representative"]) and pd.isna(first["dup_of"])
    assert out["cluster_listings"].tolist() == [2, 2, 1]
    assert out.index.equals(df.index) and out["image_id"].tolist() == df["image_id"].tolist()


def test_same_pixels_different_bytes():
    """Re-saved with other metadata: other image_id, same pixel_hash; no phash needed."""
    df = frame(
        [
            row("img-a", "L1", phash=None, pixel_hash="px-1"),
            row("img-b", "L2", phash=None, pixel_hash="px-1", first_seen=1),
            row("img-c", "L3", phash=None, pixel_hash="px-2"),
        ]
    )
    out = dedup_manifest(df, DedupSettings())
    assert kept(out) == [("img-a", "L1"), ("img-c", "L3")]
    assert by_row(out, "img-b", "L2")["dup_of"] == "img-a"
    assert by_row(out, "img-b", "L2")["dup_cluster"] == "img-a"


def test_pixel_hash_of_real_images_with_different_bytes():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    a, b = io.BytesIO(), io.BytesIO()
    im.save(a, "PNG")
    im.save(b, "PNG", compress_level=1)  # other bytes, same pixels
    assert a.getvalue() != b.getvalue()
    rows = []
    for k, data in enumerate([a.getvalue(), b.getvalue()]):
        dec = Image.open(io.BytesIO(data)).convert("RGB")
        rows.append(row(f"img-{k}", f"L{k}", phash=FAR if k else BASE, pixel_hash=pixel_sha256(dec)))
    out = dedup_manifest(frame(rows), DedupSettings(hamming_radius=0))
    assert kept(out) == [("img-0", "L0")]


# ---------------------------------------------------------------------------------------
# near duplicates
# ---------------------------------------------------------------------------------------
def test_near_duplicates_within_radius_only():
    df = frame(
        [
            row("a", "L1"),
            row("b", "L2", phash=flip(BASE, 1, 5, 9, 13, 17, 21, 25, 29), first_seen=1),  # distance 8
            row("c", "L3", phash=flip(BASE, *range(30, 39)), first_seen=2),  # distance 9
        ]
    )
    cfg = DedupSettings(use_dhash=False)
    out = dedup_manifest(df, cfg)
    assert kept(out) == [("a", "L1"), ("c", "L3")]
    assert by_row(out, "b", "L2")["dup_of"] == "a"
    out4 = dedup_manifest(df, DedupSettings(hamming_radius=4, use_dhash=False))
    assert len(kept(out4)) == 3


def test_union_find_chains_near_pairs():
    """a~b and b~c (each 6 bits) put a and c (12 bits apart) in one cluster."""
    b = flip(BASE, *range(6))
    c = flip(b, *range(10, 16))
    df = frame([row("a", "L1"), row("b", "L2", phash=b), row("c", "L3", phash=c)])
    out = dedup_manifest(df, DedupSettings(use_dhash=False))
    assert out["dup_cluster"].tolist() == ["a", "a", "a"]
    assert len(kept(out)) == 1


def test_leader_linkage_does_not_chain():
    """a~b, b~c, a≁c: union-find makes one cluster; leader linkage keeps c apart (a is
    the best image, so a leads and takes b). Exact duplicates still merge transitively."""
    b = flip(BASE, *range(6))
    c = flip(b, *range(10, 16))
    rows = [row("a", "L1", width=1280, height=960), row("b", "L2", phash=b), row("c", "L3", phash=c)]
    rows.append(row("c-resaved", "L4", phash=FAR, pixel_hash="px-c"))  # same pixels as c
    out = dedup_manifest(frame(rows), DedupSettings(use_dhash=False, linkage="leader"))
    assert out["dup_cluster"].tolist() == ["a", "a", "c", "c"]
    assert kept(out) == [("a", "L1"), ("c", "L3")]
    single = dedup_manifest(frame(rows), DedupSettings(use_dhash=False, linkage="single"))
    assert single["dup_cluster"].tolist() == ["a", "a", "a", "a"]


def test_leader_clusters_star_and_chain():
    group = np.arange(6)
    rank = np.array([5, 0, 1, 2, 3, 4])  # node 1 is the best
    # chain 0-1-2-3 and a pair 4-5
    comp = leader_clusters(group, np.array([0, 1, 2, 4]), np.array([1, 2, 3, 5]), rank)
    # 1 leads {0, 1, 2}; 3 is left alone (its only neighbour 2 is taken); 4 leads {4, 5}
    assert comp.tolist() == [0, 0, 0, 3, 4, 4]
    # exact groups move together: nodes 3 and 5 are one group (root 3)
    group2 = np.array([0, 1, 2, 3, 4, 3])
    comp2 = leader_clusters(group2, np.array([2, 4]), np.array([3, 5]), rank)
    # visit order g2, g3 (taken by g2), g4: g4's only neighbour is taken, so it stays alone
    assert comp2.tolist() == [0, 1, 2, 2, 4, 2]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_leader_members_are_within_radius_of_the_representative(seed):
    rng = np.random.default_rng(seed)
    centre = rng.integers(0, 2**63)
    rows = []
    for i in range(40):
        h = flip(int(centre), *rng.choice(64, int(rng.integers(0, 12)), replace=False))
        rows.append(row(f"i{i:02d}", f"L{i}", phash=h, width=int(rng.integers(1, 5)) * 100, first_seen=i))
    out = dedup_manifest(frame(rows), DedupSettings(use_dhash=False, linkage="leader", placeholder_min_listings=99))
    ph = {i: to_uint64(int(p)) for i, p in zip(out["image_id"], out["phash"], strict=True)}
    dropped = out[out["status"] == "dropped"]
    assert len(dropped) > 0
    for image_id, rep in zip(dropped["image_id"], dropped["dup_of"], strict=True):
        assert (ph[image_id] ^ ph[rep]).bit_count() <= 8


def test_use_dhash_requires_both_hashes_close():
    df = frame([row("a", "L1", dhash=BASE), row("b", "L2", phash=flip(BASE, 3, 4), dhash=FAR)])
    assert len(kept(dedup_manifest(df, DedupSettings(use_dhash=True)))) == 2
    assert len(kept(dedup_manifest(df, DedupSettings(use_dhash=False)))) == 1
    df2 = frame([row("a", "L1", dhash=BASE), row("b", "L2", phash=flip(BASE, 3, 4), dhash=flip(BASE, *range(10)))])
    assert len(kept(dedup_manifest(df2, DedupSettings(use_dhash=True, dhash_radius=10)))) == 1
    assert len(kept(dedup_manifest(df2, DedupSettings(use_dhash=True, dhash_radius=9)))) == 2


def test_generated_photos_end_to_end():
    """Real hashes: a re-encoded, 90%-resized copy of a photo is a duplicate of it; other
    photos are not."""

    def photo(seed):
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # blocky scene
        im = Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC)
        noisy = np.asarray(im, dtype=float) + rng.normal(0, 5, (240, 320, 3))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))

    def hashed(im, image_id, listing, quality=90, scale=1.0, first_seen=0):
        if scale != 1.0:
            im = im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        dec = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        g32, g9 = gray_for_hash(dec)
        return row(
            image_id, listing, phash=phash64(g32), dhash=dhash64(g9), pixel_hash=pixel_sha256(dec),
            width=dec.width, height=dec.height, first_seen=first_seen,
        )

    photos = [photo(s) for s in range(6)]
    rows = [hashed(p, f"orig-{k}", f"L{k}", first_seen=k) for k, p in enumerate(photos)]
    rows.append(hashed(photos[0], "copy-0", "L9", quality=60, scale=0.9, first_seen=10))
    rows.append(hashed(photos[3], "copy-3", "L8", quality=70, scale=1.0, first_seen=11))
    out = dedup_manifest(frame(rows), DedupSettings())
    assert kept(out) == sorted((f"orig-{k}", f"L{k}") for k in range(6))
    assert by_row(out, "copy-0", "L9")["dup_of"] == "orig-0"
    assert by_row(out, "copy-3", "L8")["dup_of"] == "orig-3"


# ---------------------------------------------------------------------------------------
# representative
# ---------------------------------------------------------------------------------------
def test_representative_is_highest_resolution_then_earliest_then_id():
    near = flip(BASE, 2, 40)
    df = frame(
        [
            row("small-early", "L1", width=320, height=240, first_seen=0),
            row("big-late", "L2", phash=near, width=1280, height=960, first_seen=9),
            row("big-early", "L3", phash=near, width=960, height=1280, first_seen=4),  # same area
            row("big-early-2", "L4", phash=near, width=1280, height=960, first_seen=4),  # same area and time
        ]
    )
    out = dedup_manifest(df, DedupSettings(use_dhash=False))
    assert kept(out) == [("big-early", "L3")]
    assert set(out.loc[out["status"] == "dropped", "dup_of"]) == {"big-early"}
    assert out["dup_cluster"].nunique() == 1 and out["dup_cluster"].iloc[0] == "big-early"  # smallest image_id
    assert out["is_representative"].tolist() == [False, False, True, False]


def test_missing_first_seen_uses_row_order_and_missing_size_loses():
    df = frame([row("x", "L1", width=None, height=None), row("y", "L2"), row("z", "L3")]).drop(columns="first_seen")
    out = dedup_manifest(df, DedupSettings())
    assert kept(out) == [("y", "L2")]


# ---------------------------------------------------------------------------------------
# placeholders
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 5])
def test_placeholder_at_k_listings(k):
    """The same banner (and a re-encoded copy) in k listings: all dropped; in k-1: one kept."""
    banner = [row("banner", f"L{i}", phash=FAR, label=None, first_seen=i) for i in range(k - 1)]
    banner.append(row("banner-2", f"L{k - 1}", phash=flip(FAR, 0, 1), label=None, first_seen=k))
    car = [row("car", "L0", label="audi a4")]
    cfg = DedupSettings(placeholder_min_listings=k)

    out = dedup_manifest(frame(banner + car), cfg)
    ban = out[out["image_id"].str.startswith("banner")]
    assert (ban["status"] == "dropped").all() and (ban["reason"] == "placeholder").all()
    assert not ban["is_representative"].any() and ban["dup_of"].isna().all()
    assert (ban["cluster_listings"] == k).all()
    assert kept(out) == [("car", "L0")]

    out = dedup_manifest(frame(banner[:-1] + car), cfg)  # k-1 listings
    ban = out[out["image_id"].str.startswith("banner")]
    assert (ban["reason"] != "placeholder").all()
    assert int((ban["status"] == "kept").sum()) == 1


def test_placeholder_counts_distinct_listings_not_rows():
    rows = [row(f"v{i}", "L1", phash=flip(BASE, i)) for i in range(6)]  # 6 variants, one listing
    out = dedup_manifest(frame(rows), DedupSettings(use_dhash=False))
    assert (out["reason"] != "placeholder").all() and len(kept(out)) == 1


# ---------------------------------------------------------------------------------------
# label conflicts
# ---------------------------------------------------------------------------------------
def test_label_conflict_flags_cluster_and_keeps_it():
    df = frame(
        [
            row("a", "L1", label="bmw 3 series"),
            row("a", "L2", label="bmw 5 series", first_seen=1),
            row("b", "L3", phash=FAR, label="audi a4"),
            row("b", "L4", phash=FAR, label=None, first_seen=1),
            row("c", "L5", phash=flip(FAR, *range(20, 40)), label="audi a4"),
        ]
    )
    out = dedup_manifest(df, DedupSettings())
    assert out["label_conflict"].tolist() == [True, True, False, False, False]
    assert kept(out) == [("a", "L1"), ("b", "L3"), ("c", "L5")]


def test_placeholder_cluster_is_not_a_label_conflict():
    rows = [row("banner", f"L{i}", label=f"make{i}") for i in range(5)]
    out = dedup_manifest(frame(rows), DedupSettings(placeholder_min_listings=5))
    assert (out["reason"] == "placeholder").all()
    assert not out["label_conflict"].any()


# ---------------------------------------------------------------------------------------
# rows dropped before dedup
# ---------------------------------------------------------------------------------------
def test_already_dropped_rows_are_untouched_and_ignored():
    df = frame(
        [
            row("a", "L1"),
            row("bridge", "L2", phash=flip(BASE, 1), status="dropped", reason="dark"),
            row("b", "L3", phash=flip(BASE, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)),
            row("a", "L4", status="dropped", reason="not_car", first_seen=-1),
        ]
    )
    out = dedup_manifest(df, DedupSettings(hamming_radius=6, use_dhash=False))
    dropped = out[out["reason"].isin(["dark", "not_car"])]
    assert (dropped["status"] == "dropped").all() and len(dropped) == 2
    for col in ("dup_cluster", "dup_of", "is_representative", "label_conflict", "cluster_listings"):
        assert dropped[col].isna().all(), col
    # "bridge" would link a and b (6 bits each way) if it took part
    assert kept(out) == [("a", "L1"), ("b", "L3")]
    assert by_row(out, "a", "L1")["cluster_listings"] == 1


def test_nothing_kept():
    df = frame([row("a", "L1", status="dropped", reason="empty")])
    out = dedup_manifest(df, DedupSettings())
    assert out["status"].tolist() == ["dropped"] and out["dup_cluster"].isna().all()
    assert dedup_stats(out)["kept"] == 0


# ---------------------------------------------------------------------------------------
# hash columns, output types, stats
# ---------------------------------------------------------------------------------------
def test_hash_column_dtypes():
    vals = [to_int64(2**64 - 1), None, 5]
    want = [2**64 - 1, 0, 5]
    for s in (
        pd.Series(vals, dtype="Int64"),
        pd.Series(vals, dtype=object),
        pd.Series(pa.array(vals, pa.int64()), dtype=pd.ArrowDtype(pa.int64())),
    ):
        u, ok = hash_column(s, "phash")
        assert u.tolist() == want and ok.tolist() == [True, False, True]
    u, ok = hash_column(pd.Series([2**64 - 1, 3], dtype=np.uint64), "phash")
    assert u.tolist() == [2**64 - 1, 3] and ok.all()
    u, ok = hash_column(pd.Series([-1, 3], dtype=np.int64), "phash")
    assert u.tolist() == [2**64 - 1, 3]
    with pytest.raises(TypeError, match="float"):
        hash_column(pd.Series([1.0, None]), "phash")
    u, ok = hash_column(pd.Series([None, None], dtype=float), "phash")  # all null: nothing lost
    assert not ok.any()


def test_float_hash_column_is_rejected_with_a_fix():
    """What pyarrow's to_pandas() makes of int64 with nulls: the low bits are gone."""
    table = pa.table({"phash": pa.array([to_int64(BASE), None], pa.int64())})
    df = frame([row("a", "L1"), row("b", "L2", phash=None)])
    df["phash"] = table.to_pandas()["phash"]
    assert df["phash"].dtype == np.float64
    with pytest.raises(TypeError, match="types_mapper"):
        dedup_manifest(df, DedupSettings())


def test_output_columns_roundtrip_through_arrow():
    df = frame([row("a", "L1"), row("a", "L2", first_seen=1), row("z", "L3", phash=FAR, status="dropped", reason="dark")])
    out = dedup_manifest(df, DedupSettings())
    table = pa.Table.from_pandas(out, preserve_index=False)
    for col, ok in (
        ("dup_cluster", pa.types.is_string),
        ("dup_of", pa.types.is_string),
        ("is_representative", pa.types.is_boolean),
        ("label_conflict", pa.types.is_boolean),
        ("cluster_listings", pa.types.is_integer),
    ):
        typ = table.schema.field(col).type
        assert ok(typ) or pa.types.is_large_string(typ), (col, typ)
    assert table.column("dup_of").to_pylist() == [None, "a", None]


def test_dedup_stats():
    df = frame(
        [
            row("a", "L1"),
            row("a", "L2", first_seen=1),
            row("b", "L3", phash=flip(BASE, 0, 1)),
            row("c", "L4", phash=FAR, label="x"),
            row("c", "L5", phash=FAR, label="y"),
            *[row("ban", f"B{i}", phash=flip(FAR, *range(20, 44))) for i in range(5)],
            row("d", "L6", phash=None, status="dropped", reason="dark"),
        ]
    )
    stats = dedup_stats(dedup_manifest(df, DedupSettings()))
    assert stats == {
        "rows": 11,
        "kept": 2,
        "dropped_by_reason": {"dark": 1, "duplicate": 3, "placeholder": 5},
        "duplicate": 3,
        "placeholder": 5,
        "clusters": 3,
        "multi_image_clusters": 1,
        "largest_cluster_images": 2,
        "label_conflict_rows": 2,
        "label_conflict_clusters": 1,
    }


# ---------------------------------------------------------------------------------------
# scale and invariance
# ---------------------------------------------------------------------------------------
def test_many_rows_fast_and_correct():
    """20,000 photos, 2,000 of them with a near copy in another listing, 500 re-used in a
    second listing, and one banner in 50 listings."""
    rng = np.random.default_rng(3)
    n = 20_000
    ph = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    ids = [f"img{i:06d}" for i in range(n)]
    df = pd.DataFrame(
        {
            "image_id": ids,
            "listing_id": [f"L{i // 10}" for i in range(n)],
            "label": "m",
            "width": 640,
            "height": 480,
            "status": "kept",
            "reason": None,
            "pixel_hash": [f"px{i}" for i in range(n)],
            "phash": ph.view(np.int64),
            "dhash": ph.view(np.int64),
            "first_seen": np.arange(n),
        }
    )
    near = df.iloc[:2000].copy()
    bits = rng.integers(0, 64, size=(2000, 3)).astype(np.uint64)
    masks = (np.uint64(1) << bits[:, 0]) | (np.uint64(1) << bits[:, 1]) | (np.uint64(1) << bits[:, 2])
    near["phash"] = (ph[:2000] ^ masks).view(np.int64)
    near["dhash"] = near["phash"]
    near["image_id"] = [f"near{i:06d}" for i in range(2000)]
    near["pixel_hash"] = near["image_id"]
    near["listing_id"] = [f"N{i}" for i in range(2000)]
    near["first_seen"] = n + np.arange(2000)
    reuse = df.iloc[5000:5500].copy()
    reuse["listing_id"] = [f"R{i}" for i in range(500)]
    banner = pd.DataFrame([row("banner", f"B{i}", phash=FAR) for i in range(50)])
    all_rows = pd.concat([df, near, reuse, banner], ignore_index=True)
    out = dedup_manifest(all_rows, DedupSettings())
    stats = dedup_stats(out)
    assert stats["kept"] == n
    assert stats["duplicate"] >= 2500 and stats["placeholder"] == 50
    assert (out.loc[out["image_id"].str.startswith("near"), "reason"] == "duplicate").all()
    assert (out.loc[out["image_id"].str.startswith("img"), "is_representative"].sum()) == n


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_result_does_not_depend_on_row_order(seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(30):
        centre = int(rng.integers(0, 4))
        h = flip([BASE, FAR, BASE ^ 0xFFFF, FAR ^ 0xFFFF_0000][centre], *rng.choice(64, rng.integers(0, 5), replace=False))
        rows.append(
            row(
                f"i{int(rng.integers(0, 20))}", f"L{i}", phash=h, first_seen=int(rng.integers(0, 5)),
                width=int(rng.choice([320, 640])), height=480, label=str(rng.choice(["a", "b", None])),
            )
        )
    # one image_id has one hash: make rows of the same image consistent
    first = {}
    for r in rows:
        first.setdefault(r["image_id"], (r["phash"], r["width"]))
        r["phash"], r["width"] = first[r["image_id"]]
        r["dhash"] = r["phash"]
    df = frame(rows)
    a = dedup_manifest(df, DedupSettings(placeholder_min_listings=6)).sort_values("listing_id")
    b = dedup_manifest(df.sample(frac=1, random_state=seed % 1000), DedupSettings(placeholder_min_listings=6))
    b = b.sort_values("listing_id")
    cols = ["image_id", "status", "reason", "dup_cluster", "dup_of", "is_representative", "label_conflict"]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))


def test_hash_pairs_are_confirmed_by_the_colour_thumbnail():
    """Equal pHash/dHash (grey silhouettes) but a different colour thumbnail: two cars,
    not a duplicate. The same thumbnail (or none, an older manifest) still merges."""
    from PIL import Image

    from carflow.imagehash import colour_thumb

    def thumb(colour):
        im = Image.new("RGB", (64, 48), (255, 255, 255))
        im.paste(colour, (8, 20, 56, 40))  # the car: a tenth of the frame and more
        return colour_thumb(im)

    blue, silver = thumb((26, 72, 172)), thumb((182, 184, 190))
    rows = [row("a", "L1", thumb=blue, label="bmw_3-series"), row("b", "L2", thumb=silver, label="audi_a4"),
            row("c", "L3", thumb=blue, label="bmw_3-series")]
    out = dedup_manifest(frame(rows))
    cluster = dict(zip(out["image_id"], out["dup_cluster"], strict=True))
    assert cluster["a"] == cluster["c"] != cluster["b"]
    assert not out["label_conflict"].any()
    assert dedup_manifest(frame(rows), {"confirm_thumb": False})["dup_cluster"].nunique() == 1
    no_thumbs = frame([{**r, "thumb": None} for r in rows])
    assert dedup_manifest(no_thumbs)["dup_cluster"].nunique() == 1


def test_confirm_by_thumb_in_steps_keeps_the_same_pairs():
    """The thumbnail check runs a few thousand pairs at a time (memory stays flat); the
    pairs it keeps do not depend on the step, and a node without a thumbnail keeps its pairs."""
    from tasks.dedup import confirm_by_thumb

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (20, 192), dtype=np.uint8)
    thumbs = np.empty(40, dtype=object)
    for i in range(40):  # node i and i+20 share a picture, up to a little noise on half of them
        img = base[i % 20].astype(int) + (rng.integers(-3, 4, 192) if i % 2 else 0)
        thumbs[i] = np.clip(img, 0, 255).astype(np.uint8).tobytes()
    thumbs[7] = None
    u = rng.integers(0, 40, 300)
    v = np.where(rng.random(300) < 0.5, (u + 20) % 40, rng.integers(0, 40, 300))
    whole = confirm_by_thumb(thumbs, u, v, 13.0, step=10**6)
    for step in (1, 7, 64):
        got = confirm_by_thumb(thumbs, u, v, 13.0, step=step)
        assert np.array_equal(got[0], whole[0]) and np.array_equal(got[1], whole[1])
    assert 0 < whole[0].size < u.size  # some pairs confirmed, some not
    assert set(np.flatnonzero((u == 7) | (v == 7))) <= {i for i in range(300) if (u[i], v[i]) in set(zip(*whole))}

    # the same read from Arrow buffers (the clean stage's reduce): a null, a short value, chunks
    from tasks.dedup import _ArrowThumbs

    odd = thumbs.copy()
    odd[9] = b"short"
    values = list(odd)
    column = pa.chunked_array([pa.array(values[:13], pa.binary()), pa.array(values[13:], pa.binary())])
    node_rows = np.arange(40)[::-1].copy()  # node i is row 39 - i
    reversed_col = pa.chunked_array([column.combine_chunks().take(pa.array(node_rows))])
    for step in (1, 64):
        assert all(np.array_equal(a, b) for a, b in zip(
            confirm_by_thumb(_ArrowThumbs(reversed_col, node_rows), u, v, 13.0, step=step),
            confirm_by_thumb(odd, u, v, 13.0, step=step), strict=True))
    full = _ArrowThumbs(column, np.arange(40))
    ok = np.array([i for i in range(40) if i not in (7, 9)])
    flat, has = full.matrix(ok)
    assert has.all() and np.array_equal(flat, np.stack([np.frombuffer(thumbs[i], np.uint8) for i in ok]))
    for empty in (pa.nulls(4), pa.nulls(4, pa.binary())):  # a column without any thumbnail
        flat, has = _ArrowThumbs(pa.chunked_array([empty]), np.arange(4)).matrix(np.arange(4))
        assert flat.shape == (4, 192) and not has.any()

    # pairs marked known (one pixel group) are kept without their thumbnails being read
    known = np.zeros(u.size, dtype=bool)
    known[::3] = True
    kept = confirm_by_thumb(thumbs, u, v, 13.0, known=known)
    confirmed = set(zip(*whole))  # a decision depends on the pair only
    expected = known | np.array([(a, b) in confirmed for a, b in zip(u, v, strict=True)])
    assert not expected.all() and np.array_equal(kept[0], u[expected]) and np.array_equal(kept[1], v[expected])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["single", "leader"]), st.booleans())
def test_dedup_table_is_dedup_manifest_over_arrow(seed, linkage, use_dhash):
    """The clean reduce's Arrow path (no pandas, no Python object per row) decides exactly
    what the DataFrame path decides: same status, reason and added columns, row by row;
    with rows dropped earlier, shared pixel hashes, thumbnails and placeholders."""
    from carflow.imagehash import THUMB_SIDE
    from tasks.dedup import COLUMNS, dedup_table

    rng = np.random.default_rng(seed)
    pictures = [rng.integers(0, 256, 3 * THUMB_SIDE**2, dtype=np.uint8).tobytes() for _ in range(3)]
    rows, first = [], {}
    for _ in range(40):
        centre = int(rng.integers(0, 3))
        h = flip([BASE, FAR, BASE ^ 0xFFFF][centre], *rng.choice(64, rng.integers(0, 4), replace=False))
        image_id = f"i{int(rng.integers(0, 25)):02d}"
        r = row(image_id, f"L{int(rng.integers(0, 12))}", phash=h, first_seen=int(rng.integers(0, 5)),
                width=int(rng.choice([320, 640])), height=480, label=rng.choice(["a", "b", None]),
                pixel_hash=rng.choice([f"px-{image_id}", "px-shared", None]),
                thumb=rng.choice([pictures[centre], pictures[(centre + 1) % 3], None]),
                status=rng.choice(["kept", "kept", "kept", "dropped"]))
        r["reason"] = "blurry" if r["status"] == "dropped" else None
        first.setdefault(image_id, {k: r[k] for k in ("phash", "width", "pixel_hash", "thumb")})
        r.update(first[image_id])  # one image: one set of hashes
        r["dhash"] = r["phash"]
        rows.append(r)
    rows = list({(r["image_id"], r["listing_id"]): r for r in rows}.values())  # (listing, image) unique
    df = frame(rows)
    cfg = DedupSettings(placeholder_min_listings=5, linkage=linkage, use_dhash=use_dhash)
    want = dedup_manifest(df, cfg)
    got = dedup_table(pa.Table.from_pandas(df, preserve_index=False), cfg).to_pandas()
    for col in ("status", "reason", *COLUMNS):
        a = want[col].astype(object).where(want[col].notna(), None).tolist()
        b = got[col].astype(object).where(got[col].notna(), None).tolist()
        assert a == b, col


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.sampled_from(["p1", "p2", "p3", "px9"])), max_size=6), max_size=4))
def test_value_codes_are_equal_exactly_where_the_values_are(chunks):
    """The pixel-hash codes the clean reduce hands dedup: equal codes for equal values,
    nulls stay null, on chunked columns, one width (NumPy) or several (Arrow)."""
    from tasks.dedup import value_codes

    col = pa.chunked_array([pa.array(c, pa.string()) for c in chunks], pa.string())
    values, codes = col.to_pylist(), value_codes(col).to_pylist()
    assert len(codes) == len(values)
    for a, ca in zip(values, codes, strict=True):
        assert (a is None) == (ca is None)
        for b, cb in zip(values, codes, strict=True):
            if a is not None and b is not None:
                assert (a == b) == (ca == cb)
