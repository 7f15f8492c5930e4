"""NormalisePipeline: raw page values → price (float), year (int), make/model/label.

The raw strings stay in the item (``make_raw``, ``model_raw``, ``year_raw`` and
``attributes.price_raw``); only the normalised fields are derived here. A listing without
make or model is still recorded (label ``None``) and counted as
``carflow/listing/missing_label``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from carflow.labels import make_label, normalise_make, normalise_model, normalise_year
from spiders.items import ListingItem

CURRENCY_SYMBOLS = {
    "€": "EUR", "eur": "EUR", "euro": "EUR", "euros": "EUR",
    "$": "USD", "us$": "USD", "usd": "USD",
    "£": "GBP", "gbp": "GBP",
    "chf": "CHF", "fr.": "CHF",
    "kr": "SEK", "sek": "SEK", "nok": "NOK", "dkk": "DKK",
    "zł": "PLN", "zl": "PLN", "pln": "PLN",
    "kč": "CZK", "czk": "CZK",
    "¥": "JPY", "jpy": "JPY", "₹": "INR", "inr": "INR",
    "cad": "CAD", "aud": "AUD", "nzd": "NZD", "huf": "HUF", "ft": "HUF", "ron": "RON", "lei": "RON",
}
_NUMBER = re.compile(r"\d[\d\s\u00a0\u202f\u2009.,'’]*")


def parse_price(raw: Any) -> tuple[float | None, str | None]:
    """``"12 345 €"`` → ``(12345.0, "EUR")``; ``"$12,345.50"`` → ``(12345.5, "USD")``;
    ``"12.345,50 EUR"`` → ``(12345.5, "EUR")``; a number passes through; junk → ``(None, None)``."""
    if raw is None or isinstance(raw, bool):
        return None, None
    if isinstance(raw, (int, float)):
        return (float(raw) if raw >= 0 else None), None
    text = str(raw).strip()
    if not text:
        return None, None
    currency = None
    lowered = text.lower()
    for token in sorted(CURRENCY_SYMBOLS, key=len, reverse=True):
        if token.isalpha() or token.endswith("."):
            if re.search(rf"(?<![a-z]){re.escape(token)}(?![a-z])", lowered):
                currency = CURRENCY_SYMBOLS[token]
                break
        elif token in lowered:
            currency = CURRENCY_SYMBOLS[token]
            break
    match = _NUMBER.search(text)
    if not match:
        return None, currency
    number = re.sub(r"[\s\u00a0\u202f\u2009'’]", "", match.group(0)).rstrip(".,")
    if "," in number and "." in number:
        decimal = "," if number.rfind(",") > number.rfind(".") else "."
        thousands = "." if decimal == "," else ","
        number = number.replace(thousands, "").replace(decimal, ".")
    elif "," in number or "." in number:
        sep = "," if "," in number else "."
        parts = number.split(sep)
        if len(parts) == 2 and len(parts[1]) in (1, 2):  # 12345,5 / 12345.50 → decimals
            number = parts[0] + "." + parts[1]
        else:  # 12,345 / 12.345.678 → thousands
            number = "".join(parts)
    try:
        value = float(number)
    except ValueError:
        return None, currency
    return value, currency


def normalise_currency(raw: Any) -> str | None:
    if raw is None:
        return None
    text = str(raw).strip()
    if re.fullmatch(r"[A-Za-z]{3}", text):
        return text.upper()
    return CURRENCY_SYMBOLS.get(text.lower())


def normalise_listing(
    item: ListingItem, make_aliases: Mapping[str, str] | None = None, default_currency: str | None = None
) -> list[str]:
    """Fill the normalised fields of ``item`` in place; return the names of missing fields
    (``label``, ``price``, ``year``, ``title``, ``images``)."""
    item.make = normalise_make(item.make_raw, make_aliases)
    item.model = normalise_model(item.model_raw, item.make)
    item.year = normalise_year(item.year_raw)
    item.label = make_label(item.make, item.model, item.year)
    price_raw = item.attributes.get("price_raw") if isinstance(item.attributes, dict) else None
    price, price_currency = parse_price(price_raw)
    item.price = price
    item.currency = normalise_currency(item.currency) or price_currency or default_currency
    if isinstance(item.title, str):
        item.title = " ".join(item.title.split()) or None
    missing = []
    if item.label is None:
        missing.append("label")
    for name in ("price", "year", "title"):
        if getattr(item, name) is None:
            missing.append(name)
    if not item.image_urls:
        missing.append("images")
    return missing


class NormalisePipeline:
    def __init__(self, crawler):
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler) -> NormalisePipeline:
        return cls(crawler)

    def process_item(self, item: Any) -> Any:
        if not isinstance(item, ListingItem):
            return item
        profile = getattr(self.crawler.spider, "profile", None)
        missing = normalise_listing(
            item,
            make_aliases=getattr(profile, "make_aliases", None),
            default_currency=getattr(profile, "default_currency", None),
        )
        stats = self.crawler.stats
        for name in missing:
            stats.inc_value("carflow/listing/missing_label" if name == "label" else f"carflow/listing/missing/{name}")
        if item.label:
            stats.inc_value("carflow/listing/labelled")
        return item
