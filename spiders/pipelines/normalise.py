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
    "r$": "BRL", "brl": "BRL", "c$": "CAD", "ca$": "CAD", "a$": "AUD", "au$": "AUD", "nz$": "NZD",
    "hk$": "HKD", "mx$": "MXN", "mxn": "MXN", "ars": "ARS", "clp": "CLP", "cop": "COP", "s$": "SGD",
    "£": "GBP", "gbp": "GBP",
    "chf": "CHF", "fr.": "CHF",
    "kr": "SEK", "kr.": "DKK", "sek": "SEK", "nok": "NOK", "dkk": "DKK",
    "zł": "PLN", "zl": "PLN", "pln": "PLN",
    "kč": "CZK", "czk": "CZK",
    "¥": "JPY", "jpy": "JPY", "cny": "CNY", "₹": "INR", "inr": "INR",
    "₽": "RUB", "₺": "TRY", "try": "TRY", "₩": "KRW", "₪": "ILS", "₴": "UAH", "₱": "PHP",
    "cad": "CAD", "aud": "AUD", "nzd": "NZD", "huf": "HUF", "ft": "HUF", "ron": "RON", "lei": "RON",
    "zar": "ZAR",
}
#: symbols several currencies write the same way: a profile's ``currency`` in the family
#: says which one the site means (``$`` on a Mexican site is MXN); else the mapping above
AMBIGUOUS_SYMBOLS: dict[str, frozenset[str]] = {
    "$": frozenset({"USD", "MXN", "ARS", "CLP", "COP", "CAD", "AUD", "NZD", "SGD", "HKD", "TWD", "UYU",
                    "DOP", "BSD", "BBD", "JMD", "TTD", "NAD", "FJD", "LRD", "BND"}),
    "kr": frozenset({"SEK", "NOK", "DKK", "ISK"}),
    "kr.": frozenset({"DKK", "SEK", "NOK", "ISK"}),
    "¥": frozenset({"JPY", "CNY"}),
    "£": frozenset({"GBP", "EGP", "GIP", "FKP", "SHP", "LBP", "SYP"}),
    "fr.": frozenset({"CHF", "XOF", "XAF", "XPF"}),
}


def _symbol_currency(token: str, site_currency: str | None) -> str:
    family = AMBIGUOUS_SYMBOLS.get(token)
    if family and site_currency in family:
        return site_currency
    return CURRENCY_SYMBOLS[token]

# one number: digit groups with one thousands separator used throughout (12.345 /
# 12,345 / 12 345 with a space, no-break or thin space / 12'345 / 12’345), Indian
# grouping (12,34,567), or plain digits; then optional decimals (1 or 2 digits)
_NUMBER = re.compile(
    r"(?<![\d.,])"
    r"(?P<int>\d{1,3}(?P<sep>[.,'’\u00a0\u202f\u2009 ])\d{3}(?:(?P=sep)\d{3})*"
    r"|\d{1,2}(?:,\d{2})+,\d{3}"
    r"|\d+)"
    r"(?:[.,](?P<dec>\d{1,2}))?(?![\d])"
)
#: a number followed by one of these is not a price (engine size, mileage, power...)
_UNIT = re.compile(
    r"\s*(?:km|kms|mi|miles|cc|ccm|cm3|cm³|l\b|litres?|liters?|hp|bhp|ps|cv|kw|mpg|kg|%|"
    r"doors?|seats?|owners?|months?|yrs?|years?)(?![a-z])",
    re.IGNORECASE,
)


def _currency_tokens(text: str, site_currency: str | None) -> list[tuple[int, int, str]]:
    """(start, end, ISO code) of each currency token in ``text``."""
    lowered = text.lower()
    found: list[tuple[int, int, str]] = []
    taken = [False] * len(lowered)
    for token in sorted(CURRENCY_SYMBOLS, key=len, reverse=True):
        if token[0].isalpha():
            pattern = rf"(?<![a-z]){re.escape(token)}(?![a-z])"
        else:
            pattern = re.escape(token)
        for m in re.finditer(pattern, lowered):
            if any(taken[m.start():m.end()]):
                continue  # part of a longer token ("r$" before "$")
            for i in range(m.start(), m.end()):
                taken[i] = True
            found.append((m.start(), m.end(), _symbol_currency(token, site_currency)))
    return sorted(found)


def _number_value(m: re.Match[str]) -> float:
    whole = re.sub(r"\D", "", m.group("int"))
    dec = m.group("dec")
    return float(f"{whole}.{dec}" if dec else whole)


def parse_price(raw: Any, site_currency: str | None = None) -> tuple[float | None, str | None]:
    """``"12 345 €"`` → ``(12345.0, "EUR")``; ``"$12,345.50"`` → ``(12345.5, "USD")``;
    ``"12.345,50 EUR"`` → ``(12345.5, "EUR")``; ``"CHF 1'250.-"`` → ``(1250.0, "CHF")``;
    a number passes through; junk → ``(None, None)``.

    Several numbers (a title: ``"Ford Focus 1.6 Titanium 2010 – $ 4.500"``): the one next
    to the currency wins. A number followed by a unit (``km``, ``cc``, ``hp``…) is never
    a price; without a currency, years and engine sizes are skipped too, and more than one number left
    is no price (a wrong price is worse than a missing one). ``site_currency`` (the
    profile's ``currency``) is what an ambiguous symbol (``$``, ``kr``, ``¥``) means."""
    if raw is None or isinstance(raw, bool):
        return None, None
    if isinstance(raw, (int, float)):
        return (float(raw) if raw >= 0 else None), None
    text = str(raw).strip()
    if not text:
        return None, None
    tokens = _currency_tokens(text, site_currency)
    currency = tokens[0][2] if tokens else None
    numbers = [m for m in _NUMBER.finditer(text) if not _UNIT.match(text, m.end())]
    if not numbers:
        return None, currency
    if tokens:
        def gap(m: re.Match[str]) -> tuple[int, int]:
            dist = min(max(t_start - m.end(), m.start() - t_end, 0) for t_start, t_end, _c in tokens)
            return dist, -len(m.group(0))

        best = min(numbers, key=gap)
        nearest = min(tokens, key=lambda t: max(t[0] - best.end(), best.start() - t[1], 0))
        return _number_value(best), nearest[2]
    if len(numbers) > 1:
        # years (2010) and engine sizes (1.6) are what titles hold besides the price
        numbers = [m for m in numbers if not re.fullmatch(r"(19|20)\d\d|\d[.,]\d", m.group(0))]
    if len(numbers) != 1:  # "1.6 TSI 2 3" without a currency: no way to tell, no price
        return None, None
    return _number_value(numbers[0]), None


def normalise_currency(raw: Any, site_currency: str | None = None) -> str | None:
    if raw is None:
        return None
    text = str(raw).strip()
    if re.fullmatch(r"[A-Za-z]{3}", text):
        return text.upper()
    if text.lower() in CURRENCY_SYMBOLS:
        return _symbol_currency(text.lower(), site_currency)
    return None


def normalise_listing(
    item: ListingItem, make_aliases: Mapping[str, str] | None = None, site_currency: str | None = None
) -> list[str]:
    """Fill the normalised fields of ``item`` in place; return the names of missing fields
    (``label``, ``price``, ``year``, ``title``, ``images``)."""
    item.make = normalise_make(item.make_raw, make_aliases)
    item.model = normalise_model(item.model_raw, item.make)
    item.year = normalise_year(item.year_raw)
    item.label = make_label(item.make, item.model, item.year)
    price_raw = item.attributes.get("price_raw") if isinstance(item.attributes, dict) else None
    price, price_currency = parse_price(price_raw, site_currency)
    item.price = price
    item.currency = normalise_currency(item.currency, site_currency) or price_currency or site_currency
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
            site_currency=getattr(profile, "currency", None),
        )
        stats = self.crawler.stats
        for name in missing:
            stats.inc_value("carflow/listing/missing_label" if name == "label" else f"carflow/listing/missing/{name}")
        if item.label:
            stats.inc_value("carflow/listing/labelled")
        return item
