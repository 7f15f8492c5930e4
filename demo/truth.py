"""What a correct crawl + ingest of a generated demo site must produce, from its ground truth."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

#: planted problems that the crawl must reject (never stored), and the reason it records
CRAWL_REJECTED = {"empty": "empty", "html_as_jpg": "not_image", "http_404": "http_404", "oversized": "oversized"}


def load_ground_truth(site_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(site_dir) / "ground_truth.json").read_text())


def expected_ingest(gt: dict[str, Any]) -> dict[str, Any]:
    """Expected manifest v0 counts: rows are unique (listing, photo bytes) pairs of every
    photo the crawl stores; rejected references are counted per reason."""
    rows: set[tuple[str, str]] = set()
    images: set[str] = set()
    rejected: Counter = Counter()
    for listing in gt["listings"]:
        for photo in listing["photos"]:
            reason = CRAWL_REJECTED.get(photo.get("problem"))
            if reason:
                rejected[reason] += 1
                continue
            rows.add((listing["listing_id"], photo["sha256"]))
            images.add(photo["sha256"])
    return {
        "listings": len(gt["listings"]),
        "labelled_listings": sum(1 for x in gt["listings"] if x.get("label")),
        "rows": len(rows),
        "images": len(images),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "image_ids": images,
        "pairs": rows,
    }


def compare(expected: dict[str, Any], summary: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Mismatching counts as {name: (expected, observed)}; empty when all match."""
    out = {}
    for key in ("listings", "labelled_listings", "rows", "images", "rejected_by_reason"):
        if expected[key] != summary.get(key):
            out[key] = (expected[key], summary.get(key))
    return out
