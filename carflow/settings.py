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
Its message never holds a secret: values under a secret field are masked wherever they
appear in the rejected input, and the secret values themselves are scrubbed from it.
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

from carflow.errors import UserError
from carflow.keys import TRAIN_PREFIX

ENV_PREFIX = "CARFLOW_"
SECRET_FIELDS = {("storage", "access_key_id"), ("storage", "secret_access_key")}
#: field names whose values are never shown, in whatever section or input they appear
SECRET_NAMES = frozenset(name for _section, name in SECRET_FIELDS)
MASK = "**********"


class SettingsError(UserError, ValueError):
    """A setting has an invalid value. The message names the setting, never a secret."""


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
    #: S3 requests: tries in all (botocore ``adaptive`` retries: exponential backoff with jitter)
    max_attempts: int = Field(10, ge=1, le=50)
    #: S3 requests: seconds to open a connection, and to wait for a response, before that
    #: try fails and is retried (an endpoint that hangs instead of refusing)
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
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
    #: folder import decides from the content (a JPEG named ``.jfif`` or with no extension is
    #: a photo); a file with one of these names is imported even when its content is not an
    #: image, so the clean stage records it with a reason instead of it being skipped
    image_extensions: list[str] = Field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"])


class FixSettings(_Section):
    """What the fixer keeps, and how it re-encodes."""

    #: a file smaller than this whose header does not parse is ``truncated`` (0 bytes is
    #: ``empty``; a valid tiny image goes on to the size checks, e.g. ``too_small``)
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
    #: decoded-pixel memory (MiB, estimated from the headers) that one shard's threads may
    #: hold at once; a full decode waits for room, one larger than this runs alone
    decode_memory_mb: int = Field(1024, ge=64)

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
    #: confirm every near pair (pHash/dHash, grey silhouettes) on the 8×8 colour thumbnail
    #: of the small decode: ``carflow.imagehash.thumb_distance`` ≤ ``thumb_radius``. Two
    #: different cars in one pose on a white studio background share their silhouette
    #: (pHash 2, dHash 1 apart) but not their colour and detail (distance ≥ 18.6); JPEG
    #: re-encodes, resizes and +10 % brightness stay ≤ 13.1 (``bench/near_dup.py --tune``)
    confirm_thumb: bool = True
    thumb_radius: float = Field(16.0, ge=0, le=255)


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
    #: model to score with, resolved by the registry: ``latest``, a version id, a version
    #: folder or its ``model.keras`` (path or ``s3://`` URI); ``None`` = ``latest``
    model: str | None = None
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
    #: ``latest`` (the latest fine-tuned detector in the registry, ``carflow crop train``),
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


class SplitSettings(_Section):
    """Grouped, stratified, stable train/val/test assignment (``tasks/split.py``)."""

    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    #: hashed with each group key: orders new groups inside their class
    seed: str = "carflow-split-v1"
    #: manifest columns whose shared values join listings into one group (union-find)
    group_by: list[str] = Field(default_factory=lambda: ["dup_cluster", "image_id", "source_id"])
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
    #: epochs before early stopping starts watching the validation loss (Keras'
    #: ``start_from_epoch``): a model trained from scratch gets worse on validation before
    #: it gets better (the CPU recipe sets 15)
    early_stopping_start: int = Field(0, ge=0)
    #: per device; the global batch is batch_size × replicas
    batch_size: int = Field(32, ge=1)
    #: ``auto``: bf16 on a GPU that supports it (fp16 on older ones), fp32 on a CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: XLA (``jit_compile``) for the train step (always on under ``KERAS_BACKEND=jax``,
    #: whose step without it runs op by op)
    xla: bool = False
    #: fused kernels for BatchNormalization and convolutions, and no host syncs for random
    #: draws and scalars, where Keras' backend lacks them (``models.fast_layers``; the same
    #: arithmetic, the saved model unchanged); ``false``: Keras' own layers
    fast_layers: bool = True
    #: torch on a CUDA GPU: capture the whole training step (forward, backward, optimizer,
    #: metrics) as one CUDA graph and replay it per batch, without Keras' Python per layer
    #: (``models.fast_layers.CudaGraphStep``; an epoch's partial batch runs eagerly, a
    #: step that cannot be captured falls back with one line). Off until measured on a GPU
    cuda_graphs: bool = False
    #: on a machine without a GPU with ``weights=none`` (nothing to transfer: the offline
    #: demo), train ``backbone``/``alpha``/``image_size`` left at their defaults as
    #: MobileNetV2 α 0.35 at 96 px (``tasks.train.CPU_RECIPE``): minutes on 2 cores, where
    #: EfficientNetB1 at 240 px from scratch takes hours; ``false``: the settings as given
    cpu_recipe: bool = True
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
    work_prefix: str = TRAIN_PREFIX

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
    """How flows run: task runner, retries and where the manifests go."""

    #: where a flow's tasks run (``tasks/runners.py``): ``thread`` (Prefect's thread pool,
    #: every stage), ``process`` (a process pool, every stage), ``local`` (threads for
    #: I/O stages, processes for CPU stages) or ``dask`` (an existing Dask cluster at
    #: ``runtime.dask_address``, through prefect-dask's ``DaskTaskRunner``)
    task_runner: Literal["thread", "process", "local", "dask"] = "thread"
    #: the Dask scheduler for ``task_runner: dask``, e.g. ``tcp://dask-scheduler:8786``
    dask_address: str | None = None
    #: threads or processes of the local runners, and the shard (and folder-import) tasks of
    #: one stage in flight at once: it bounds a stage's memory
    max_workers: int = Field(2, ge=1, le=256)
    manifests_prefix: str = "manifests"
    #: retries of a task that touches the network or storage (``tasks/retry.py``)
    retries: int = Field(3, ge=0, le=50)
    #: first retry delay; each next one doubles (Prefect's ``exponential_backoff``)
    retry_backoff_s: float = Field(2.0, ge=0)
    #: each delay varies by up to this fraction (Prefect's ``retry_jitter_factor``)
    retry_jitter: float = Field(0.5, ge=0)
    #: a task attempt running longer than this fails (and is retried); empty = no limit
    task_timeout_s: float | None = Field(3600.0, gt=0)
    #: the storage lock a nightly takes (``carflow/lock.py``): a second run on the same
    #: storage waits up to this long for the first, then stops with one line naming the
    #: holder (0: stop at once)
    lock_wait_s: float = Field(3600.0, ge=0)
    #: a held lock is renewed every third of this; a lock not renewed for this long (its
    #: run was killed) is stale and the next run takes it over
    lock_lease_s: float = Field(300.0, gt=0)
    #: how often a waiting run looks at the lock again
    lock_poll_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _dask_needs_address(self) -> RuntimeSettings:
        if self.task_runner == "dask" and not self.dask_address:
            raise ValueError(
                "runtime.task_runner is 'dask' but runtime.dask_address is empty: set it to the "
                "scheduler, e.g. CARFLOW_RUNTIME__DASK_ADDRESS=tcp://dask-scheduler:8786"
            )
        return self


class ServeSettings(_Section):
    """The prediction API (``carflow serve``): models, dynamic batching, limits, access."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: registry specs (``latest``, a version id, a path or ``s3://`` URI) of the three models
    car_filter: str = "latest"
    detector: str = "latest"
    classifier: str = "latest"
    #: ``p_car`` below this is "no car in this photo" (None: ``car_filter.threshold``)
    car_threshold: float | None = Field(None, ge=0, le=1)
    top_k: int = Field(5, ge=1, le=100)
    #: dynamic batching (Ray Serve ``@serve.batch``): flush at this many images ...
    max_batch_size: int = Field(16, ge=1, le=1024)
    #: ... or this long after the first image of a batch arrived, whichever comes first
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    #: images waiting for the model; a full queue answers 503 with Retry-After
    queue_size: int = Field(64, ge=1)
    #: seconds a request may wait for its result before a 504
    request_timeout_s: float = Field(30.0, gt=0)
    #: Retry-After seconds on a 503
    retry_after_s: int = Field(1, ge=1)
    #: upload size cap (413), checked before anything is decoded
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    #: declared width × height cap (422, decompression bombs), from the header only
    max_pixels: int = Field(40_000_000, gt=0)
    #: images per /predict/batch request
    max_batch_files: int = Field(16, ge=1)
    #: image formats accepted (415 otherwise); the fixer's ``fix.allowed_formats`` by default
    allowed_formats: list[str] | None = None
    #: fetch ``url=`` inputs (off by default); only http(s) to these hosts, same cap and timeout
    url_input: bool = False
    url_allowed_hosts: list[str] = Field(default_factory=list)
    url_timeout_s: float = Field(10.0, gt=0)
    #: the env variable holding the API key (checked in the ``X-API-Key`` header); unset = open
    api_key_env: str = "CARFLOW_SERVE_API_KEY"
    #: CORS allowed origins (empty: CORS off)
    cors_origins: list[str] = Field(default_factory=list)
    #: seconds between polls of the registry pointers (0: no polling; ``POST /reload`` still works)
    reload_poll_s: float = Field(0.0, ge=0)


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
            # only the problem and its position: PyYAML's message quotes the offending
            # line, which may hold a secret
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise SettingsError(f"{self.path}: not valid YAML: {problem}{where}") from None
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
    serve: ServeSettings = Field(default_factory=ServeSettings)

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


def _mask(value: Any) -> Any:
    """``value`` with everything under a secret field name replaced by :data:`MASK`."""
    if isinstance(value, dict):
        return {k: (MASK if str(k).lower() in SECRET_NAMES and v is not None else _mask(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mask(v) for v in value)
    if isinstance(value, SecretStr):
        return MASK
    return value


def secret_values(overrides: dict[str, Any] | None = None) -> set[str]:
    """The secret strings in play: from the environment and from keyword overrides."""
    found = set()
    for section, name in SECRET_FIELDS:
        env = os.environ.get(f"{ENV_PREFIX}{section.upper()}__{name.upper()}")
        if env:
            found.add(env)
        value = ((overrides or {}).get(section) or {})
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and value:
            found.add(value)
    return found


def scrub(text: str, secrets: set[str] | None = None) -> str:
    """``text`` with every secret value (:func:`secret_values`) replaced by :data:`MASK`."""
    for secret in sorted(secrets if secrets is not None else secret_values(), key=len, reverse=True):
        if len(secret) >= 4:  # shorter strings would mask unrelated text
            text = text.replace(secret, MASK)
    return text


def _explain(exc: ValidationError, secrets: set[str] | None = None) -> SettingsError:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")]
        name = ".".join(loc) or "(settings)"
        env = ENV_PREFIX + "__".join(p.upper() for p in loc) if loc else ""
        # the input of a section-level error is the whole section: mask by field name,
        # not only when the failing field is itself a secret
        secret_field = bool(loc) and loc[-1].lower() in SECRET_NAMES
        shown = "" if secret_field else f" (got {_mask(err.get('input'))!r})"
        lines.append(f"setting {name} [{env}]: {err.get('msg')}{shown}")
    # one line (the entry points print it as the whole error), one clause per bad setting
    return SettingsError(scrub("invalid carflow settings: " + "; ".join(lines), secrets))


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
    from pydantic_settings import SettingsError as SourceError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise _explain(exc, secret_values(overrides)) from None
    except SourceError as exc:  # e.g. CARFLOW_STORAGE='{not json'
        raise SettingsError(scrub(f"invalid carflow settings: {exc}", secret_values(overrides))) from None


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return load_settings()


def get_settings() -> Settings:
    """The process-wide settings (read once; call :func:`reset_settings` after env changes)."""
    return _cached()


def reset_settings() -> None:
    _cached.cache_clear()
