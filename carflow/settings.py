"""One typed settings object for every stage.

Sources, highest priority first:
1. keyword arguments to :func:`load_settings`;
2. environment variables with the ``CARFLOW_`` prefix, nested with ``__``
   (``CARFLOW_STORAGE__BACKEND=s3``, ``CARFLOW_CRAWL__USER_AGENT=...``);
3. a YAML file: ``$CARFLOW_CONFIG`` or ``./carflow.yaml`` when present;
4. the defaults below (local storage under ``./data``).

Secrets (``storage.access_key_id`` / ``storage.secret_access_key``) are accepted only
from the environment; a YAML file that holds them is rejected. They are ``SecretStr``
so they never show up in reprs or logs. Without them boto3's normal credential chain
(``AWS_ACCESS_KEY_ID``…, instance roles) applies.

An invalid value raises :class:`SettingsError` naming the setting and its env variable.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "CARFLOW_"
SECRET_FIELDS = {("storage", "access_key_id"), ("storage", "secret_access_key")}


class SettingsError(ValueError):
    """A setting has an invalid value. The message names the setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageSettings(_Section):
    """Where images, manifests and listing feeds live."""

    backend: Literal["local", "s3"] = "local"
    #: local backend: the folder
    root: Path = Path("data")
    #: s3 backend
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None  # MinIO / moto
    region: str | None = None
    max_attempts: int = Field(10, ge=1, le=50)
    create_bucket: bool = False
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> StorageSettings:
        if self.backend == "s3" and not self.bucket:
            raise ValueError("storage.backend is 's3' but storage.bucket is not set (CARFLOW_STORAGE__BUCKET)")
        return self


class CrawlSettings(_Section):
    """Scrapy politeness defaults; a site profile may override some of them."""

    user_agent: str = "carflow/0.1 (+https://example.org/carflow-bot; set CARFLOW_CRAWL__USER_AGENT)"
    obey_robots: bool = True
    autothrottle: bool = True
    autothrottle_target_concurrency: float = Field(2.0, gt=0)
    concurrent_requests: int = Field(16, ge=1, le=1024)
    concurrent_requests_per_domain: int = Field(4, ge=1, le=256)
    download_delay: float = Field(0.25, ge=0)
    download_timeout: int = Field(30, ge=1)
    download_maxsize: int = Field(20 * 1024 * 1024, ge=1024)
    retry_times: int = Field(2, ge=0)
    profiles_dir: Path | None = None


class IngestSettings(_Section):
    """Listing feeds / folder imports → manifest v0."""

    #: rows per shard for the stages downstream of ingest
    shard_size: int = Field(2000, ge=1, le=100_000)
    #: folder layout import: regex on the file stem giving the listing id (group ``listing``)
    listing_regex: str = r"^(?P<listing>[^_]+)_(?:(?P<photo>\d+)_)?"
    #: regex on the class folder name giving make/model/year (named groups; optional year)
    label_regex: str = r"^(?P<make>[^_]+)_(?P<model>.+?)(?:_(?P<year>\d{4}))?$"
    image_extensions: list[str] = Field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"])


class FixSettings(_Section):
    min_bytes: int = Field(100, ge=0)
    max_pixels: int = Field(40_000_000, gt=0)
    min_side: int = Field(64, ge=1)
    min_decoded_fraction: float = Field(0.9, ge=0, le=1)
    jpeg_quality: int = Field(95, ge=50, le=100)


class QualitySettings(_Section):
    dark_threshold: float = Field(0.22, ge=0, le=1)
    light_threshold: float = Field(0.05, ge=0, le=1)
    low_information_threshold: float = Field(0.3, ge=0, le=1)
    blurry_threshold: float = Field(0.3, ge=0, le=1)
    drop: list[str] = Field(default_factory=list, description="checks that drop instead of only flagging")


class DedupSettings(_Section):
    hamming_radius: int = Field(8, ge=0, le=32)
    placeholder_min_listings: int = Field(5, ge=2)


class CarFilterSettings(_Section):
    weights: str = "imagenet"
    threshold: float = Field(0.7, ge=0, le=1)
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(64, ge=1)


class CropSettings(_Section):
    weights: str = "yolov5su.pt"
    conf: float = Field(0.25, ge=0, le=1)
    margin: float = Field(0.05, ge=0, le=1)
    min_side: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)


class ClassesSettings(_Section):
    min_images: int = Field(150, ge=1)
    merge_years: bool = True
    merge_map: Path | None = None
    ignore: list[str] = Field(default_factory=list)
    conflict_policy: Literal["majority", "drop"] = "majority"


class SplitSettings(_Section):
    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    seed: str = "carflow-split-v1"

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitSettings:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1.0, got {total:.4f}")
        return self


class TrainSettings(_Section):
    backbone: str = "efficientnetb1"
    weights: str = "imagenet"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    image_size: int = Field(240, ge=32)


class RuntimeSettings(_Section):
    """How flows run: task runner and where the manifests go."""

    task_runner: Literal["thread", "process", "dask"] = "thread"
    max_workers: int = Field(2, ge=1, le=256)
    dask_address: str | None = None
    manifests_prefix: str = "manifests"


class _YamlSource(PydanticBaseSettingsSource):
    """Reads ``$CARFLOW_CONFIG`` or ``./carflow.yaml``; refuses secrets in the file."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None):
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field, field_name):  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"{self.path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"{self.path}: the top level must be a mapping of sections")
        for section, key in SECRET_FIELDS:
            if isinstance(data.get(section), dict) and key in data[section]:
                env = f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
                raise SettingsError(
                    f"{self.path}: {section}.{key} is a secret and is only read from the environment ({env})"
                )
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    storage: StorageSettings = Field(default_factory=StorageSettings)
    crawl: CrawlSettings = Field(default_factory=CrawlSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    fix: FixSettings = Field(default_factory=FixSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    car_filter: CarFilterSettings = Field(default_factory=CarFilterSettings)
    crop: CropSettings = Field(default_factory=CropSettings)
    classes: ClassesSettings = Field(default_factory=ClassesSettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)

    _config_path: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, _config_path()))

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data with secrets masked (for logs and config.json)."""
        return self.model_dump(mode="json")


def _config_path() -> Path | None:
    explicit = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise SettingsError(f"{ENV_PREFIX}CONFIG points at {path}, which does not exist")
        return path
    default = Path("carflow.yaml")
    return default if default.exists() else None


def _explain(exc: ValidationError) -> SettingsError:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")]
        name = ".".join(loc) or "(settings)"
        env = ENV_PREFIX + "__".join(p.upper() for p in loc) if loc else ""
        value = err.get("input")
        shown = "" if any(s in name for s in ("secret", "access_key")) else f" (got {value!r})"
        lines.append(f"setting {name} [{env}]: {err.get('msg')}{shown}")
    return SettingsError("invalid carflow settings:\n  " + "\n  ".join(lines))


def load_settings(**overrides: Any) -> Settings:
    """Build settings from overrides, the environment and the YAML file."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise _explain(exc) from None


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return load_settings()


def get_settings() -> Settings:
    """The process-wide settings (read once; call :func:`reset_settings` after env changes)."""
    return _cached()


def reset_settings() -> None:
    _cached.cache_clear()
