"""The YOLO detector used by the crop stage: weight resolution and loading.

``crop.weights`` (``CARFLOW_CROP__WEIGHTS``) is one of

* a hub name such as ``yolov5su.pt`` / ``yolov5nu.pt`` / ``yolov5mu.pt``: ultralytics
  downloads it on first use (needs the network; offline and not cached → a clear error);
* a local path to a ``.pt`` file (missing → a clear error, never random weights);
* an ``s3://`` URI: downloaded once through :func:`carflow.storage.local_file`;
* ``latest``: the latest fine-tuned detector in the registry (``carflow crop train``),
  turned into its ``weights.pt`` by :func:`registered_weights` before a run;
* a model ``.yaml`` (``yolov5nu.yaml``) or ``none``: random init, explicitly (tests,
  offline demo, benchmarks).

Nothing happens at import time: ultralytics/torch are imported inside the functions.
:func:`configure_ultralytics` points ultralytics' config dir at a local folder (unless
``YOLO_CONFIG_DIR`` is already set) so it never writes to ``~/.config`` and, with
:func:`place_font`, never needs to download ``Arial.ttf``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from carflow.frameworks import cpu_has_fast_bf16
from carflow.settings import SettingsError

SETTING = "crop.weights (CARFLOW_CROP__WEIGHTS)"
#: ``none`` means this random-init architecture
RANDOM_INIT_YAML = "yolov5nu.yaml"

_lock = threading.Lock()
_cache: dict[str, Any] = {}


class DetectorWeightsError(SettingsError):
    """The configured detector weights cannot be found or loaded; names the setting."""


def configure_ultralytics() -> Path:
    """Give ultralytics a local config dir before it is first imported (it reads
    ``YOLO_CONFIG_DIR`` at import). Returns the dir it will use."""
    if "YOLO_CONFIG_DIR" not in os.environ:
        path = Path(tempfile.gettempdir()) / "carflow-ultralytics"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(path)
    return Path(os.environ["YOLO_CONFIG_DIR"])


def import_ultralytics():
    """Import ultralytics with our config dir, and undo its global ``PIL.Image.open``
    patch: ultralytics replaces ``Image.open`` process-wide with a wrapper that, on any
    unidentifiable file, runs ``check_requirements("pi-heif")`` (a pip install when online).
    In carflow an undecodable file is data (``decode_error``), never a reason to install
    packages, and the fixer decides which formats are accepted."""
    configure_ultralytics()
    import ultralytics
    from PIL import Image

    try:
        from ultralytics.utils import patches

        original = getattr(patches, "_image_open", None)
        if original is not None and Image.open is getattr(patches, "image_open", None):
            Image.open = original
    except ImportError:  # pragma: no cover - other ultralytics versions
        pass
    return ultralytics


def place_font() -> Path:
    """Put a local TTF (matplotlib's DejaVuSans) where ultralytics looks for ``Arial.ttf``,
    so dataset checks/plots during training never try to download the font."""
    import_ultralytics()
    from ultralytics.utils import USER_CONFIG_DIR

    target = Path(USER_CONFIG_DIR) / "Arial.ttf"
    if not target.exists():
        import matplotlib

        src = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return target


def is_random_init(weights: str) -> bool:
    w = weights.strip()
    return w.lower() == "none" or w.lower().endswith((".yaml", ".yml"))


def _is_hub_name(weights: str) -> bool:
    return "/" not in weights and "\\" not in weights and weights.endswith(".pt") and not weights.startswith(".")


def weights_version(weights: str) -> str:
    """What the crop cache key records about the weights: the spec, plus the file's sha256
    for a local file (so replacing the file under the same name invalidates the cache)."""
    w = weights.strip()
    path = Path(w).expanduser()
    if not w.startswith("s3://") and not is_random_init(w) and path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return f"{w}@sha256:{h.hexdigest()}"
    return w


def version_weights(version: Any) -> str:
    """What ``crop.weights`` accepts for a registered detector version
    (:class:`carflow.registry.Version`): its ``weights.pt`` as a path on local storage,
    else its URI (downloaded when loaded)."""
    from carflow.storage import LocalStorage

    if isinstance(version.storage, LocalStorage):
        return str(version.local_path("weights.pt"))
    return version.uri("weights.pt")


def registered_weights(weights: str, storage: Any = None) -> str:
    """``latest`` (or another registry pointer / version id of a fine-tuned detector) →
    that version's weights (:func:`version_weights`), resolved in ``storage``'s registry;
    every other spec is returned unchanged. Raises :class:`DetectorWeightsError` naming
    the setting and ``carflow crop train`` when nothing is registered."""
    w = (weights or "").strip()
    if w != "latest":
        return w
    from carflow.registry import Registry, RegistryError

    try:
        return version_weights(Registry(storage).resolve("detector", w, setting=SETTING))
    except RegistryError as exc:
        raise DetectorWeightsError(str(exc)) from None


def resolve_weights(weights: str) -> str:
    """A spec → something ``YOLO(...)`` accepts (a yaml name, a local file, a hub name).
    Raises :class:`DetectorWeightsError` naming the setting when it cannot."""
    w = (weights or "").strip()
    if not w:
        raise DetectorWeightsError(f"{SETTING} is empty; set a weight file, a hub name or 'none'")
    if w == "latest":
        raise DetectorWeightsError(f"{SETTING} = latest must be resolved in a storage's registry first "
                                   "(models.detector.registered_weights)")
    if w.lower() == "none":
        return RANDOM_INIT_YAML
    if is_random_init(w):
        return w
    if w.startswith("s3://"):
        from carflow.storage import local_file

        try:
            return str(local_file(w))
        except FileNotFoundError as exc:
            raise DetectorWeightsError(f"{SETTING}: {exc}") from None
    path = Path(w).expanduser()
    if path.is_file():
        return str(path)
    if _is_hub_name(w):
        return w  # load_detector turns a failed download into DetectorWeightsError
    raise DetectorWeightsError(
        f"{SETTING}: weight file {w!r} does not exist (use an existing .pt path, an s3:// URI, "
        "'latest' for the latest fine-tune, a hub name such as yolov5su.pt, or 'none' / a model .yaml "
        "for random weights)"
    )


def load_detector(weights: str = "yolov5su.pt", cache: bool = True):
    """An ultralytics ``YOLO`` model for ``weights`` (see the module doc). Cached per
    process and spec; the returned model carries a ``carflow_lock`` (predict is not
    thread-safe on one model object)."""
    key = weights.strip()
    with _lock:
        if cache and key in _cache:
            return _cache[key]
    resolved = resolve_weights(weights)
    ultralytics = import_ultralytics()
    try:
        model = ultralytics.YOLO(resolved)
    except Exception as exc:  # noqa: BLE001 - download/parse failures all mean "fix the setting"
        hint = " (a hub name needs the network on first use, or put the .pt file next to the run)" if _is_hub_name(
            resolved
        ) else ""
        raise DetectorWeightsError(f"{SETTING}: cannot load detector weights {weights!r}: {exc}{hint}") from exc
    if not is_random_init(resolved) and _is_hub_name(resolved) and not Path(model.ckpt_path or "").is_file():
        raise DetectorWeightsError(f"{SETTING}: hub weights {weights!r} were not downloaded")
    model.carflow_lock = threading.Lock()
    model.carflow_weights = key
    if cache:
        with _lock:
            _cache.setdefault(key, model)
            model = _cache[key]
    return model


def clear_cache() -> None:
    with _lock:
        _cache.clear()


# -- direct batched inference -----------------------------------------------------------
#: ultralytics' predict defaults, kept so that our boxes equal ``model.predict``'s
NMS_IOU = 0.7
MAX_DET = 300


def resolve_device(device: str = "") -> str:
    """``crop.device`` → a torch device string: ``""`` = first GPU if any, else CPU;
    ``"0"`` / ``"0,1"`` = ``cuda:0``; anything else as given (``cpu``, ``cuda:1``, ``mps``)."""
    import torch

    d = (device or "").strip().lower()
    if not d:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if d.split(",")[0].isdigit():
        return f"cuda:{d.split(',')[0]}"
    return d


def resolve_precision(precision: str, device: str) -> str:
    """``crop.precision`` → what inference really uses: ``auto`` = fp16 on CUDA, bf16 on a
    CPU with AMX, else fp32. fp16 on a CPU is refused (no fast kernels); bf16 is allowed
    anywhere (slow without AMX, but numerically fine)."""
    p = (precision or "auto").lower()
    on_cuda = device.startswith("cuda")
    if p == "auto":
        return "fp16" if on_cuda else ("bf16" if device == "cpu" and cpu_has_fast_bf16() else "fp32")
    if p == "fp16" and not on_cuda:
        raise SettingsError(f"crop.precision (CARFLOW_CROP__PRECISION) = fp16 needs a CUDA device, not {device!r}")
    if p not in ("fp32", "fp16", "bf16"):
        raise SettingsError(f"crop.precision (CARFLOW_CROP__PRECISION) = {precision!r}: use auto, fp32, bf16 or fp16")
    return p


class DetectorNet:
    """The YOLO network of an ultralytics model, called directly on batches.

    Why not ``model.predict``: on a CPU the predictor pins torch to ``cpu_count - 1``
    threads (1 on a 2-core box), letterboxes a list of mixed-size images to a square
    ``imgsz`` canvas, and never uses reduced precision. Here the caller letterboxes in its
    decode threads (rectangular, as predict does for one image), batches images of equal
    letterbox shape, and the forward runs channels-last on every core in fp16 (CUDA) or
    bf16 (AMX CPU) autocast. Pre- and post-processing are ultralytics' own (``LetterBox``,
    ``non_max_suppression``, ``scale_boxes``), so in fp32 the boxes equal predict's."""

    def __init__(self, model: Any, device: str = "", precision: str = "auto", threads: int = 0):
        import copy

        import torch

        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        net = copy.deepcopy(model.model).float()
        net = net.fuse(verbose=False) if hasattr(net, "fuse") else net
        # channels_last: oneDNN's bf16/AMX and cuDNN's fp16 convolutions want NHWC; the
        # batch arrives as NHWC arrays anyway (measured 2x on an AMX CPU in bf16)
        self.net = net.eval().to(self.device).to(memory_format=torch.channels_last)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.stride = int(max(int(s) for s in getattr(model.model, "stride", [32])))
        self.names = dict(model.names)
        self.lock = threading.Lock()
        self._torch = torch
        #: how many forward passes ran, and their input shapes (tests, stats)
        self.calls: list[tuple[int, ...]] = []

    def letterbox(self, image: Any, imgsz: int, rect: bool = True) -> Any:
        """``image`` (H, W, 3) → ultralytics' letterbox: resized to fit ``imgsz`` and padded
        (value 114) to a multiple of the stride (``rect``) or to ``imgsz`` × ``imgsz``."""
        from ultralytics.data.augment import LetterBox

        return LetterBox((imgsz, imgsz), auto=rect, stride=self.stride)(image=image)

    def _autocast(self):
        torch = self._torch
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        if self.precision == "bf16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: Any) -> Any:
        """``batch``: uint8 (N, H, W, 3) RGB letterboxed arrays of one shape → raw
        predictions (N, 4 + classes, anchors) as float32 on the device."""
        torch = self._torch
        with self.lock:
            x = torch.from_numpy(batch).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=torch.channels_last).float().div_(255)  # NHWC in memory: no copy
            previous = torch.get_num_threads()
            if self.device == "cpu" and previous != self.threads:
                torch.set_num_threads(self.threads)
            try:
                with torch.inference_mode(), self._autocast():
                    y = self.net(x)
            finally:
                if torch.get_num_threads() != previous:
                    torch.set_num_threads(previous)
            self.calls.append(tuple(x.shape))
        y = y[0] if isinstance(y, (list, tuple)) else y
        return y.float()

    def detect(self, letterboxed: list[Any], orig_shapes: list[tuple[int, int]], conf: float,
               classes: list[int] | None) -> list[tuple[Any, Any, Any]]:
        """One forward pass over equal-shape letterboxed images, NMS, boxes scaled back to
        each original (H, W). Returns per image (xyxy, cls, conf) numpy arrays."""
        import numpy as np
        from ultralytics.utils import nms, ops

        shapes = {a.shape for a in letterboxed}
        if len(shapes) != 1:
            raise ValueError(f"one forward pass needs one letterbox shape, got {sorted(shapes)}")
        preds = self.forward(np.stack(letterboxed))
        dets = nms.non_max_suppression(preds, conf, NMS_IOU, classes, False, max_det=MAX_DET)
        out = []
        in_hw = letterboxed[0].shape[:2]
        for d, hw in zip(dets, orig_shapes, strict=True):
            boxes = ops.scale_boxes(in_hw, d[:, :4].clone(), hw)
            out.append((boxes.cpu().numpy(), d[:, 5].cpu().numpy(), d[:, 4].cpu().numpy()))
        return out


def detector_net(model: Any, device: str = "", precision: str = "auto", threads: int = 0) -> DetectorNet:
    """The :class:`DetectorNet` of ``model`` for these options, built once per model."""
    key = (device, precision, threads)
    with _lock:
        nets = model.__dict__.setdefault("carflow_nets", {})
        if key not in nets:
            nets[key] = DetectorNet(model, device, precision, threads)
        return nets[key]
