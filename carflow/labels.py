"""Make/model label normalisation.

Raw strings from listing pages vary ("VW", " Volkswagen ", "Mercedes", "Mercedes-Benz").
Normalisation lowercases, trims, turns inner whitespace/underscores into ``-`` and maps
makes through an alias table. The raw strings are always kept next to the normalised
ones by the callers; this module never loses them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: raw make (already lowercased/trimmed/hyphenated) -> canonical make
MAKE_ALIASES: dict[str, str] = {
    "vw": "volkswagen",
    "volkswagen": "volkswagen",
    "mercedes": "mercedes-benz",
    "mercedes-benz": "mercedes-benz",
    "mercedesbenz": "mercedes-benz",
    "merc": "mercedes-benz",
    "mb": "mercedes-benz",
    "bmw": "bmw",
    "chevy": "chevrolet",
    "alfa": "alfa-romeo",
    "land-rover": "land-rover",
    "landrover": "land-rover",
    "rolls": "rolls-royce",
    "citroën": "citroen",
    "škoda": "skoda",
}

_SPACES = re.compile(r"[\s_]+")
_JUNK = re.compile(r"[^\w\-.+]")


def _clean(raw: str | None) -> str | None:
    if raw is None:
        return None
    text = _SPACES.sub("-", str(raw).strip().lower())
    text = _JUNK.sub("", text).strip("-")
    text = re.sub(r"-{2,}", "-", text)
    return text or None


def normalise_make(raw: str | None, aliases: Mapping[str, str] | None = None) -> str | None:
    """``" VW "`` → ``volkswagen``; ``"Mercedes Benz"`` → ``mercedes-benz``."""
    text = _clean(raw)
    if text is None:
        return None
    table = {**MAKE_ALIASES, **{_clean(k) or k: v for k, v in (aliases or {}).items()}}
    return table.get(text, table.get(text.replace("-", ""), text))


def normalise_model(raw: str | None, make: str | None = None) -> str | None:
    """``" C Class "`` → ``c-class``. A model string that repeats the make is stripped of it."""
    text = _clean(raw)
    if text is None:
        return None
    if make and text.startswith(make + "-") and len(text) > len(make) + 1:
        text = text[len(make) + 1 :]
    return text


def normalise_year(raw: object) -> int | None:
    """First 4-digit year between 1900 and 2100 in the value, else None."""
    if raw is None:
        return None
    if isinstance(raw, int):
        return raw if 1900 <= raw <= 2100 else None
    match = re.search(r"(19|20)\d{2}", str(raw))
    return int(match.group(0)) if match else None


def make_label(make: str | None, model: str | None, year: int | None = None) -> str | None:
    """``volkswagen_golf_2017``; without a year ``volkswagen_golf``; None if make/model missing."""
    if not make or not model:
        return None
    return f"{make}_{model}_{year}" if year else f"{make}_{model}"


def split_label(label: str) -> dict[str, str | int | None]:
    """The inverse of :func:`make_label`: ``volkswagen_golf_2017`` → ``{"make": "volkswagen",
    "model": "golf", "year": 2017}``. Normalised makes and models never hold ``_``, so the
    make is the text before the first ``_`` and a trailing ``_YYYY`` is the year."""
    make, _, rest = str(label).partition("_")
    year: int | None = None
    head, _, tail = rest.rpartition("_")
    if head and re.fullmatch(r"(19|20)\d{2}", tail):
        rest, year = head, int(tail)
    return {"make": make or None, "model": rest or None, "year": year}
