"""Site profiles: one YAML file per marketplace, validated with pydantic.

A profile says where a crawl starts, which links are listings and which is the next
search page, how to read the fields a page does not carry as JSON-LD, how to turn a
listing URL into the site's own listing id (so known listings are skipped without being
fetched), politeness overrides and extra make aliases. ``spiders/profiles/TEMPLATE.yaml``
documents every key.

``{base_url}`` in ``start_urls`` / ``allowed_domains`` is replaced by the ``base_url``
spider argument (or the profile's own ``base_url``). ``allowed_domains`` defaults to the
host names of the start URLs.

A bad profile raises :class:`ProfileError`; its message names the file and each bad
field as a dotted path (``fields.price: ...``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlsplit, urlunsplit

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from carflow.errors import UserError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

#: politeness keys a profile may override → the Scrapy setting each one sets
POLITENESS_SETTINGS: dict[str, str] = {
    "user_agent": "USER_AGENT",
    "obey_robots": "ROBOTSTXT_OBEY",
    "autothrottle": "AUTOTHROTTLE_ENABLED",
    "autothrottle_target_concurrency": "AUTOTHROTTLE_TARGET_CONCURRENCY",
    "concurrent_requests": "CONCURRENT_REQUESTS",
    "concurrent_requests_per_domain": "CONCURRENT_REQUESTS_PER_DOMAIN",
    "download_delay": "DOWNLOAD_DELAY",
    "download_timeout": "DOWNLOAD_TIMEOUT",
    "download_maxsize": "DOWNLOAD_MAXSIZE",
    "retry_times": "RETRY_TIMES",
}


#: where lazy-loading scripts keep a photo's URL (srcset variants first: their largest
#: candidate), then ``src`` (often a placeholder GIF while the page loads) and ``href``
DEFAULT_IMAGE_ATTRIBUTES = (
    "srcset", "data-srcset", "data-lazy-srcset", "data-src", "data-lazy-src", "data-lazy", "data-original",
    "data-url", "src", "href",
)


class ProfileError(UserError, ValueError):
    """A site profile is missing or invalid; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_css(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError("empty selector")
    from parsel import Selector

    try:
        Selector(text="<html></html>").css(value)
    except Exception as exc:  # cssselect raises several error types
        raise ValueError(f"not a valid CSS selector {value!r}: {exc}") from None
    return value


class FieldSelectors(_Model):
    """CSS selectors (parsel, ``::text`` / ``::attr(x)`` allowed) used when a field is not
    in the page's JSON-LD. The first non-empty match wins."""

    title: str | None = None
    make: str | None = None
    model: str | None = None
    year: str | None = None
    price: str | None = None
    currency: str | None = None
    #: selector of the photo *elements* (``<img>``/``<source>``); URLs are read from
    #: ``image_attributes`` of each element (srcset → its largest candidate)
    images: str | None = None

    @field_validator("title", "make", "model", "year", "price", "currency", "images")
    @classmethod
    def _css(cls, v: str | None) -> str | None:
        return _check_css(v)


class Politeness(_Model):
    """Overrides of the ``crawl`` settings for this site (``None`` keeps the default)."""

    user_agent: str | None = None
    obey_robots: bool | None = None
    autothrottle: bool | None = None
    autothrottle_target_concurrency: float | None = Field(None, gt=0)
    concurrent_requests: int | None = Field(None, ge=1, le=1024)
    concurrent_requests_per_domain: int | None = Field(None, ge=1, le=256)
    download_delay: float | None = Field(None, ge=0)
    download_timeout: int | None = Field(None, ge=1)
    download_maxsize: int | None = Field(None, ge=1024)
    retry_times: int | None = Field(None, ge=0)

    def scrapy_settings(self) -> dict[str, Any]:
        return {
            POLITENESS_SETTINGS[k]: v for k, v in self.model_dump().items() if v is not None
        }


class SiteProfile(_Model):
    #: site name: the ``<site>`` of ``listing_id = <site>:<site id>`` and of storage keys
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    #: default for the ``base_url`` spider argument
    base_url: str | None = None
    start_urls: list[str] = Field(min_length=1)
    allowed_domains: list[str] = Field(default_factory=list)
    #: CSS selector of listing links on a search page (an ``href`` is taken from ``<a>``)
    listing_links: str
    #: CSS selector of the next search page link
    pagination: str | None = None
    #: regex searched in a listing URL; group ``id`` (or group 1) is the site's listing id
    listing_id_regex: str
    #: read schema.org Car/Vehicle/Product JSON-LD first (selectors are the fallback)
    use_jsonld: bool = True
    fields: FieldSelectors = Field(default_factory=FieldSelectors)
    #: attributes of a photo element holding its URL, in order of preference
    image_attributes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IMAGE_ATTRIBUTES)
    )
    #: the site's currency (ISO 4217): what an ambiguous symbol in a price means (``$``
    #: is USD, MXN, ARS, CAD…; ``kr`` SEK, NOK, DKK; ``¥`` JPY, CNY) and the currency of
    #: a price that names none. An ISO code on the page (JSON-LD ``priceCurrency``) wins.
    #: ``default_currency`` is its old name.
    currency: str | None = Field(
        None, min_length=3, max_length=3, validation_alias=AliasChoices("currency", "default_currency")
    )
    #: extra raw make → canonical make aliases (added to carflow.labels.MAKE_ALIASES)
    make_aliases: dict[str, str] = Field(default_factory=dict)
    politeness: Politeness = Field(default_factory=Politeness)
    #: any other Scrapy setting for this site (e.g. DEFAULT_REQUEST_HEADERS)
    scrapy_settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.isalpha():
            raise ValueError(f"not an ISO 4217 code (three letters, e.g. EUR, USD, MXN): {v!r}")
        return v.upper()

    @property
    def default_currency(self) -> str | None:  # the old name
        return self.currency

    @field_validator("listing_links", "pagination")
    @classmethod
    def _css(cls, v: str | None) -> str | None:
        return _check_css(v)

    @field_validator("listing_id_regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            rx = re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regex {v!r}: {exc}") from None
        if "id" not in rx.groupindex and rx.groups < 1:
            raise ValueError("needs a group: (?P<id>...) or (...) capturing the site's listing id")
        return v

    @field_validator("start_urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            probe = url.replace("{base_url}", "http://example.org")
            if urlparse(probe).scheme not in ("http", "https"):
                raise ValueError(f"not an http(s) URL (or '{{base_url}}/...'): {url!r}")
        return v

    @field_validator("scrapy_settings")
    @classmethod
    def _settings_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
                raise ValueError(f"{key!r} is not a Scrapy setting name (UPPER_CASE)")
        return v

    @model_validator(mode="after")
    def _base_url_needed(self) -> SiteProfile:
        templated = any("{base_url}" in u for u in self.start_urls + self.allowed_domains)
        if templated and self.base_url is not None and urlparse(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        return self

    # -- derived --------------------------------------------------------------------
    @property
    def listing_id_pattern(self) -> re.Pattern[str]:
        return re.compile(self.listing_id_regex)

    def listing_site_id(self, url: str) -> str | None:
        """The site's own listing id from a listing URL, or None when the regex misses.

        The regex sees the URL without its fragment and without the query parameters
        whose value is itself a URL or a path: a login link ``/login?next=/cars/123``
        carries a listing URL but is not a listing. Its own parameters stay
        (``/detail.php?id=123``)."""
        match = self.listing_id_pattern.search(own_url(url))
        if not match:
            return None
        value = match.group("id") if "id" in match.re.groupindex else match.group(1)
        return value or None

    def resolve(self, base_url: str | None = None) -> ResolvedProfile:
        """Fill ``{base_url}`` into the start URLs / allowed domains."""
        base = (base_url or self.base_url or "").rstrip("/")
        needs = any("{base_url}" in u for u in self.start_urls + self.allowed_domains)
        if needs and not base:
            raise ProfileError(
                f"profile {self.name!r}: start_urls use {{base_url}} but no base_url was given "
                "(pass -a base_url=http://host:port or set base_url in the profile)"
            )
        if base and urlparse(base).scheme not in ("http", "https"):
            raise ProfileError(f"base_url must be an http(s) URL, got {base!r}")
        starts = [u.replace("{base_url}", base) for u in self.start_urls]
        domains = []
        for d in self.allowed_domains:
            d = d.replace("{base_url}", base)
            # accept URLs or host:port too; Scrapy wants bare host names
            host = urlparse(d).hostname if "//" in d else d.split(":")[0]
            if host and host not in domains:
                domains.append(host)
        if not domains:
            for u in starts:
                host = urlparse(u).hostname
                if host and host not in domains:
                    domains.append(host)
        return ResolvedProfile(profile=self, base_url=base or None, start_urls=starts, allowed_domains=domains)

    def scrapy_overrides(self) -> dict[str, Any]:
        """Scrapy settings this profile sets (politeness first, raw settings on top)."""
        return {**self.politeness.scrapy_settings(), **self.scrapy_settings}


class ResolvedProfile(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    profile: SiteProfile
    base_url: str | None
    start_urls: list[str]
    allowed_domains: list[str]


def own_url(url: str) -> str:
    """``url`` without its fragment and without query parameters that carry another URL
    or path (``next=``, ``return_to=``, ``redirect=``…)."""
    parts = urlsplit(url)
    if not parts.query:
        return urlunsplit(parts._replace(fragment=""))
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if "/" not in v]
    return urlunsplit(parts._replace(query=urlencode(kept), fragment=""))


def _explain(source: str, exc: ValidationError) -> ProfileError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-"))
        msg = err.get("msg", "")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key (see spiders/profiles/TEMPLATE.yaml)"
        lines.append(f"{loc or '(profile)'}: {msg}")
    return ProfileError(f"invalid site profile {source}:\n  " + "\n  ".join(lines))


def profile_from_dict(data: Any, source: str = "<dict>", default_name: str | None = None) -> SiteProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"invalid site profile {source}: the top level must be a mapping")
    data = dict(data)
    if default_name and "name" not in data:
        data["name"] = default_name
    try:
        return SiteProfile.model_validate(data)
    except ValidationError as exc:
        raise _explain(source, exc) from None


def profile_path(site: str | Path, profiles_dir: str | Path | None = None) -> Path:
    """``demo`` → ``spiders/profiles/demo.yaml`` (or ``profiles_dir``); a path stays a path."""
    text = str(site)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if not path.exists():
            raise ProfileError(f"site profile file {path} does not exist")
        return path
    dirs = [Path(profiles_dir)] if profiles_dir else []
    dirs.append(PROFILES_DIR)
    for d in dirs:
        for ext in (".yaml", ".yml"):
            candidate = d / f"{text}{ext}"
            if candidate.exists():
                return candidate
    known = sorted(p.stem for d in dirs if d.is_dir() for p in d.glob("*.y*ml") if p.stem != "TEMPLATE")
    raise ProfileError(f"no site profile named {text!r} in {', '.join(map(str, dirs))} (known: {', '.join(known) or 'none'})")


def load_profile(site: str | Path, profiles_dir: str | Path | None = None) -> SiteProfile:
    """Load and validate a profile by name or path. Raises :class:`ProfileError`."""
    if profiles_dir is None:
        try:
            from carflow.settings import get_settings

            profiles_dir = get_settings().crawl.profiles_dir
        except Exception:  # settings problems surface elsewhere with their own message
            profiles_dir = None
    path = profile_path(site, profiles_dir)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"site profile {path} is not valid YAML: {exc}") from None
    return profile_from_dict(data, source=str(path), default_name=path.stem)
