"""Ingest: listing feeds (and folder datasets) → image manifest version 0.

Pure functions first, then thin Prefect ``@task`` wrappers.

Two sources end in the same place:
- the crawl writes listing records to ``listings/<site>/<crawl_id>/part-*.jsonl``;
- :func:`import_folder_shard` reads an existing dataset laid out as the seeds laid out
  theirs (``<class folder>/<listing>_<photo>_<uuid>.jpg``, a local path or an ``s3://``
  prefix), stores every photo content-addressed and emits listing records of the same
  shape, which :func:`write_listing_records` saves as a feed.

:func:`build_manifest` then turns all listing records into one row per
(listing, photo), plus a table of photo references that never became an image.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from carflow.caching import shards
from carflow.errors import UserError
from carflow.imageio import IMAGE_FORMATS, sniff
from carflow.keys import feed_part_key, image_key, listings_prefix, manifest_key
from carflow.labels import make_label, normalise_make, normalise_model, normalise_year
from carflow.manifest import (
    INGEST_SCHEMA,
    KEPT,
    REJECTS_SCHEMA,
    count_distinct,
    from_records,
    write_manifest,
)
from carflow.storage import LocalStorage, Storage, open_storage
from tasks.retry import RETRY

STAGE = "ingest"
VERSION = "1"

#: per-photo label fields of a folder import (a listing may sit in two class folders)
_LABEL_FIELDS = ("make", "model", "year", "label", "make_raw", "model_raw")

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
}


# ---------------------------------------------------------------------------------------
# listing feeds
# ---------------------------------------------------------------------------------------
def feed_keys(storage: Storage, sites: list[str] | None = None) -> list[str]:
    """Every listing feed part under ``listings/`` (optionally only some sites)."""
    prefixes = [listings_prefix(s) for s in sites] if sites else [listings_prefix()]
    keys: list[str] = []
    for prefix in prefixes:
        keys.extend(k for k in storage.list(prefix) if k.endswith(".jsonl"))
    return sorted(keys)


def _feed_lines(storage: Storage, keys: list[str], window: int = 4) -> Iterator[tuple[int, int, str]]:
    """``(part number, line number, line)`` of every non-empty line of the parts ``keys``,
    in order, fetched concurrently (S3: one GET per part) with at most ``window`` parts
    held at a time: memory follows the window, not the number of parts."""
    with ThreadPoolExecutor(max_workers=window) as pool:
        pending: deque = deque()
        for part, key in enumerate(keys):
            pending.append(pool.submit(storage.get_text, key))
            if len(pending) >= window:
                yield from _lines(part - len(pending) + 1, pending.popleft().result())
        while pending:
            yield from _lines(len(keys) - len(pending), pending.popleft().result())


def _lines(part: int, text: str) -> Iterator[tuple[int, int, str]]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield part, lineno, line


def _parse(line: str) -> dict | None:
    try:
        rec = json.loads(line)
        rec["listing_id"]  # noqa: B018 - a record must have its id
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return rec


def scan_listing_feeds(storage: Storage, keys: list[str]) -> tuple[dict[str, tuple], Counter]:
    """First pass over the feed parts: which record of each listing wins (the latest
    ``crawled_at``; on a tie the later part and line), and each listing's earliest
    ``crawled_at``. Returns ``{listing_id: (part, line, crawled_at, first_crawled_at)}``
    (no records are kept) and counters (``bad_feed_line``)."""
    stats: Counter = Counter()
    winners: dict[str, tuple] = {}
    for part, lineno, line in _feed_lines(storage, keys):
        rec = _parse(line)
        if rec is None:
            stats["bad_feed_line"] += 1
            continue
        crawled = str(rec.get("crawled_at") or "")
        prev = winners.get(rec["listing_id"])
        first = min((x for x in (crawled, prev[3] if prev else "") if x), default="")
        if prev is None or crawled >= prev[2]:
            winners[rec["listing_id"]] = (part, lineno, crawled, first)
        else:
            winners[rec["listing_id"]] = (*prev[:3], first)
    stats["feed_parts"] = len(keys)
    stats["listings"] = len(winners)
    return winners, stats


def iter_listing_records(storage: Storage, keys: list[str], winners: dict[str, tuple]) -> Iterator[dict]:
    """Second pass: the winning record of each listing, with ``first_crawled_at`` (the
    listing's earliest crawl) set, in feed order."""
    for part, lineno, line in _feed_lines(storage, keys):
        rec = _parse(line)
        if rec is None:
            continue
        win = winners.get(rec["listing_id"])
        if win is not None and win[:2] == (part, lineno):
            rec.setdefault("_feed", f"{keys[part]}:{lineno}")
            rec["first_crawled_at"] = win[3] or None
            yield rec


def read_listing_records(storage: Storage, sites: list[str] | None = None) -> tuple[list[dict], Counter]:
    """Read every listing record; the latest record of a listing wins, and it carries the
    listing's earliest ``crawled_at`` as ``first_crawled_at`` (a re-crawl or re-import
    never moves a photo's ``first_seen`` later).

    A malformed line is counted (``stats['bad_feed_line']``) and skipped, never fatal.
    """
    keys = feed_keys(storage, sites)
    winners, stats = scan_listing_feeds(storage, keys)
    records = sorted(iter_listing_records(storage, keys, winners), key=lambda r: r["listing_id"])
    return records, stats


#: the row order of manifest v0
MANIFEST_ORDER = [("listing_id", "ascending"), ("photo_index", "ascending")]


def build_manifest_from_feeds(
    storage: Storage, sites: list[str] | None = None, batch: int = 2000, *, sort: bool = True
) -> tuple[pa.Table, pa.Table, Counter]:
    """:func:`read_listing_records` + :func:`build_manifest` without holding the records:
    the winning records are turned into Arrow rows ``batch`` at a time, so memory follows
    the manifest's Arrow size, not Python objects per photo. Same rows, same order
    (:data:`MANIFEST_ORDER`); with ``sort=False`` the rows stay in feed order, for a
    writer that sorts as it writes (``write_manifest(order=...)``: no sorted copy)."""
    keys = feed_keys(storage, sites)
    winners, stats = scan_listing_feeds(storage, keys)
    manifests, rejects = [], []
    pending: list[dict] = []

    def flush() -> None:
        m, r, s = build_manifest(pending)
        manifests.append(m)
        rejects.append(r)
        stats.update({k: v for k, v in s.items() if k not in ("rows", "images", "listings", "rejected_refs")})
        pending.clear()

    for rec in iter_listing_records(storage, keys, winners):
        pending.append(rec)
        if len(pending) >= batch:
            flush()
    if pending or not manifests:
        flush()
    manifest = pa.concat_tables(manifests)
    rejected = pa.concat_tables(rejects).sort_by(MANIFEST_ORDER)
    manifests.clear()  # the parts are in the concatenated tables now
    rejects.clear()
    if sort:
        manifest = manifest.sort_by(MANIFEST_ORDER)
    stats["rows"] = manifest.num_rows
    stats["images"] = count_distinct(manifest["image_id"])
    stats["listings"] = len(winners)
    stats["rejected_refs"] = rejected.num_rows
    return manifest, rejected, stats


def _epoch_us(value: Any) -> int:
    if not value:
        return 0
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return 0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1_000_000)


def build_manifest(records: list[dict]) -> tuple[pa.Table, pa.Table, Counter]:
    """Listing records → (manifest v0, rejected photo references, counts).

    One row per (listing, image_id): a photo listed twice in one listing (two URLs with
    the same bytes) is one row; the same photo in two listings is two rows.
    """
    rows: list[dict] = []
    rejects: list[dict] = []
    stats: Counter = Counter()
    for rec in records:
        listing_id = rec["listing_id"]
        site = rec.get("site") or listing_id.split(":", 1)[0]
        make = rec.get("make")
        model = rec.get("model")
        year = rec.get("year")
        label = rec.get("label") or make_label(make, model, year)
        if label is None:
            stats["listing_missing_label"] += 1
        seen: set[str] = set()
        base = _epoch_us(rec.get("first_crawled_at") or rec.get("crawled_at"))
        for index, img in enumerate(rec.get("images") or []):
            image_id = img.get("image_id")
            if not image_id:
                stats[f"rejected:{img.get('reason') or 'unknown'}"] += 1
                rejects.append(
                    {
                        "listing_id": listing_id,
                        "site": site,
                        "url": img.get("url") or "",
                        "photo_index": index,
                        "label": label,
                        "reason": img.get("reason") or "unknown",
                        "crawl_id": rec.get("crawl_id"),
                    }
                )
                continue
            if image_id in seen:
                stats["same_photo_twice_in_listing"] += 1
                continue
            seen.add(image_id)
            own = "label" in img  # a folder import: this photo's own folder labels it
            rows.append(
                {
                    "image_id": image_id,
                    "listing_id": listing_id,
                    "site": site,
                    "url": img.get("url"),
                    "photo_index": index,
                    "make": img.get("make") if own else make,
                    "model": img.get("model") if own else model,
                    "year": img.get("year") if own else year,
                    "label": img.get("label") if own else label,
                    "make_raw": img.get("make_raw") if own else rec.get("make_raw"),
                    "model_raw": img.get("model_raw") if own else rec.get("model_raw"),
                    "raw_key": image_key(image_id),
                    "bytes": int(img.get("bytes") or 0),
                    "content_type": img.get("content_type"),
                    "source": rec.get("source") or "crawl",
                    "crawl_id": rec.get("crawl_id"),
                    "first_seen": base + index,
                    "status": KEPT,
                    "reason": None,
                }
            )
    stats["rows"] = len(rows)
    stats["images"] = len({r["image_id"] for r in rows})
    stats["listings"] = len(records)
    stats["rejected_refs"] = len(rejects)
    return from_records(rows, INGEST_SCHEMA, "ingest manifest"), from_records(rejects, REJECTS_SCHEMA, "rejects"), stats


# ---------------------------------------------------------------------------------------
# folder datasets (the seeds' layout)
# ---------------------------------------------------------------------------------------
def check_folder_dataset(uri: str) -> Storage:
    """The folder dataset at ``uri`` opened as a storage; a local folder that does not
    exist, or an ``s3://`` prefix with nothing under it, is a :class:`UserError`."""
    source = open_storage(uri)
    if isinstance(source, LocalStorage):
        if not source.root.is_dir():
            what = "is not a folder" if source.root.exists() else "does not exist"
            raise UserError(f"folder dataset {source.root} {what}: give the folder of class folders "
                            "(`carflow ingest PATH --layout folders`)")
    elif next(iter(source.list("")), None) is None:
        raise UserError(f"folder dataset {source.uri()} holds no objects: check the bucket and prefix "
                        "(`carflow ingest s3://bucket/prefix --layout folders`)")
    return source


def list_folder_dataset(source: Storage) -> tuple[list[str], Counter]:
    """Keys ``<class>/<file>`` of a folder dataset, whatever their names (a photo named
    ``.jfif`` or without an extension is still a photo: :func:`import_folder_shard`
    decides from the content). Files outside a class folder are counted
    (``skipped_not_in_class_folder``) and skipped."""
    keys, stats = [], Counter()
    for key in source.list(""):
        if len(key.split("/")) < 2:
            stats["skipped_not_in_class_folder"] += 1
            continue
        keys.append(key)
    return keys, stats


def plan_folder_import(keys: list[str], site: str, listing_regex: str, label_regex: str,
                       shard_size: int) -> list[list[str]]:
    """The import shards' keys: whole listings (a listing is never split across two feed
    parts), ``shard_size // 4`` listings a shard, in listing order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(parse_folder_key(key, site, listing_regex, label_regex)["listing_id"], []).append(key)
    return [[k for lid in group for k in groups[lid]] for group in shards(sorted(groups), max(1, shard_size // 4))]


def folder_import_id(uri: str, keys: list[str]) -> str:
    """``import-<12 hex>``: the same folder with the same files gets the same id (its feed
    parts are overwritten, not added). The sha256 of ``json.dumps([uri, *keys])``, fed one
    key at a time: no string of every key is built."""
    h = hashlib.sha256(b"[" + json.dumps(uri).encode())
    for key in keys:
        h.update(b", " + json.dumps(key).encode())
    h.update(b"]")
    return "import-" + h.hexdigest()[:12]


def is_photo(data: bytes, key: str, extensions: list[str]) -> str | None:
    """The format of a folder-dataset file that is a photo, else None.

    The content decides (:func:`carflow.imageio.sniff`): any image format is imported,
    whatever the file is called. A file *named* like an image (``extensions``) is
    imported even when its content is not one, so that the clean stage records it
    (``not_image``, ``truncated``…) instead of it vanishing here; ``"unknown"`` then."""
    fmt = sniff(data)
    if fmt in IMAGE_FORMATS:
        return fmt
    if PurePosixPath(key).suffix.lower() in {e.lower() for e in extensions}:
        return "unknown"
    return None


def parse_folder_key(key: str, site: str, listing_regex: str, label_regex: str) -> dict:
    """``ford_ranger_2017/L123_2_ab12.jpg`` → listing id, photo index and label fields."""
    parts = key.split("/")
    folder, filename = parts[-2], parts[-1]
    stem = PurePosixPath(filename).stem
    out: dict[str, Any] = {"folder": folder, "problems": []}
    m = re.search(listing_regex, stem)
    if m and m.groupdict().get("listing"):
        out["site_id"] = m.group("listing")
        photo = m.groupdict().get("photo")
        out["photo"] = int(photo) if photo and photo.isdigit() else None
    else:
        out["site_id"] = stem
        out["photo"] = None
        out["problems"].append("no_listing_id")
    lm = re.search(label_regex, folder)
    if lm:
        g = lm.groupdict()
        make_raw, model_raw, year_raw = g.get("make"), g.get("model"), g.get("year")
    else:
        make_raw = model_raw = year_raw = None
        out["problems"].append("no_label")
    make = normalise_make(make_raw)
    model = normalise_model(model_raw, make)
    year = normalise_year(year_raw)
    out.update(
        listing_id=f"{site}:{out['site_id']}",
        make_raw=make_raw,
        model_raw=model_raw,
        make=make,
        model=model,
        year=year,
        label=make_label(make, model, year),
    )
    return out


def import_folder_shard(
    source_uri: str,
    keys: list[str],
    dest: Storage,
    site: str,
    listing_regex: str,
    label_regex: str,
    threads: int = 8,
    extensions: list[str] | None = None,
) -> tuple[list[dict], Counter]:
    """Store the photos of one shard content-addressed and return listing records.

    Photos are told from other files by content (:func:`is_photo`); the rest is counted
    as ``skipped_not_image``. Every image entry carries its own folder's label fields,
    so a listing id found under two class folders keeps both labels (counted as
    ``label_conflict_listings`` and listed in the record's ``attributes.folders``); the
    class stage settles it with the dedup conflict policy
    (:func:`tasks.classes.resolve_label_conflicts` by listing)."""
    if extensions is None:
        from carflow.settings import IngestSettings

        extensions = IngestSettings().image_extensions
    source = open_storage(source_uri)
    stats: Counter = Counter()
    now = datetime.now(timezone.utc).isoformat()

    def load(key: str) -> tuple[str, dict | None]:
        try:
            data = source.get(key)
        except Exception as exc:  # noqa: BLE001 - a bad file is data, not a crash
            return key, {"url": source.uri(key), "image_id": None, "status": "rejected", "reason": "read_error",
                         "error": str(exc)[:300]}
        if not data:
            return key, {"url": source.uri(key), "image_id": None, "status": "rejected", "reason": "empty",
                         "bytes": 0}
        fmt = is_photo(data, key, extensions)
        if fmt is None:
            return key, None
        image_id = dest.put_image(data)
        return key, {
            "url": source.uri(key),
            "image_id": image_id,
            "status": "stored",
            "reason": None,
            "bytes": len(data),
            "content_type": CONTENT_TYPES.get(f".{fmt}", f"image/{fmt}" if fmt != "unknown" else "application/octet-stream"),
        }

    with ThreadPoolExecutor(max(1, threads)) as pool:
        loaded = dict(pool.map(load, keys))

    by_listing: dict[str, dict] = {}
    folders: dict[str, set[str]] = {}
    for key in keys:
        img = loaded[key]
        if img is None:
            stats["skipped_not_image"] += 1
            continue
        info = parse_folder_key(key, site, listing_regex, label_regex)
        for p in info["problems"]:
            stats[p] += 1
        rec = by_listing.setdefault(
            info["listing_id"],
            {
                "listing_id": info["listing_id"],
                "site": site,
                "site_id": info["site_id"],
                "url": source.uri(key.rsplit("/", 1)[0]),
                "title": None,
                "price": None,
                "make": info["make"],
                "model": info["model"],
                "year": info["year"],
                "label": info["label"],
                "make_raw": info["make_raw"],
                "model_raw": info["model_raw"],
                "attributes": {"folder": info["folder"]},
                "images": [],
                "source": "folders",
                "crawl_id": None,
                "crawled_at": now,
                "_order": [],
            },
        )
        img.update({f: info[f] for f in _LABEL_FIELDS})  # this photo's own folder
        folders.setdefault(info["listing_id"], set()).add(info["folder"])
        rec["images"].append(img)
        rec["_order"].append(info["photo"] if info["photo"] is not None else 10**6 + len(rec["_order"]))
        stats["stored" if img["image_id"] else f"rejected:{img['reason']}"] += 1
    records = []
    for rec in by_listing.values():
        seen = sorted(folders[rec["listing_id"]])
        if len({img["label"] for img in rec["images"]}) > 1:
            stats["label_conflict_listings"] += 1
            rec["attributes"] = {"folder": rec["attributes"]["folder"], "folders": seen, "label_conflict": True}
        order = rec.pop("_order")
        rec["images"] = [img for _, img in sorted(zip(order, rec["images"]), key=lambda t: (t[0], t[1]["url"]))]
        rec["image_urls"] = [img["url"] for img in rec["images"]]
        records.append(rec)
    return records, stats


def write_listing_records(storage: Storage, site: str, crawl_id: str, records: list[dict], part: int = 0) -> str:
    """Write ``records`` as feed part ``part`` of ``crawl_id``. When that part already
    exists (the same folder imported again), a listing keeps its earlier ``crawled_at``:
    a re-import never makes old photos look new."""
    key = feed_part_key(site, crawl_id, part)
    if storage.exists(key):
        before = {}
        for line in storage.get_text(key).splitlines():
            old = _parse(line) if line.strip() else None
            if old is not None and old.get("crawled_at"):
                before[old["listing_id"]] = str(old["crawled_at"])
        for rec in records:
            earlier = before.get(rec.get("listing_id"))
            if earlier and earlier < str(rec.get("crawled_at") or "~"):
                rec["crawled_at"] = earlier
    storage.put_text(key, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))
    return key


# ---------------------------------------------------------------------------------------
# Prefect task wrappers
# ---------------------------------------------------------------------------------------
@task(name="build-ingest-manifest", **RETRY.io())
def build_ingest_manifest_task(
    storage_uri: str | None, sites: list[str] | None, prefix: str = "manifests"
) -> dict[str, Any]:
    """Every listing feed → ``manifests/ingest/manifest.parquet`` + ``rejects.parquet``,
    written here; returns counts (no rows pass through Prefect)."""
    store = open_storage(storage_uri)
    manifest, rejects, stats = build_manifest_from_feeds(store, sites, sort=False)
    reasons = pc.value_counts(rejects["reason"]).to_pylist() if rejects.num_rows else []
    order = pc.sort_indices(manifest, sort_keys=MANIFEST_ORDER)  # written in order, never sorted in memory
    return {
        "manifest": write_manifest(store, manifest_key("ingest", prefix=prefix), manifest, INGEST_SCHEMA,
                                   order=order),
        "rejects": write_manifest(store, manifest_key("ingest", "rejects", prefix=prefix), rejects, REJECTS_SCHEMA),
        "rows": manifest.num_rows,
        "labels": pc.count_distinct(manifest["label"]).as_py(),
        "rejected_by_reason": dict(sorted((r["values"], r["counts"]) for r in reasons)),
        "stats": dict(stats),
    }


@task(name="import-folder-shard", **RETRY.io())
def import_folder_shard_task(
    source_uri: str, keys: list[str], storage_uri: str | None, site: str, listing_regex: str, label_regex: str,
    import_id: str, part: int, extensions: list[str] | None = None,
) -> dict[str, Any]:
    """Store one shard's photos and write its listing records as feed part ``part`` of
    ``import_id``; returns the part's key and counters (the records stay in storage)."""
    store = open_storage(storage_uri)
    records, stats = import_folder_shard(source_uri, keys, store, site, listing_regex, label_regex,
                                         extensions=extensions)
    return {"key": write_listing_records(store, site, import_id, records, part), "stats": dict(stats)}
