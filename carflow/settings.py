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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
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
    """What the fixer keeps, and how it re-encodes."""

    #: smaller files are ``empty`` (0-byte files always are)
    min_bytes: int = Field(100, ge=0)
    #: declared width*height above this is ``too_large`` (refused from the header)
    max_pixels: int = Field(40_000_000, gt=0)
    #: shortest side below this is ``too_small``
    min_side: int = Field(64, ge=1)
    #: a truncated JPEG is kept (cropped, re-encoded) when at least this share of rows decoded
    min_decoded_fraction: float = Field(0.9, ge=0, le=1)
    #: quality of re-encoded JPEGs
    jpeg_quality: int = Field(95, ge=1, le=100)
    #: formats that are decoded; other recognised images are ``unsupported_format``
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["jpeg", "png", "webp", "gif", "bmp"]
    )
    #: the small decode for checks and hashes (JPEG draft scale 1/2–1/8) keeps the short
    #: side ≥ this and the long side ≥ twice this: 640x480 decodes at 1/8 (80x60)
    check_size: int = Field(32, ge=16, le=1024)
    #: keep progressive JPEGs as they are (they decode everywhere); False re-encodes them baseline
    keep_progressive: bool = True

    @field_validator("allowed_formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        out = [f.strip().lower().lstrip(".") for f in v]
        out = ["jpeg" if f == "jpg" else "tiff" if f == "tif" else f for f in out]
        from carflow.imageio import IMAGE_FORMATS

        unknown = sorted(set(out) - IMAGE_FORMATS)
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}; known: {sorted(IMAGE_FORMATS)}")
        return out


#: what a quality check does with an image that fails it
QualityAction = Literal["flag", "drop", "off"]


class QualitySettings(_Section):
    """Thresholds (cleanvision defaults) and what to do with an image below them:
    ``flag`` (default for every check), ``drop`` or ``off``."""

    #: dark: 99th brightness percentile below this
    dark_threshold: float = Field(0.32, ge=0, le=1)
    dark_action: QualityAction = "flag"
    #: light: 1 - 5th brightness percentile below this
    light_threshold: float = Field(0.05, ge=0, le=1)
    light_action: QualityAction = "flag"
    #: low_information: normalised entropy below this
    low_information_threshold: float = Field(0.3, ge=0, le=1)
    low_information_normalizing_factor: float = Field(0.1, gt=0)
    low_information_action: QualityAction = "flag"
    #: blurry: cleanvision's combined edge/histogram score below this
    blurry_threshold: float = Field(0.29, ge=0, le=1)
    blurry_normalizing_factor: float = Field(0.01, gt=0)
    blurry_color_threshold: float = Field(0.18, ge=0, le=1)
    blurry_action: QualityAction = "flag"
    #: grayscale: stored as one grey channel, or colorfulness below this (0 = mode only)
    grayscale_colorfulness_threshold: float = Field(0.01, ge=0, le=1)
    grayscale_action: QualityAction = "flag"
    #: odd_aspect_ratio: min(w/h, h/w) below this
    odd_aspect_ratio_threshold: float = Field(0.35, ge=0, le=1)
    odd_aspect_ratio_action: QualityAction = "flag"
    #: odd_size (set-level): IQR fence factor, and a fixed threshold (None = cleanvision's 0.5/1.0)
    odd_size_iqr_factor: float = Field(3.0, gt=0)
    odd_size_threshold: float | None = Field(None, ge=0, le=1)
    odd_size_action: QualityAction = "flag"


class DedupSettings(_Section):
    """Dedup stage settings."""

    #: pHash Hamming distance at or below which two images are near duplicates
    hamming_radius: int = Field(8, ge=0, le=32)
    #: also require the dHash distance to be ≤ dhash_radius. Measured with
    #: ``bench/near_dup.py --tune`` (pHash ≤ 8): dHash ≤ 10 catches 90% of all edits
    #: (re-encodes, resizes, blur, brightness, 3% crops, watermarks) with 3 false pairs in
    #: 320k; ≤ 7 still catches every re-encode/resize but fewer crops and watermarks
    #: (86% of all edits) with 1 false pair, and on the demo marketplace it keeps
    #: different dashboards and cars apart that ≤ 10 merged. A false merge silently
    #: deletes a distinct photo, so the default is the tighter one.
    use_dhash: bool = True
    dhash_radius: int = Field(7, ge=0, le=32)
    #: when two pHashes are identical, the dHash may differ by up to this instead: on the
    #: demo marketplace a 0.8× resize re-encoded at q88 keeps pHash 0 but moves dHash by 10
    dhash_radius_same_phash: int = Field(12, ge=0, le=32)
    #: a cluster seen in at least this many distinct listings is a placeholder
    placeholder_min_listings: int = Field(5, ge=2)
    #: how near pairs form clusters: ``single`` = union-find over all pairs (transitive:
    #: a~b, b~c puts a and c together however far apart they are); ``leader`` = exact
    #: duplicates are still merged transitively, but a near duplicate only joins a
    #: cluster whose leader (best image, in representative order) it is within the
    #: radius of, so chains of false pairs cannot grow one giant cluster
    linkage: Literal["single", "leader"] = "single"


class CarFilterSettings(_Section):
    """The car/no-car filter (``models/car_filter.py``, ``tasks/car_filter.py``)."""

    #: run the stage in the nightly/demo DAG (off: its manifest is the clean one, unchanged)
    enabled: bool = True
    #: backbone weights: ``imagenet``, a local path or ``s3://`` URI of a ``.keras`` /
    #: ``.weights.h5`` file, or ``none`` (random init: tests, offline demo)
    weights: str = "imagenet"
    #: images with ``p_car`` below this are dropped with reason ``no_car``
    threshold: float = Field(0.7, ge=0, le=1)
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(64, ge=1)
    #: MobileNetV2 width multiplier (ImageNet weights exist for 0.35/0.5/0.75/1.0/1.3/1.4)
    alpha: float = Field(1.0, gt=0)
    #: scoring runtime: ``auto`` = Keras on a GPU, OpenVINO on a CPU (3× TF's CPU speed)
    runtime: Literal["auto", "keras", "openvino"] = "auto"
    #: ``auto`` = fp16 on a GPU, fp32 on a CPU; ``bf16`` (OpenVINO on an AMX CPU, 1.8x
    #: faster) is opt-in: it moved p_car by up to 0.2 on a from-scratch model
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: model to score with (``.../models/car_filter/<version>/`` or its ``model.keras``);
    #: ``None`` = the latest trained version under ``models_prefix`` in storage
    model: str | None = None
    models_prefix: str = "models/car_filter"
    #: unique images per scoring shard task
    shard_size: int = Field(2000, ge=1)
    epochs: int = Field(10, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    #: early stopping patience (epochs without a better validation loss)
    patience: int = Field(3, ge=1)
    seed: int = 0


class CropSettings(_Section):
    """YOLO vehicle crops (``tasks/crop.py``, ``models/detector.py``)."""

    #: run the stage in the nightly/demo DAG (off: its manifest is its input, unchanged)
    enabled: bool = True
    #: hub name (``yolov5su.pt``, needs the network once), a .pt path, an ``s3://`` URI,
    #: or ``none`` / a model ``.yaml`` for random weights (tests, offline demo)
    weights: str = "yolov5su.pt"
    conf: float = Field(0.25, ge=0, le=1)
    #: padding around the detected box, as a fraction of the box's width/height
    margin: float = Field(0.05, ge=0, le=1)
    #: a padded crop whose shorter side is below this is dropped, reason ``too_small``
    min_side: int = Field(64, ge=1)
    #: images per forward pass (images of one letterbox shape are batched together);
    #: 0 = auto: 64 on a GPU, 8 on a CPU (bigger CPU batches fall out of cache: measured slower)
    batch_size: int = Field(0, ge=0)
    #: letterbox size of the detector input (ultralytics ``imgsz``)
    imgsz: int = Field(640, ge=32)
    #: COCO classes that count as a vehicle (car=2, truck=7; merged into one class)
    keep_classes: list[int] = Field(default_factory=lambda: [2, 7])
    #: torch device for inference ("" = the first GPU, else the CPU; "0" = cuda:0; "cpu")
    device: str = ""
    #: inference precision: ``auto`` = fp16 autocast on CUDA, bf16 on a CPU with AMX
    #: (Sapphire Rapids+), else fp32; boxes move by well under a pixel (measured in tests)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: torch threads for CPU inference (0 = every core; ultralytics' predict would use
    #: ``cpu_count - 1``, i.e. 1 on a 2-core box)
    torch_threads: int = Field(0, ge=0)
    #: threads decoding images / encoding crops
    decode_workers: int = Field(4, ge=1, le=64)
    #: JPEG quality of stored crops
    jpeg_quality: int = Field(95, ge=1, le=100)
    #: Prefect global concurrency limit held around inference (a missing limit is not an error)
    gpu_limit: str = "gpu"


class ClassesSettings(_Section):
    """Which make/model labels become classes (``tasks/classes.py``)."""

    #: a class with fewer kept images (after dedup/crop drops) is dropped, reason ``rare_class``
    min_images: int = Field(150, ge=1)
    #: collapse year variants: ``mercedes-benz_v-class_2016`` + ``_2017`` → ``mercedes-benz_v-class``
    merge_years: bool = True
    #: YAML merge map: ``target: [source, ...]`` (many to one) or ``source: target``
    merge_map: Path | None = None
    #: labels never to train on (exact labels or shell globs, e.g. ``bmw_*``), reason ``ignored_class``
    ignore: list[str] = Field(default_factory=list)
    #: dedup ``label_conflict`` clusters: majority vote of the rows' labels (a tie drops
    #: the cluster), or drop them all; reason ``label_conflict``
    conflict_policy: Literal["majority", "drop"] = "majority"
    #: storage prefix of the versioned dataset contracts (``<prefix>/<version>/classes.json``)
    datasets_prefix: str = "datasets"


class SplitSettings(_Section):
    """Grouped, stratified, stable train/val/test assignment (``tasks/split.py``)."""

    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    #: hashed with each group key: orders new groups inside their class
    seed: str = "carflow-split-v1"
    #: manifest columns whose shared values join listings into one group (union-find)
    group_by: list[str] = Field(default_factory=lambda: ["dup_cluster", "image_id", "source_id"])
    #: persisted listing → split assignments; an assigned listing never moves
    assignments_key: str = "datasets/assignments.parquet"
    #: export the ``<split>/<class>/<image_id>.jpg`` folder layout here (local path or
    #: ``s3://`` URI); None = manifest only
    export_uri: str | None = None
    #: also export TFRecord shards (``tasks/export.py``, the training format)
    tfrecord: bool = False
    #: where the shards and ``datasets/<version>/export.json`` go; None = the storage
    tfrecord_uri: str | None = None
    #: exported JPEG size (never upscaled); None = ``train.image_size``
    tfrecord_size: int | None = Field(None, ge=16)
    #: ``square``: size×size (what training resizes to; fastest to read, bench/dataset_read.py);
    #: ``shorter``: aspect kept, shorter side = size (room for crop augmentation)
    tfrecord_fit: Literal["square", "shorter"] = "square"
    tfrecord_shard_images: int = Field(2048, ge=1)
    tfrecord_quality: int = Field(90, ge=1, le=100)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitSettings:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1.0, got {total:.4f}")
        return self


class TrainSettings(_Section):
    """The classifier and its training recipe (``models/classifier.py``, ``tasks/train.py``).

    Defaults follow the seeds and the Keras transfer-learning guide: EfficientNetB1 at
    240 px (the EU seed), phase 1 trains the head on a frozen base (BatchNorm in inference
    mode), phase 2 fine-tunes the top ``finetune_layers`` layers (the Mercedes seed: 40) at
    ``finetune_lr_factor`` × the learning rate with BatchNorm still frozen; balanced class
    weights (the Brazil seed); label smoothing; early stopping on validation loss.
    With ``weights=none`` there is nothing to transfer: every epoch trains the whole
    network (BatchNorm in training mode)."""

    #: the dataset to train on: ``latest`` (datasets/latest.json, else the newest
    #: export) or a dataset version
    dataset: str = "latest"
    #: ``auto``: what the dataset declares (multiclass unless its export says multilabel)
    task: Literal["auto", "multiclass", "multilabel"] = "auto"
    backbone: Literal["efficientnetb1", "resnet50v2", "mobilenetv2"] = "efficientnetb1"
    #: ``imagenet`` (needs internet on first use), a ``.keras``/``.weights.h5`` path or
    #: ``s3://`` URI, or ``none`` (random init: tests, the offline demo)
    weights: str = "imagenet"
    #: MobileNetV2 width multiplier (0.35 trains in seconds on a CPU)
    alpha: float = Field(1.0, gt=0, le=1.4)
    image_size: int = Field(240, ge=32)
    dropout: float = Field(0.2, ge=0, lt=1)
    #: L2 on the head's kernel
    l2: float = Field(1e-5, ge=0)
    #: every epoch, both phases together
    epochs: int = Field(10, ge=1)
    #: phase 1 (head only, frozen base; at most ``epochs``); the rest of ``epochs`` fine-tune
    head_epochs: int = Field(3, ge=0)
    #: phase 2 unfreezes the top N layers of the base (BatchNorm stays frozen); -1 = all
    finetune_layers: int = Field(40, ge=-1)
    finetune_lr_factor: float = Field(0.1, gt=0, le=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    #: for a global batch of ``batch_size``; scaled linearly with the replicas
    learning_rate: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    #: linear warmup at the start of each phase (epochs, may be fractional)
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    #: ``class_weight``: balanced class weights (the Brazil seed found them decisive);
    #: ``oversample``: draw every class equally often; ``none``
    balance: Literal["class_weight", "oversample", "none"] = "class_weight"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    #: Keras preprocessing layers inside the model, active only while training
    flip: bool = True
    rotation: float = Field(0.05, ge=0, le=0.5)
    zoom: float = Field(0.1, ge=0, lt=1)
    contrast: float = Field(0.1, ge=0, lt=1)
    translation: float = Field(0.1, ge=0, lt=1)
    #: stop when the validation loss has not improved for this many epochs (0 = off)
    early_stopping: int = Field(3, ge=0)
    #: per device; the global batch is batch_size × replicas
    batch_size: int = Field(32, ge=1)
    #: ``auto``: bf16 on a GPU that supports it (fp16 on older ones), fp32 on a CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: XLA (``jit_compile``) for the train step
    xla: bool = False
    #: ``auto``: every GPU of this machine when there are several (MirroredStrategy on
    #: TensorFlow, keras.distribution.DataParallel on JAX), else none
    distribution: Literal["auto", "none", "mirrored", "data_parallel"] = "auto"
    #: ``auto``: tf.data on the TensorFlow backend, the TensorFlow-free reader otherwise
    input: Literal["auto", "tfdata", "python"] = "auto"
    #: decode workers of the TensorFlow-free reader
    workers: int = Field(4, ge=1, le=256)
    #: K-fold cross-validation grouped by listing (0 = off; ≥ 2 = folds)
    cv: int = Field(0, ge=0)
    seed: int = 0
    #: the inference export registered beside model.keras (``none`` to skip)
    export: Literal["openvino", "none"] = "openvino"
    #: checkpoints every epoch (resume) and TensorBoard logs go under this storage prefix
    work_prefix: str = "work/train"

    @model_validator(mode="after")
    def _phases(self) -> TrainSettings:
        if self.cv == 1:
            raise ValueError("train.cv must be 0 (off) or at least 2 folds")
        return self


class EvaluateSettings(_Section):
    """Evaluation of a trained classifier (``tasks/evaluate.py``, ``carflow evaluate``)."""

    #: images per predictor call
    batch_size: int = Field(64, ge=1)
    #: equal-width confidence bins of the expected calibration error and reliability diagram
    ece_bins: int = Field(15, ge=2, le=100)
    #: above this many classes the confusion PNG shows the most-confused sub-matrix
    confusion_max_classes: int = Field(40, ge=2)
    #: most-confused (true, predicted) pairs reported, each with a gallery
    top_pairs: int = Field(10, ge=0)
    #: misclassified test crops per confused-pair gallery
    gallery_images: int = Field(12, ge=1)
    #: thumbnails in the likely-label-errors gallery (the CSV lists them all)
    gallery_issues: int = Field(48, ge=1)
    #: label issues listed in metrics.json and the report (the CSV lists them all)
    issues_listed: int = Field(50, ge=0)
    #: thumbnail side in galleries, px
    thumb: int = Field(96, ge=16, le=512)
    #: a suggested merge needs this many confidently confused images in *each* direction
    merge_min_examples: int = Field(2, ge=1)
    #: ... and this share of each class's val+test images confused with the other
    merge_min_rate: float = Field(0.1, ge=0, le=1)
    #: pairs written into the merge-map snippet (None = every suggestion)
    max_merges: int | None = Field(None, ge=1)
    #: multi-label decision threshold for metrics
    multilabel_threshold: float = Field(0.5, gt=0, lt=1)


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
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
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


def as_settings(model: type[BaseModel], cfg: Any) -> Any:
    """``cfg`` as an instance of ``model``: None → defaults; a dict or another pydantic
    model (e.g. a section of the global settings object) is validated field by field,
    so an unknown or invalid field raises here, once, rather than per image."""
    if cfg is None:
        return model()
    if isinstance(cfg, model):
        return cfg
    data = cfg.model_dump() if isinstance(cfg, BaseModel) else dict(cfg)
    return model.model_validate(data)


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
