"""The demo marketplace's ground truth as an ultralytics (YOLO) detection dataset.

The generated site knows every photo's true car box (``bbox`` in ``ground_truth.json``):
that is the demo's stand-in for a human box annotator. :func:`write_yolo_dataset` turns
one or more generated sites into the folder layout ultralytics trains on::

    <out>/data.yaml
    <out>/images/{train,val}/<sha256[:16]>.jpg     (the photo's bytes as served)
    <out>/labels/{train,val}/<sha256[:16]>.txt     (``2 cx cy w h``, normalised; empty = negative)

Decision: the dataset keeps COCO's 80 class names and labels every car as class 2
(``car``), so a fine-tuned checkpoint has the same head as the hub models and drops into
the cropper unchanged (``crop.keep_classes`` = [2, 7]). Non-car photos (interior,
dashboard, wheel, text banners) are negatives with empty label files. Photos with a
planted encoding problem (truncated, CMYK, bombs…) and duplicates are left out.

Nothing here imports ultralytics: the class names are read from its packaged
``coco.yaml`` (so they cannot drift from the hub models), or, when it is not installed,
from the copy below.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

#: COCO class id of ``car``: what every ground-truth box is labelled
CAR_CLASS = 2
#: photos that go into the detection dataset: clean car photos and the non-car negatives
DATASET_PROBLEMS = (None, "interior", "dashboard", "wheel", "text_banner")


def coco_names() -> dict[int, str]:
    """COCO's 80 class names as ultralytics ships them (``{0: 'person', 2: 'car', …}``)."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.origin:
        raise RuntimeError("ultralytics is not installed: it is needed to train the detector")
    path = Path(spec.origin).parent / "cfg" / "datasets" / "coco.yaml"
    names = yaml.safe_load(path.read_text())["names"]
    return {int(k): str(v) for k, v in names.items()}


def _photos(site_dir: Path) -> list[dict[str, Any]]:
    gt = json.loads((site_dir / "ground_truth.json").read_text())
    seen: set[str] = set()
    photos = []
    for listing in gt["listings"]:
        for p in listing["photos"]:
            if p["sha256"] and p["sha256"] not in seen and p["problem"] in DATASET_PROBLEMS:
                seen.add(p["sha256"])
                photos.append({**p, "site_dir": str(site_dir)})
    return photos


def yolo_label(photo: dict[str, Any]) -> str:
    """The YOLO label line of one ground-truth photo (``""`` for a negative)."""
    if not (photo["is_car"] and photo["bbox"]):
        return ""
    x0, y0, x1, y1 = photo["bbox"]
    w, h = photo["width"], photo["height"]
    return f"{CAR_CLASS} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n"


def write_yolo_dataset(
    site_dir: str | Path | Sequence[str | Path], out: str | Path, val_every: int = 5
) -> tuple[Path, list[dict[str, Any]]]:
    """The generated site(s)' photos as an ultralytics detection dataset under ``out``.

    Every ``val_every``-th photo is held out (``images/val``); ``val_every=0`` holds out
    nothing (``val`` then names the training images, which ultralytics requires to exist).
    Returns the ``data.yaml`` path and the held-out ground-truth photos (each with its
    ``data`` bytes). Writing the same sites again gives byte-identical files."""
    sites = [Path(site_dir)] if isinstance(site_dir, (str, Path)) else [Path(s) for s in site_dir]
    out = Path(out)
    photos = [p for s in sites for p in _photos(s)]
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    held_out = []
    for k, p in enumerate(photos):
        split = "val" if val_every and k % val_every == 0 else "train"
        name = p["sha256"][:16]
        data = (Path(p["site_dir"]) / p["url"].lstrip("/")).read_bytes()
        (out / "images" / split / f"{name}.jpg").write_bytes(data)
        (out / "labels" / split / f"{name}.txt").write_text(yolo_label(p))
        if split == "val":
            held_out.append({**p, "data": data})
    data_yaml = out / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump({"path": str(out.resolve()), "train": "images/train",
                        "val": "images/val" if held_out else "images/train", "names": coco_names()})
    )
    return data_yaml, held_out


