"""Pictures for people: contact sheets of sampled images, captioned, and the dataset's
per-class, per-split bar chart.

People would rather look at dropped photos than read ids. A contact sheet never fails on
a broken image (those are exactly the ones being shown): an undecodable tile becomes a
grey placeholder with its caption.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from prefect import task


def _thumb(data: bytes | None, size: int) -> Image.Image | None:
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > 50_000_000:  # decompression bomb: don't decode it for a thumbnail
                return None
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
            im.thumbnail((size, size))
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - a broken image gets a placeholder tile
        return None


def contact_sheet(
    items: Sequence[tuple[bytes | None, str]],
    title: str = "",
    thumb: int = 128,
    cols: int = 6,
) -> bytes:
    """A PNG grid of thumbnails, each with a caption under it (``items`` = (bytes, caption))."""
    font = ImageFont.load_default()
    cap_h = 14
    title_h = 20 if title else 0
    rows = max(1, -(-len(items) // cols))
    sheet = Image.new(
        "RGB", (cols * (thumb + 6) + 6, title_h + rows * (thumb + cap_h + 6) + 6), "white"
    )
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 4), title, fill="black", font=font)
    for i, (data, caption) in enumerate(items):
        r, c = divmod(i, cols)
        x = 6 + c * (thumb + 6)
        y = title_h + 6 + r * (thumb + cap_h + 6)
        tile = _thumb(data, thumb)
        if tile is None:
            draw.rectangle(
                [x, y, x + thumb - 1, y + thumb - 1], fill=(200, 200, 200), outline=(120, 120, 120)
            )
            draw.text((x + 4, y + thumb // 2 - 6), "undecodable", fill=(90, 0, 0), font=font)
        else:
            sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
        draw.text((x, y + thumb + 1), caption[: max(4, thumb // 6)], fill="black", font=font)
    out = io.BytesIO()
    sheet.save(out, "PNG", optimize=True)
    return out.getvalue()


def split_bar_chart(report: Any, splits: Sequence[str] = ("train", "val", "test"),
                    title: str = "images per class and split") -> bytes:
    """Grouped bar chart (PNG bytes) of ``report``'s per-class counts (index = class, one
    column per split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = list(report.index)
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(classes) + 2), 4.5), dpi=100)
    width = 0.27
    for i, s in enumerate(splits):
        ax.bar(x + (i - 1) * width, report[s].to_numpy() if len(report) else [], width, label=s)
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 4 else 0, ha="right" if len(classes) > 4 else "center")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@task(name="publish-dataset-report", retries=1)
def publish_split_chart(storage: str | None, report: Any, key: str, splits: Sequence[str]) -> str:
    """Store :func:`split_bar_chart` of ``report`` at ``key``; returns its URI."""
    from carflow.storage import open_storage

    store = open_storage(storage)
    store.put(key, split_bar_chart(report, splits), content_type="image/png")
    return store.uri(key)
