"""The one item schema of the crawl: a listing record (one JSONL line of a feed).

``tasks/ingest.py`` reads these records back from ``listings/<site>/<crawl_id>/part-*.jsonl``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

PhotoStatus = Literal["stored", "known", "rejected"]

#: reasons a photo is never stored
REJECT_REASONS = ("empty", "not_image", "placeholder", "oversized", "download_error")  # plus http_<code>


class PhotoRecord(TypedDict):
    url: str
    #: sha256 of the bytes as served (the storage key is ``raw/<id[:2]>/<id>``); None when rejected
    image_id: str | None
    #: stored: downloaded in this crawl and in storage; known: the URL was stored by an
    #: earlier crawl and not downloaded again; rejected: see ``reason``
    status: PhotoStatus
    reason: str | None
    bytes: int | None
    content_type: str | None


@dataclass
class ListingItem:
    listing_id: str  # "<site>:<site_id>"
    site: str
    site_id: str
    url: str
    title: str | None = None
    price: float | None = None
    currency: str | None = None
    make: str | None = None  # normalised (carflow.labels)
    model: str | None = None
    year: int | None = None
    label: str | None = None  # make_model_year, None when make or model is missing
    make_raw: str | None = None  # as found on the page
    model_raw: str | None = None
    year_raw: str | None = None
    #: raw data: {"jsonld": <the Car/Vehicle/Product node or None>, "html": {field: raw text}, "price_raw": ...}
    attributes: dict[str, Any] = field(default_factory=dict)
    #: absolute photo URLs, de-duplicated: the gallery in page order, then JSON-LD photos it lacks
    image_urls: list[str] = field(default_factory=list)
    images: list[PhotoRecord] = field(default_factory=list)
    crawl_id: str | None = None
    crawled_at: str | None = None  # ISO 8601, UTC

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
