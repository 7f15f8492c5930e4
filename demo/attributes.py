"""Visible attributes of the rendered demo cars: the multi-label demo task.

Each make/model's look (:data:`demo.render.CAR_STYLES`) fixes a few things anyone can see
in a photo; a car's tags are those of its class, so a multi-label model is trained and
tested on real rendered pixels (``tasks/train.py`` with ``task=multilabel``).

| tag | when |
|---|---|
| ``tall`` | the body is at least 0.4 of its length high (vans, pickups, SUVs) |
| ``contrast_roof`` | the roof has its own colour |
| ``light_body`` | the body colours are light (mean of the palette ≥ 150) |
| ``dark_rims`` | the rims are dark (mean < 100) |
"""

from __future__ import annotations

from demo.render import CAR_STYLES

ATTRIBUTES = ("tall", "contrast_roof", "light_body", "dark_rims")


def car_attributes(class_key: str) -> list[str]:
    """The visible tags of a class: ``make_model`` (the ground truth's ``class_key``) or
    ``make/model``."""
    style = CAR_STYLES[class_key if class_key in CAR_STYLES else class_key.replace("_", "/", 1)]
    tags = []
    if style.aspect >= 0.4:
        tags.append("tall")
    if style.roof is not None:
        tags.append("contrast_roof")
    if sum(sum(c) / 3 for c in style.palette) / len(style.palette) >= 150:
        tags.append("light_body")
    if sum(style.rim) / 3 < 100:
        tags.append("dark_rims")
    return tags
