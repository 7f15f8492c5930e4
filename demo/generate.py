"""Build the deterministic synthetic demo marketplace and its ground truth.

:func:`generate_site` writes a static site (HTML pages, photos, ``robots.txt``) into a
folder that :class:`demo.server.DemoSite` serves over HTTP, plus
``ground_truth.json``: for every listing its true make/model/year label and for every photo
reference what the photo really is. Everything is drawn from ``random.Random(seed)`` and
``numpy.random.default_rng((seed, photo_uid))``: the same seed and parameters give
byte-identical files (on the same Pillow/libjpeg build).

Site layout (root-relative URLs)::

    /robots.txt                 User-agent: * / Disallow: /private/
    /index.html                 → /search/page-1.html
    /search/page-N.html         a.listing-link per result; a.next[rel=next] except on the last
                                page; page 1 also links a robots-disallowed /private/ listing
                                and an off-domain listing (both a.listing-link)
    /listing/demo-NNNN.html     one listing: JSON-LD (~75 %), h1.title, dl.specs
                                (dd.make / dd.model / dd.year), span.price, div.gallery img
    /img/<hex>.(jpg|png|gif)    photos;  /cdn/<hex>.jpg: a mirror of a few of them
    /private/...                exists, but a polite crawler never asks for it

Gallery ``<img>`` tags name their photo, in rotation, by ``src``, by ``data-src`` (``src``
being a 1×1 ``data:`` placeholder) or by ``srcset="<url> <width>w"`` (``src`` a
placeholder again). The JSON-LD ``image`` holds only the first one or two photos, and where
a photo has a CDN mirror the JSON-LD names the mirror: the crawler has to merge both sources
and will see that photo under two URLs with identical bytes (``alt_urls`` in the truth).

Planted problems (the ``problem`` of a photo reference; ``null`` = a clean car photo):

=================  ======================================================================
``interior``       seats — not an exterior car photo (``is_car`` false)
``dashboard``      gauges and steering wheel (``is_car`` false)
``wheel``          rim close-up (``is_car`` false)
``text_banner``    text on a coloured card (``is_car`` false)
``dealer_banner``  ONE banner (same URL, same bytes) in ≥ 6 listings
``exact_duplicate`` a car photo whose bytes are also another listing's photo (new URL);
                   ``duplicate_of`` = sha256 of the original
``near_duplicate`` an original re-encoded at another quality and/or resized, in another
                   listing; ``duplicate_of`` = sha256 of the original
``truncated``      JPEG cut to ``kept_fraction`` (0.85 and 0.4) of its bytes
``empty``          0-byte ``.jpg``
``html_as_jpg``    an HTML error page saved as ``.jpg``
``cmyk``           CMYK JPEG
``palette``        P-mode PNG
``rgba``           RGBA PNG, car on a transparent background
``exif_rotated``   JPEG stored on its side with EXIF Orientation 6 (bbox/size: upright)
``animated``       2-frame GIF, first frame a car
``tiny``           24×18 JPEG
``bomb``           valid 1-bit PNG declaring 20000×20000 px, ~50 KB on disk
``http_404``       an ``<img>`` whose URL the server does not have (``sha256`` null)
``oversized``      a > 1.5 MB photo (the demo crawl profile caps downloads at 1 MB)
``studio``         a press/dealer studio shot: the car side-on, centred, on plain white, in
                   the same pose as the other half of its ``studio_pair`` (a car of another
                   class, preferably the same or a similar body): different cars whose grey
                   silhouettes hash alike; dedup must keep both (``is_car`` true)
=================  ======================================================================

One listing (``problem: "missing_label"``) shows neither make nor model, so its label is null.

Label problems (``label_problems=True``, the default and what ``make demo`` serves; recorded
under ``label_problems`` in the ground truth), for the evaluation's finders to find:

* **mislabelled**: ``max(2, n_listings // 25)`` listings that the seller labels as the
  site's second class (their page, title and label say so) show cars of the first class
  (``images``: every car photo whose look is not its listing's class, duplicates included);
* **look-alike**: with ≥ 4 classes, the last class is drawn with the second-to-last class's
  look (same silhouette, colours and wheels), so no model can tell the two apart. Its
  ``studio`` shots are the exception: a studio pair is two *different* cars in one pose
  (paired by their silhouettes), so each half keeps its own class's look.

They draw from their own ``random.Random``, so every other photo, listing and count is the
same with them on or off.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from demo import render as R

try:  # the project's label normaliser, when present
    from carflow.labels import make_label as _make_label
    from carflow.labels import normalise_make as _normalise_make
    from carflow.labels import normalise_model as _normalise_model
except ImportError:  # pragma: no cover - fallback with the documented rule
    _ALIASES = {"vw": "volkswagen", "volkswagen": "volkswagen", "mercedes": "mercedes-benz",
                "mercedes-benz": "mercedes-benz", "merc": "mercedes-benz", "bmw": "bmw"}

    def _normalise(raw: str | None) -> str | None:
        if raw is None:
            return None
        import re

        text = re.sub(r"[\s_]+", "-", raw.strip().lower())
        return text or None

    def _normalise_make(raw: str | None) -> str | None:  # type: ignore[misc]
        text = _normalise(raw)
        return None if text is None else _ALIASES.get(text, text)

    def _normalise_model(raw: str | None, make: str | None = None) -> str | None:  # type: ignore[misc]
        return _normalise(raw)

    def _make_label(make: str | None, model: str | None, year: int | None = None) -> str | None:  # type: ignore[misc]
        if not make or not model:
            return None
        return f"{make}_{model}_{year}" if year else f"{make}_{model}"


SITE = "demo"
GENERATOR_VERSION = 1
MIN_LISTINGS = 8
BOMB_SIZE = (20000, 20000)
OVERSIZED_SIZE = (1200, 900)
TINY_SIZE = (24, 18)
#: a valid 1×1 transparent GIF: the lazy-loading placeholder in ``src``
PLACEHOLDER = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
MANAGED_DIRS = ("img", "cdn", "listing", "search", "private")
#: every photo problem the generator plants (each at least once)
PHOTO_PROBLEMS = (
    "interior", "dashboard", "wheel", "text_banner", "dealer_banner", "exact_duplicate",
    "near_duplicate", "truncated", "empty", "html_as_jpg", "cmyk", "palette", "rgba",
    "exif_rotated", "animated", "tiny", "bomb", "http_404", "oversized", "studio",
)
#: body pairs whose side-on silhouettes are closest, best first (studio pairs pick from these)
_STUDIO_BODIES = (("sedan", "sedan"), ("hatch", "hatch"), ("suv", "suv"), ("hatch", "estate"),
                  ("estate", "suv"), ("sedan", "estate"), ("hatch", "suv"), ("hatch", "sedan"))
NON_CAR_KINDS = ("interior", "dashboard", "wheel", "text_banner")


# ---------------------------------------------------------------------------------------
# Classes
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassSpec:
    """One make/model of the catalogue: canonical names, how pages spell them, trims."""

    make: str
    model: str
    display: str
    make_raws: tuple[str, ...]
    model_raws: tuple[str, ...]
    first_year: int
    trims: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.make}/{self.model}"


#: the fixed catalogue; ``generate_site(n_classes=k)`` uses the first k (ordered so that even
#: small k mixes body types and spellings that need normalising: VW, Mercedes, BMW).
CATALOG: tuple[ClassSpec, ...] = (
    ClassSpec("volkswagen", "golf", "Volkswagen Golf", ("VW", "Volkswagen", "  volkswagen ", "VOLKSWAGEN"),
              ("Golf", "golf", "GOLF "), 2012, ("1.6 TDI Comfortline", "1.4 TSI Highline", "GTI", "1.0 TSI Life")),
    ClassSpec("mercedes-benz", "v-class", "Mercedes-Benz V-Class", ("Mercedes", "Mercedes-Benz", "mercedes benz", "Merc"),
              ("V-Class", "V Class", "v-class"), 2014, ("V 250 d Avantgarde", "V 220 d Edition", "V 300 d AMG Line")),
    ClassSpec("ford", "ranger", "Ford Ranger", ("Ford", "FORD", " ford"), ("Ranger", "RANGER"), 2013,
              ("2.0 EcoBlue Wildtrak", "3.2 TDCi XLT", "2.2 TDCi Limited")),
    ClassSpec("bmw", "3-series", "BMW 3 Series", ("BMW", "bmw", " Bmw "), ("3 Series", "3-Series", "3 series"), 2012,
              ("320d Sport", "318i SE", "330e M Sport")),
    ClassSpec("toyota", "rav4", "Toyota RAV4", ("Toyota", "TOYOTA"), ("RAV4", "Rav4"), 2013,
              ("2.5 Hybrid Design", "2.0 VVT-i Icon", "2.5 Hybrid Excel AWD")),
    ClassSpec("volkswagen", "passat", "Volkswagen Passat", ("Volkswagen", "VW", "vw"), ("Passat", "PASSAT"), 2012,
              ("Variant 2.0 TDI Elegance", "Variant 1.5 TSI Business", "Variant GTE")),
    ClassSpec("mercedes-benz", "c-class", "Mercedes-Benz C-Class", ("Mercedes-Benz", "Mercedes", "MERCEDES-BENZ"),
              ("C-Class", "C Class", "c class"), 2013, ("C 220 d AMG Line", "C 200 Avantgarde", "C 300 e")),
    ClassSpec("audi", "a4", "Audi A4", ("Audi", "AUDI"), ("A4", "a4"), 2012, ("2.0 TDI S line", "35 TFSI Sport")),
    ClassSpec("toyota", "corolla", "Toyota Corolla", ("Toyota", "toyota"), ("Corolla", "COROLLA"), 2013,
              ("1.8 Hybrid Icon", "1.2T Design", "2.0 Hybrid GR Sport")),
    ClassSpec("bmw", "x5", "BMW X5", ("BMW", "Bmw"), ("X5", "x5"), 2013, ("xDrive30d M Sport", "xDrive45e", "xDrive40i")),
)


# ---------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Photo:
    """One photo *file* (or, for ``http_404``, one missing URL) and what is true about it.

    A photo may be referenced by several listings (only the dealer banner is)."""

    uid: int
    kind: str  # car | interior | dashboard | wheel | text_banner | banner | other
    problem: str | None
    name: str
    ext: str
    class_key: str | None = None  # make/model whose look a car photo has
    source: Photo | None = None  # original of an exact/near duplicate
    variant: dict[str, Any] = field(default_factory=dict)
    alt_url: str | None = None  # /cdn/ mirror, named by the listing's JSON-LD
    # filled in by rendering
    data: bytes | None = None
    bbox: tuple[int, int, int, int] | None = None
    width: int | None = None
    height: int | None = None
    fmt: str | None = None
    mode: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"/img/{self.name}.{self.ext}"

    @property
    def is_car(self) -> bool:
        return self.kind == "car"

    @property
    def sha256(self) -> str | None:
        return None if self.data is None else hashlib.sha256(self.data).hexdigest()


@dataclass(eq=False)
class Listing:
    """One listing page and its true label."""

    index: int
    spec: ClassSpec
    year: int
    price: int
    trim: str
    make_raw: str | None
    model_raw: str | None
    has_jsonld: bool
    jsonld_variant: int = 0
    problem: str | None = None
    photos: list[Photo] = field(default_factory=list)

    @property
    def site_id(self) -> str:
        return f"{SITE}-{self.index:04d}"

    @property
    def url(self) -> str:
        return f"/listing/{self.site_id}.html"

    @property
    def title(self) -> str:
        if self.problem == "missing_label":
            return "Well maintained family car – full service history"
        return f"{self.spec.display} {self.trim}"

    @property
    def make(self) -> str | None:
        return _normalise_make(self.make_raw) if self.make_raw else None

    @property
    def model(self) -> str | None:
        return _normalise_model(self.model_raw, self.make) if self.model_raw else None

    @property
    def label(self) -> str | None:
        return _make_label(self.make, self.model, self.year)


def _counts(n: int) -> dict[str, int]:
    """How many of each planted problem a site of ``n`` listings gets."""
    return {
        "non_car_each": max(3, n // 12),
        "banner_listings": max(6, n // 6),
        "exact_duplicate": max(3, n // 15),
        "near_duplicate": max(3, n // 15),
        "truncated": max(2, n // 30),
        "single": max(1, n // 60),
        "cdn": max(2, n // 20),
        "studio_pairs": max(1, n // 30),
    }


class _Planner:
    """Decides, from ``random.Random(seed)`` alone, every listing and every photo slot."""

    def __init__(self, seed: int, n_listings: int, n_classes: int):
        self.rnd = random.Random(seed)
        self.n = n_listings
        self.classes = list(CATALOG[:n_classes])
        self.years = {c.key: sorted(self.rnd.sample(range(c.first_year, c.first_year + 9), self.rnd.choice((2, 3))))
                      for c in self.classes}
        self.photos: list[Photo] = []
        self.names: set[str] = set()

    def name(self) -> str:
        while True:
            name = f"{self.rnd.getrandbits(48):012x}"
            if name not in self.names:
                self.names.add(name)
                return name

    def photo(self, kind: str, problem: str | None, ext: str = "jpg", **kw: Any) -> Photo:
        p = Photo(uid=len(self.photos), kind=kind, problem=problem, name=self.name(), ext=ext, **kw)
        self.photos.append(p)
        return p

    def listings(self) -> list[Listing]:
        rnd = self.rnd
        order = [self.classes[i % len(self.classes)] for i in range(self.n)]
        rnd.shuffle(order)
        missing = rnd.randrange(1, self.n)
        make_i: Counter[str] = Counter()
        model_i: Counter[str] = Counter()
        out = []
        jsonld_seen = 0
        for i, spec in enumerate(order):
            year = rnd.choice(self.years[spec.key])
            price = rnd.randrange(40, 480) * 100 - rnd.choice((0, 0, 10, 100, 510))
            price += (year - spec.first_year) * 900
            has_jsonld = rnd.random() < 0.75 and i != missing
            lst = Listing(index=i + 1, spec=spec, year=year, price=price, trim=rnd.choice(spec.trims),
                          make_raw=None, model_raw=None, has_jsonld=has_jsonld)
            if i == missing:
                lst.problem = "missing_label"
            else:
                lst.make_raw = spec.make_raws[make_i[spec.key] % len(spec.make_raws)]
                lst.model_raw = spec.model_raws[model_i[spec.key] % len(spec.model_raws)]
                make_i[spec.key] += 1
                model_i[spec.key] += 1
            if has_jsonld:
                lst.jsonld_variant = jsonld_seen
                jsonld_seen += 1
            out.append(lst)
        # enough JSON-LD listings to host the CDN mirrors
        need = _counts(self.n)["cdn"]
        for lst in out:
            if jsonld_seen >= need:
                break
            if not lst.has_jsonld and lst.problem is None:
                lst.has_jsonld, lst.jsonld_variant = True, jsonld_seen
                jsonld_seen += 1
        for lst in out:
            for _ in range(rnd.randint(3, 6)):
                lst.photos.append(self.photo("car", None, class_key=lst.spec.key))
        return out

    def more_listings(self, k: int, seed: int, start: int) -> list[Listing]:
        """``k`` listings that appear later (a night with more listings): indexes after
        ``start``, clean labelled listings of 3-6 car photos, from their own
        ``random.Random``, so every earlier listing, photo and byte stays the same."""
        rnd = random.Random(f"new-listings-{seed}")
        make_i: Counter[str] = Counter()
        out = []
        for i in range(k):
            spec = self.classes[rnd.randrange(len(self.classes))]
            year = rnd.choice(self.years[spec.key])
            lst = Listing(index=start + i + 1, spec=spec, year=year, price=rnd.randrange(40, 480) * 100,
                          trim=rnd.choice(spec.trims), make_raw=spec.make_raws[make_i[spec.key] % len(spec.make_raws)],
                          model_raw=spec.model_raws[make_i[spec.key] % len(spec.model_raws)],
                          has_jsonld=rnd.random() < 0.75)
            make_i[spec.key] += 1
            for _ in range(rnd.randint(3, 6)):
                lst.photos.append(self._new_photo(rnd, "car", class_key=spec.key))
            out.append(lst)
        return out

    def _new_photo(self, rnd: random.Random, kind: str, **kw: Any) -> Photo:
        while True:
            name = f"{rnd.getrandbits(48):012x}"
            if name not in self.names:
                self.names.add(name)
                break
        p = Photo(uid=len(self.photos), kind=kind, problem=None, name=name, ext="jpg", **kw)
        self.photos.append(p)
        return p

    def insert(self, lst: Listing, photo: Photo) -> None:
        """Insert at a random position after the first photo (which stays a clean car)."""
        lst.photos.insert(self.rnd.randint(1, len(lst.photos)), photo)

    def plant(self, listings: list[Listing]) -> None:
        rnd, c = self.rnd, _counts(self.n)
        pick = lambda: listings[rnd.randrange(len(listings))]  # noqa: E731
        for kind in NON_CAR_KINDS:
            for _ in range(c["non_car_each"]):
                self.insert(pick(), self.photo(kind, kind))
        banner = self.photo("banner", "dealer_banner")
        for i in sorted(rnd.sample(range(len(listings)), c["banner_listings"])):
            self.insert(listings[i], banner)
        # car photos of the listing's own class, badly encoded
        one = c["single"]
        for problem, ext, n in (("cmyk", "jpg", one), ("palette", "png", one), ("rgba", "png", one),
                                ("exif_rotated", "jpg", one), ("animated", "gif", one), ("tiny", "jpg", one),
                                ("truncated", "jpg", c["truncated"]), ("oversized", "png", one)):
            for k in range(n):
                lst = pick()
                variant = {"kept_fraction": (0.85, 0.4)[k % 2]} if problem == "truncated" else {}
                self.insert(lst, self.photo("car", problem, ext, class_key=lst.spec.key, variant=variant))
        # not images at all, a bomb, and a dead link
        for problem, ext in (("empty", "jpg"), ("html_as_jpg", "jpg"), ("bomb", "png"), ("http_404", "jpg")):
            for _ in range(c["single"]):
                self.insert(pick(), self.photo("other", problem, ext))
        # duplicates: a clean car photo of listing A reappears in listing B (same label if possible)
        used: set[int] = set()
        sources = [(lst, p) for lst in listings for p in lst.photos[1:] if p.kind == "car" and p.problem is None]
        rnd.shuffle(sources)
        near_variants = ({"scale": 0.9, "quality": 75}, {"scale": 1.0, "quality": 60}, {"scale": 0.8, "quality": 88})
        plan = ["exact_duplicate"] * c["exact_duplicate"] + ["near_duplicate"] * c["near_duplicate"]
        for k, problem in enumerate(plan):
            while sources and sources[-1][1].uid in used:
                sources.pop()
            a, src = sources.pop()
            used.add(src.uid)
            others = [b for b in listings if b is not a and b.problem is None]
            same = [b for b in others if b.label == a.label] or [b for b in others if b.spec is a.spec] or others
            target = same[rnd.randrange(len(same))]
            variant = near_variants[k % len(near_variants)] if problem == "near_duplicate" else {}
            self.insert(target, self.photo("car", problem, "jpg", class_key=src.class_key, source=src, variant=variant))
        # CDN mirrors: the first photo of some JSON-LD listings is also served under /cdn/
        hosts = [lst for lst in listings if lst.has_jsonld and lst.photos[0].uid not in used]
        for lst in sorted(rnd.sample(hosts, min(c["cdn"], len(hosts))), key=lambda x: x.index):
            lst.photos[0].alt_url = f"/cdn/{lst.photos[0].name}.jpg"
        # studio pairs: two different cars in one studio pose, in two listings of two classes
        by_class: dict[str, list[Listing]] = {}
        for lst in listings:
            if lst.problem is None:
                by_class.setdefault(lst.spec.key, []).append(lst)
        keys = [k for k in by_class]
        bodies = {k: R.CAR_STYLES[k].body for k in keys}
        rank = {frozenset(b) if b[0] != b[1] else frozenset((b[0], b[0] + "*")): i for i, b in enumerate(_STUDIO_BODIES)}

        def closeness(a: str, b: str) -> int:
            pair = frozenset((bodies[a], bodies[b])) if bodies[a] != bodies[b] else frozenset((bodies[a], bodies[a] + "*"))
            return rank.get(pair, len(rank))

        class_pairs = sorted(((a, b) for i, a in enumerate(keys) for b in keys[i + 1:]),
                             key=lambda ab: (closeness(*ab), keys.index(ab[0]), keys.index(ab[1])))
        class_pairs = class_pairs or [(k, k) for k in keys]  # a one-class site: two cars of that class
        for k in range(c["studio_pairs"]):
            if not class_pairs:
                break
            a_key, b_key = class_pairs[k % len(class_pairs)]
            for key in (a_key, b_key):
                lst = by_class[key][rnd.randrange(len(by_class[key]))]
                self.insert(lst, self.photo("car", "studio", "jpg", class_key=key, variant={"pair": k}))


# ---------------------------------------------------------------------------------------
# Label problems: mislabelled listings and a look-alike pair (for the evaluation's finders)
# ---------------------------------------------------------------------------------------
def plant_label_problems(seed: int, classes: list[ClassSpec], listings: list[Listing]) -> dict[str, str]:
    """Make some listings of ``classes[1]`` show cars of ``classes[0]`` (their car photos'
    ``class_key`` becomes ``classes[0]``: what the car really is) and return the look-alike
    map (``{last class: second-to-last class}`` with ≥ 4 classes) for :func:`_render`.
    Draws from its own generator, so the rest of the plan does not change."""
    if len(classes) < 2:
        return {}
    rnd = random.Random(f"mislabelled-listings-{seed}")
    true, shown = classes[0], classes[1]
    candidates = [lst for lst in listings if lst.spec is shown and lst.problem is None]
    n = min(max(2, len(listings) // 25), max(0, len(candidates) - 2))
    for lst in rnd.sample(candidates, n):
        for p in lst.photos:
            if p.kind == "car":
                p.class_key = true.key
    return {classes[-1].key: classes[-2].key} if len(classes) >= 4 else {}


def _label_problem_truth(listings: list[Listing], looks: dict[str, str]) -> dict[str, Any]:
    def key(k: str) -> str:
        return k.replace("/", "_")

    pairs = {(lst.spec.key, p.class_key) for lst in listings for p in lst.photos
             if p.is_car and p.class_key and p.class_key != lst.spec.key}
    mislabelled_listings = sorted({f"{SITE}:{lst.site_id}" for lst in listings for p in lst.photos
                                   if p.is_car and p.class_key != lst.spec.key and p.source is None})
    images = sorted({p.sha256 for lst in listings for p in lst.photos
                     if p.is_car and p.class_key != lst.spec.key and p.sha256})
    shown, true = next(iter(pairs)) if pairs else (None, None)
    return {
        "mislabelled": {
            "true_class": key(true) if true else None,
            "labelled_as": key(shown) if shown else None,
            "listings": mislabelled_listings,
            "images": images,
        },
        "look_alike": ({"classes": sorted(key(k) for kv in looks.items() for k in kv),
                        "drawn_as": key(next(iter(looks.values())))} if looks else None),
    }


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------
def _scale_box(box: tuple[int, int, int, int], sx: float, sy: float, w: int, h: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (max(0, int(np.floor(x0 * sx))), max(0, int(np.floor(y0 * sy))),
            min(w, int(np.ceil(x1 * sx))), min(h, int(np.ceil(y1 * sy))))


def _render(p: Photo, seed: int, size: tuple[int, int], looks: dict[str, str] | None = None) -> None:
    """Fill in ``p.data`` and what is true about it (bbox, size, format, mode). ``looks``
    maps a class key to the class whose look its cars are drawn with (look-alikes)."""
    rng = np.random.default_rng((seed, p.uid))
    w, h = size
    style = R.CAR_STYLES.get((looks or {}).get(p.class_key or "", p.class_key or ""))

    def car(sz: tuple[int, int] = size, **kw: Any) -> R.Rendered:
        assert style is not None
        return R.render_car(style, sz, rng, **kw)

    def q() -> int:
        return int(rng.integers(85, 93))

    prob = p.problem
    if p.kind in NON_CAR_KINDS:
        if p.kind == "text_banner":
            img = R.render_text_banner(size, rng, R.BANNER_TEXTS[int(rng.integers(len(R.BANNER_TEXTS)))])
        else:
            img = {"interior": R.render_interior, "dashboard": R.render_dashboard,
                   "wheel": R.render_wheel}[p.kind](size, rng)
        p.data, p.fmt, p.mode, (p.width, p.height) = R.jpeg(img, q()), "jpeg", "RGB", size
    elif p.kind == "banner":
        p.data, p.fmt, p.mode, (p.width, p.height) = R.jpeg(R.render_dealer_banner(size), 90), "jpeg", "RGB", size
    elif prob in (None, "truncated", "cmyk", "tiny"):
        r = car()
        p.bbox, (p.width, p.height), p.fmt, p.mode = r.bbox, size, "jpeg", "RGB"
        if prob == "cmyk":
            p.data, p.mode = R.jpeg(r.image.convert("CMYK"), q()), "CMYK"
        elif prob == "tiny":
            tw, th = TINY_SIZE
            p.data = R.jpeg(r.image.resize(TINY_SIZE, Image.Resampling.LANCZOS), 90)
            p.bbox, p.width, p.height = _scale_box(r.bbox, tw / w, th / h, tw, th), tw, th
        else:
            p.data = R.jpeg(r.image, q())
            if prob == "truncated":
                frac = float(p.variant["kept_fraction"])
                p.extra["kept_fraction"] = frac
                p.extra["original_size_bytes"] = len(p.data)
                p.data = p.data[: int(len(p.data) * frac)]
    elif prob == "studio":
        pair = int(p.variant["pair"])
        # each half shows its own class's car, look-alikes included: drawn with the other
        # class's look, a pair of the two look-alike classes would be one car (a true near
        # duplicate) and a look-alike's silhouette would no longer be the one it was paired by
        own = R.CAR_STYLES[p.class_key or ""]
        r = R.render_studio(own, size, rng, frac=0.8 - 0.1 * (pair % 3))  # pairs differ in scale
        p.data = R.jpeg(r.image, q())
        p.bbox, (p.width, p.height), p.fmt, p.mode = r.bbox, size, "jpeg", "RGB"
        p.extra["studio_pair"] = pair
    elif prob == "palette":
        r = car()
        p.data = R.encode(r.image.quantize(64, method=Image.Quantize.FASTOCTREE), "PNG")
        p.bbox, (p.width, p.height), p.fmt, p.mode = r.bbox, size, "png", "P"
    elif prob == "rgba":
        r = car(transparent=True)
        p.data = R.encode(r.image, "PNG")
        p.bbox, (p.width, p.height), p.fmt, p.mode = r.bbox, size, "png", "RGBA"
    elif prob == "exif_rotated":
        r = car()
        p.data = R.exif_orientation_jpeg(r.image, q())
        p.bbox, (p.width, p.height), p.fmt, p.mode = r.bbox, size, "jpeg", "RGB"
        p.extra.update(exif_orientation=6, stored_size=[h, w])
    elif prob == "animated":
        r1, r2 = car(), car()
        p.data = R.animated_gif([r1.image, r2.image])
        p.bbox, (p.width, p.height), p.fmt, p.mode = r1.bbox, size, "gif", "P"
        p.extra["n_frames"] = 2
    elif prob == "oversized":
        r = car(OVERSIZED_SIZE, noise=(22.0, 26.0))
        p.data = R.encode(r.image, "PNG", compress_level=1)
        p.bbox, (p.width, p.height), p.fmt, p.mode = r.bbox, OVERSIZED_SIZE, "png", "RGB"
    elif prob == "bomb":
        p.data = R.bomb_png(*BOMB_SIZE)
        (p.width, p.height), p.fmt, p.mode = BOMB_SIZE, "png", "1"
        p.extra["declared_pixels"] = BOMB_SIZE[0] * BOMB_SIZE[1]
    elif prob == "empty":
        p.data = b""
    elif prob == "html_as_jpg":
        p.data, p.fmt = R.html_error_page(), "html"
    elif prob == "http_404":
        p.data = None
    elif prob == "exact_duplicate":
        src = p.source
        assert src is not None and src.data is not None
        p.data, p.bbox, p.width, p.height, p.fmt, p.mode = src.data, src.bbox, src.width, src.height, src.fmt, src.mode
    elif prob == "near_duplicate":
        src = p.source
        assert src is not None and src.data is not None and src.bbox is not None
        img = Image.open(io.BytesIO(src.data)).convert("RGB")
        scale, quality = float(p.variant["scale"]), int(p.variant["quality"])
        nw, nh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        p.data = R.jpeg(img, quality)
        assert src.width and src.height
        p.bbox = _scale_box(src.bbox, nw / src.width, nh / src.height, nw, nh)
        p.width, p.height, p.fmt, p.mode = nw, nh, "jpeg", "RGB"
        p.extra.update(scale=scale, quality=quality)
    else:  # pragma: no cover
        raise ValueError(f"unknown photo {p.kind}/{prob}")


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------
def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _price_text(price: int) -> str:
    return f"{price:,}".replace(",", " ") + " €"


def _page(title: str, body: str, head: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)} | Demo Motors</title>\n{head}</head>\n<body>\n"
        "<header class=\"site-header\"><a class=\"logo\" href=\"/\">Demo Motors</a>\n"
        "<nav><a href=\"/search/page-1.html\">All cars</a> <a href=\"/about.html\">About</a></nav></header>\n"
        f"{body}\n"
        "<footer><p>&copy; Demo Motors — a synthetic marketplace for testing crawlers.</p></footer>\n"
        "</body>\n</html>\n"
    )


def _img_tag(url: str, width: int | None, style: int, alt: str) -> str:
    """The three ways galleries name a photo: src, lazy data-src, srcset."""
    if style == 0:
        return f'<img src="{_e(url)}" alt="{_e(alt)}">'
    if style == 1:
        return f'<img class="lazy" src="{PLACEHOLDER}" data-src="{_e(url)}" alt="{_e(alt)}">'
    return (f'<img src="{PLACEHOLDER}" srcset="{_e(url)} {width or 640}w" '
            f'sizes="(max-width: 640px) 100vw, 640px" alt="{_e(alt)}">')


def _jsonld(lst: Listing) -> str:
    """schema.org JSON-LD, varied the way real sites vary it (type, brand shape, image shape)."""
    v = lst.jsonld_variant
    types = ("Car", "Car", "Vehicle", "Car", "Product", "Car", "Vehicle")
    n_img = 1 if v % 4 == 2 else 2
    urls = [p.alt_url or p.url for p in lst.photos[:n_img]]
    image: Any
    if v % 4 == 2:
        image = urls[0]
    elif v % 5 == 3:
        image = [{"@type": "ImageObject", "contentUrl": u} for u in urls]
    else:
        image = urls
    brand: Any = lst.make_raw if v % 3 == 1 else {"@type": "Brand", "name": lst.make_raw}
    price: Any = lst.price if v % 2 else str(lst.price)
    doc = {
        "@context": "https://schema.org",
        "@type": types[v % len(types)],
        "name": lst.title,
        "brand": brand,
        "model": lst.model_raw,
        "vehicleModelDate": str(lst.year),
        "offers": {"@type": "Offer", "price": price, "priceCurrency": "EUR"},
        "image": image,
    }
    return ('<script type="application/ld+json">' + json.dumps(doc, ensure_ascii=False).replace("</", "<\\/")
            + "</script>\n")


def _listing_html(lst: Listing) -> str:
    head = f'<link rel="canonical" href="{lst.url}">\n' + (_jsonld(lst) if lst.has_jsonld else "")
    if lst.problem == "missing_label":
        specs = (f'<dl class="specs"><dt>Make</dt><dd class="make"></dd>'
                 f'<dt>Year</dt><dd class="year">{lst.year}</dd></dl>')
    else:
        specs = (f'<dl class="specs"><dt>Make</dt><dd class="make">{_e(lst.make_raw or "")}</dd>'
                 f'<dt>Model</dt><dd class="model">{_e(lst.model_raw or "")}</dd>'
                 f'<dt>Year</dt><dd class="year">{lst.year}</dd>'
                 f'<dt>Trim</dt><dd class="trim">{_e(lst.trim)}</dd></dl>')
    imgs = "\n".join(
        "  " + _img_tag(p.url, p.width, (lst.index + k) % 3, f"Photo {k + 1} of {len(lst.photos)}")
        for k, p in enumerate(lst.photos))
    body = (
        f'<main class="listing" data-listing-id="{lst.site_id}">\n'
        f'<nav class="breadcrumbs"><a href="/">Home</a> › <a href="/search/page-1.html">Cars</a></nav>\n'
        f'<h1 class="title">{_e(lst.title)}</h1>\n'
        f'<p class="price-box">Price: <span class="price">{_price_text(lst.price)}</span></p>\n'
        f"{specs}\n"
        f'<div class="gallery">\n{imgs}\n</div>\n'
        f'<section class="description"><h2>Description</h2><p>{_e(lst.title)}, first registered {lst.year}. '
        "Two keys, MOT until next spring, viewing by appointment.</p></section>\n"
        '<aside class="seller"><h2>Seller</h2><p>Autohaus Mustermann, Musterstadt</p></aside>\n'
        "</main>"
    )
    return _page(lst.title, body, head)


def _search_html(page: int, n_pages: int, items: list[Listing], extra: str) -> str:
    rows = "\n".join(
        f'  <li class="result"><a class="listing-link" href="{lst.url}">{_e(lst.title)}</a> '
        f'<span class="result-year">{lst.year}</span> <span class="result-price">{_price_text(lst.price)}</span></li>'
        for lst in items)
    nav = []
    if page > 1:
        nav.append(f'<a class="prev" rel="prev" href="/search/page-{page - 1}.html">Previous</a>')
    nav += [f'<a class="page" href="/search/page-{k}.html">{k}</a>' if k != page else f'<span class="current">{k}</span>'
            for k in range(1, n_pages + 1)]
    if page < n_pages:
        nav.append(f'<a class="next" rel="next" href="/search/page-{page + 1}.html">Next</a>')
    body = (f'<main class="search"><h1>Used cars — page {page} of {n_pages}</h1>\n{extra}'
            f'<ol class="results">\n{rows}\n</ol>\n<nav class="pagination">{" ".join(nav)}</nav></main>')
    return _page(f"Used cars, page {page}", body)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def generate_site(out_dir: str | Path, *, seed: int = 0, n_listings: int = 60, n_classes: int = 6,
                  image_size: tuple[int, int] = (320, 240), listings_per_page: int = 10,
                  label_problems: bool = True, new_listings: int = 0) -> dict[str, Any]:
    """Write the demo marketplace into ``out_dir`` and return its ground truth (also written
    to ``out_dir/ground_truth.json``). Deterministic: same arguments, same bytes.

    ``new_listings``: that many more clean listings (3-6 car photos each) that "appeared
    since", appended after the ``n_listings`` (on the last search pages); every earlier
    listing and photo keeps its bytes, so a crawl of the extended site finds only the new
    ones new (the nightly's "10% more listings").

    ``label_problems`` plants mislabelled listings and a look-alike pair of classes (see the
    module docstring); off, the site is the same but for those photos.

    Files left in the site's own folders (``img/``, ``cdn/``, ``listing/``, ``search/``,
    ``private/``) by an earlier generation with other parameters are removed.
    """
    if n_listings < MIN_LISTINGS:
        raise ValueError(f"n_listings must be at least {MIN_LISTINGS} (the dealer banner alone needs 6 listings)")
    if not 1 <= n_classes <= len(CATALOG):
        raise ValueError(f"n_classes must be between 1 and {len(CATALOG)}")
    if listings_per_page < 1:
        raise ValueError("listings_per_page must be >= 1")
    size = (int(image_size[0]), int(image_size[1]))
    if size[0] < 64 or size[1] < 48:
        raise ValueError("image_size must be at least 64x48")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    planner = _Planner(seed, n_listings, n_classes)
    listings = planner.listings()
    looks = plant_label_problems(seed, planner.classes, listings) if label_problems else None
    planner.plant(listings)
    # the robots-disallowed listing: a page and one photo, never to be requested
    private_photo = planner.photo("car", None, class_key=planner.classes[0].key)
    if new_listings:
        listings += planner.more_listings(new_listings, seed, len(listings))

    originals = [p for p in planner.photos if p.source is None]
    for p in originals + [p for p in planner.photos if p.source is not None]:
        _render(p, seed, size, looks)

    files: dict[str, bytes] = {}

    def put(path: str, data: bytes | str) -> None:
        files[path.lstrip("/")] = data.encode() if isinstance(data, str) else data

    put("robots.txt", "User-agent: *\nDisallow: /private/\n")
    for p in planner.photos:
        if p.data is None or p is private_photo:
            continue
        put(p.url, p.data)
        if p.alt_url:
            put(p.alt_url, p.data)
    private_img = f"/private/img/{private_photo.name}.jpg"
    private_page = "/private/listing/demo-private-0001.html"
    assert private_photo.data is not None
    put(private_img, private_photo.data)
    put(private_page, _page("Staff only: trade-in before preparation",
                            '<main class="listing"><h1 class="title">Trade-in, not yet for sale</h1>'
                            '<dl class="specs"><dt>Make</dt><dd class="make">Volkswagen</dd></dl>'
                            f'<div class="gallery"><img src="{private_img}" alt="trade-in"></div></main>'))
    for lst in listings:
        put(lst.url, _listing_html(lst))

    n_pages = (len(listings) + listings_per_page - 1) // listings_per_page
    extra1 = ('<aside class="sponsored"><h2>Sponsored</h2><ul>\n'
              f'  <li><a class="listing-link" href="{private_page}">Trade-in preview (staff)</a></li>\n'
              '  <li><a class="listing-link" href="http://offsite.invalid/listing/x.html">'
              "Partner offer on another site</a></li>\n</ul></aside>\n")
    search_pages = []
    for page in range(1, n_pages + 1):
        items = listings[(page - 1) * listings_per_page: page * listings_per_page]
        put(f"search/page-{page}.html", _search_html(page, n_pages, items, extra1 if page == 1 else ""))
        search_pages.append(f"/search/page-{page}.html")
    put("index.html", _page("Demo Motors", '<main><h1>Demo Motors</h1><p><a class="browse" '
                                           'href="/search/page-1.html">Browse all used cars</a></p></main>'))
    put("about.html", _page("About", "<main><h1>About</h1><p>A synthetic marketplace.</p></main>"))

    truth = _ground_truth(seed, n_listings, n_classes, size, listings_per_page, planner, listings,
                          [private_page, private_img], search_pages)
    truth["params"]["new_listings"] = new_listings
    if looks is not None:
        truth["label_problems"] = _label_problem_truth(listings, looks)
    put("ground_truth.json", json.dumps(truth, indent=1, ensure_ascii=False) + "\n")
    _write(out, files)
    return truth


def _photo_truth(p: Photo) -> dict[str, Any]:
    src = p.source
    d: dict[str, Any] = {
        "url": p.url,
        "alt_urls": [p.alt_url] if p.alt_url else [],
        "sha256": p.sha256,
        "size_bytes": None if p.data is None else len(p.data),
        "is_car": p.is_car,
        "bbox": list(p.bbox) if p.is_car and p.bbox else None,
        "width": p.width,
        "height": p.height,
        "kind": p.kind,
        "problem": p.problem,
        "duplicate_of": src.sha256 if src is not None else None,
        "class_key": p.class_key.replace("/", "_") if p.is_car and p.class_key else None,
        "format": p.fmt,
        "mode": p.mode,
    }
    if src is not None:
        d["duplicate_of_url"] = src.url
    d.update(p.extra)
    return d


def _ground_truth(seed: int, n_listings: int, n_classes: int, size: tuple[int, int], per_page: int,
                  planner: _Planner, listings: list[Listing], private: list[str],
                  search_pages: list[str]) -> dict[str, Any]:
    out_listings = []
    by_problem: Counter[str] = Counter()
    shas: set[str] = set()
    refs = clean = 0
    for lst in listings:
        photos = [_photo_truth(p) for p in lst.photos]
        for ph in photos:
            refs += 1
            if ph["problem"]:
                by_problem[ph["problem"]] += 1
            elif ph["is_car"]:
                clean += 1
            if ph["sha256"]:
                shas.add(ph["sha256"])
        out_listings.append({
            "site_id": lst.site_id,
            "listing_id": f"{SITE}:{lst.site_id}",
            "url": lst.url,
            "title": lst.title,
            "make_raw": lst.make_raw,
            "model_raw": lst.model_raw,
            "year": lst.year,
            "make": lst.make,
            "model": lst.model,
            "label": lst.label,
            "class_key": lst.spec.key.replace("/", "_"),
            "price": lst.price,
            "currency": "EUR",
            "has_jsonld": lst.has_jsonld,
            "search_page": (lst.index - 1) // per_page + 1,
            "problem": lst.problem,
            "photos": photos,
        })
    labels = sorted({x["label"] for x in out_listings if x["label"]})
    return {
        "seed": seed,
        "params": {"n_listings": n_listings, "n_classes": n_classes, "image_size": list(size),
                   "listings_per_page": per_page},
        "site": SITE,
        "generator_version": GENERATOR_VERSION,
        "classes": [{"make": c.make, "model": c.model, "years": planner.years[c.key]} for c in planner.classes],
        "labels": labels,
        "listings": out_listings,
        "search_pages": search_pages,
        "robots_disallowed": ["/private/"],
        "private_urls": private,
        "offsite_urls": ["http://offsite.invalid/listing/x.html"],
        "counts": {
            "listings": len(out_listings),
            "labelled_listings": sum(1 for x in out_listings if x["label"]),
            "photo_refs": refs,
            "clean_car_refs": clean,
            "unique_sha256": len(shas),
            "by_problem": dict(sorted(by_problem.items())),
            "listing_problems": dict(Counter(x["problem"] for x in out_listings if x["problem"])),
        },
    }


def _write(out: Path, files: dict[str, bytes]) -> None:
    """Write every file (unchanged ones are left alone) and drop stale files from the site's
    own folders."""
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    keep = {str(Path(r)) for r in files}
    for top in MANAGED_DIRS:
        root = out / top
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):
            rel = str(path.relative_to(out))
            if path.is_file() and rel not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                shutil.rmtree(path)


__all__: list[str] = ["CATALOG", "PHOTO_PROBLEMS", "ClassSpec", "generate_site"]
