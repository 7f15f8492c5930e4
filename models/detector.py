"""The YOLO detector used by the crop stage: weight resolution and loading.

``crop.weights`` (``CARFLOW_CROP__WEIGHTS``) is one of

* a hub name such as ``yolov5su.pt`` / ``yolov5nu.pt`` / ``yolov5mu.pt``: ultralytics
  downloads it on first use (needs the network; offline and not cached → a clear error);
* a local path to a ``.pt`` file (missing → a clear error, never random weights);
* an ``s3://`` URI: downloaded through :mod:`carflow.storage` into a temp file;
* a model ``.yaml`` (``yolov5nu.yaml``) or ``none``: random init, explicitly (tests,
  offline demo, benchmarks).

Nothing happens at import time: ultralytics/torch are imported inside the functions.
:func:`configure_ultralytics` points ultralytics' config dir at a local folder (unless
``YOLO_CONFIG_DIR`` is already set) so it never writes to ``~/.config`` and, with
:func:`place_font`, never needs to download ``Arial.ttf``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

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


def resolve_weights(weights: str) -> str:
    """A spec → something ``YOLO(...)`` accepts (a yaml name, a local file, a hub name).
    Raises :class:`DetectorWeightsError` naming the setting when it cannot."""
    w = (weights or "").strip()
    if not w:
        raise DetectorWeightsError(f"{SETTING} is empty; set a weight file, a hub name or 'none'")
    if w.lower() == "none":
        return RANDOM_INIT_YAML
    if is_random_init(w):
        return w
    if w.startswith("s3://"):
        from urllib.parse import urlparse

        from carflow.storage import StorageKeyError, open_storage

        parsed = urlparse(w)
        bucket_uri, _, key = f"s3://{parsed.netloc}", None, parsed.path.lstrip("/")
        try:
            data = open_storage(bucket_uri).get(key)
        except StorageKeyError:
            raise DetectorWeightsError(f"{SETTING}: {w} does not exist") from None
        except Exception as exc:  # noqa: BLE001 - any S3 failure is a configuration problem here
            raise DetectorWeightsError(f"{SETTING}: cannot download {w}: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()[:16]
        out = Path(tempfile.gettempdir()) / "carflow-weights" / f"{digest}-{Path(key).name or 'weights.pt'}"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + f".{os.getpid()}.part")
            tmp.write_bytes(data)
            os.replace(tmp, out)
        return str(out)
    path = Path(w).expanduser()
    if path.is_file():
        return str(path)
    if _is_hub_name(w):
        return w  # load_detector turns a failed download into DetectorWeightsError
    raise DetectorWeightsError(
        f"{SETTING}: weight file {w!r} does not exist (use an existing .pt path, an s3:// URI, "
        "a hub name such as yolov5su.pt, or 'none' / a model .yaml for random weights)"
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
