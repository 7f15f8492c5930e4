"""Pictures for people: contact sheets of sampled images, captioned.

People would rather look at dropped photos than read ids. A contact sheet never fails on
a broken image (those are exactly the ones being shown): an undecodable tile becomes a
grey placeholder with its caption.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


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
