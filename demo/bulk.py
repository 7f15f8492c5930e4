"""Many small generated images and their manifest v0, cheaply, for tests and benches
of the orchestration (the workload is manifests and hashes, not pixels).

``bodies`` distinct small JPEGs are drawn once; image ``i`` is body ``i % bodies`` with a
JPEG comment segment holding ``i`` after its SOI marker, so every image has its own
sha256 (its own ``image_id``) and decodes like its body. Every ``broken_every``-th image
is a planted problem instead (empty, HTML served as a photo, a cut JPEG), so the clean
stage records reasons too.
"""

from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from carflow.keys import image_key
from carflow.manifest import INGEST_SCHEMA, from_records, manifest_key, write_manifest
from carflow.storage import Storage


def jpeg_bodies(n: int = 16, size: tuple[int, int] = (96, 72), seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # a smooth colour field
        img = Image.fromarray(base).resize(size, Image.BILINEAR)
        noise = rng.normal(0, 6, (size[1], size[0], 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def with_comment(jpeg: bytes, text: str) -> bytes:
    """``jpeg`` with a COM segment after SOI: other bytes, the same pixels."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def bulk_image(i: int, bodies: list[bytes], broken_every: int = 0) -> bytes:
    body = bodies[i % len(bodies)]
    if broken_every and i % broken_every == broken_every - 1:
        kind = (i // broken_every) % 3
        if kind == 0:
            return b""
        if kind == 1:
            return f"<html><body>not a photo {i}</body></html>".encode() * 8
        return with_comment(body, f"cut {i}")[: len(body) // 3]
    return with_comment(body, f"carflow bulk {i}")


def write_bulk_ingest(
    store: Storage, n: int, *, bodies: int = 16, broken_every: int = 0, seed: int = 0, workers: int = 8
) -> list[str]:
    """Store ``n`` generated images and write manifest v0 for them (one listing of four
    photos per four images); returns the image ids in order."""
    bank = jpeg_bodies(bodies, seed=seed)

    def put(i: int) -> tuple[str, int]:
        data = bulk_image(i, bank, broken_every)
        return store.put_image(data), len(data)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        stored = list(pool.map(put, range(n)))
    rows = [
        {"image_id": image_id, "listing_id": f"bulk:{i // 4}", "site": "bulk", "url": None,
         "photo_index": i % 4, "make": "volkswagen", "model": "golf", "year": 2017,
         "label": "volkswagen_golf_2017", "make_raw": "VW", "model_raw": "Golf",
         "raw_key": image_key(image_id), "bytes": size, "content_type": "image/jpeg",
         "source": "folders", "crawl_id": None, "first_seen": i, "status": "kept", "reason": None}
        for i, (image_id, size) in enumerate(stored)
    ]
    write_manifest(store, manifest_key("ingest"), from_records(rows, INGEST_SCHEMA), INGEST_SCHEMA)
    return [image_id for image_id, _ in stored]
