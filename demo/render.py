"""Drawing for the synthetic demo marketplace: cars with a per-class look, and non-car photos.

Every function here is a pure function of its arguments and of the ``numpy`` generator it is
given, so a photo is byte-identical between runs with the same seed (same Pillow/libjpeg).

Car photos
    Each make/model class has its own *learnable* look (:class:`CarStyle`): a body type that
    fixes the silhouette (sedan / hatch / estate / suv / pickup / van: length-to-height
    proportions, roof line, where the cabin sits), a wheel size and spoke count, and a small
    palette of 2–3 body colours plus a trim colour and a rim colour that no other class shares.
    Each photo then randomises what a photographer would: pose (horizontal flip, small rotation
    and shear), scale (the car spans ~30–80 % of the image width), position, lighting
    (brightness), background (sky/ground colours, horizon height, a few distant blocks) and
    sensor noise. The car's axis-aligned bounding box is measured on the alpha mask of the
    drawn car, in pixels of the returned image: ``[x0, y0, x1, y1]`` with ``x1``/``y1``
    exclusive (Pillow's box convention).

Non-car photos
    ``interior`` (seats), ``dashboard`` (gauges and a steering wheel), ``wheel`` (a rim
    close-up), ``text_banner`` (text on a coloured card) and the one dealer banner. These are
    what real listings mix in with the exterior shots; a dataset for make/model
    classification has to drop them.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
BBox = tuple[int, int, int, int]

#: supersampling factor for anti-aliased shapes (draw big, then ``Image.reduce``)
SS = 2


# ---------------------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CarStyle:
    """The fixed look of one make/model class.

    ``body`` picks the silhouette; ``aspect`` is height/length of the whole car (roof to
    tyre bottom); ``wheel`` is the wheel radius as a fraction of the car length; ``spokes``
    the number of rim spokes; ``palette`` the 2–3 body colours a car of this class comes in;
    ``trim`` the bumper/skirt colour; ``rim`` the wheel colour; ``roof`` an optional
    contrasting roof colour.
    """

    body: str
    aspect: float
    wheel: float
    spokes: int
    palette: tuple[RGB, ...]
    trim: RGB
    rim: RGB
    roof: RGB | None = None


#: make/model → its look. Body colours are chosen so that no two classes share a hue family.
CAR_STYLES: dict[str, CarStyle] = {
    "volkswagen/golf": CarStyle("hatch", 0.37, 0.085, 5, ((196, 30, 36), (150, 18, 28), (220, 60, 50)),
                                (30, 30, 32), (200, 202, 208)),
    "mercedes-benz/v-class": CarStyle("van", 0.50, 0.072, 10, ((236, 236, 232), (214, 216, 220)),
                                      (60, 62, 66), (150, 152, 158)),
    "ford/ranger": CarStyle("pickup", 0.41, 0.098, 6, ((226, 112, 22), (240, 150, 40), (205, 172, 112)),
                            (45, 45, 45), (40, 40, 44)),
    "bmw/3-series": CarStyle("sedan", 0.30, 0.080, 7, ((26, 72, 172), (62, 112, 204)),
                             (28, 28, 34), (190, 192, 198)),
    "toyota/rav4": CarStyle("suv", 0.44, 0.095, 5, ((42, 122, 52), (88, 132, 42), (60, 100, 60)),
                            (70, 70, 66), (120, 120, 118), roof=(30, 30, 30)),
    "volkswagen/passat": CarStyle("estate", 0.32, 0.080, 8, ((20, 110, 122), (42, 142, 152)),
                                  (36, 40, 44), (210, 210, 212), roof=(200, 200, 206)),
    "mercedes-benz/c-class": CarStyle("sedan", 0.31, 0.082, 5, ((182, 184, 190), (150, 152, 160)),
                                      (20, 20, 22), (60, 60, 64)),
    "audi/a4": CarStyle("sedan", 0.29, 0.078, 10, ((102, 40, 132), (132, 70, 166)),
                        (25, 25, 25), (215, 215, 220)),
    "toyota/corolla": CarStyle("hatch", 0.35, 0.080, 5, ((226, 190, 30), (240, 214, 80)),
                               (40, 40, 40), (170, 170, 176)),
    "bmw/x5": CarStyle("suv", 0.43, 0.100, 6, ((112, 66, 34), (146, 96, 52), (90, 52, 30)),
                       (30, 28, 26), (30, 30, 30)),
}

# Silhouettes in unit coordinates: x along the car (0 = rear, 1 = front, the car faces right),
# y down from the roof (0) to the bottom of the tyres (1). ``belt`` is the window line,
# ``sill`` the lower body edge, ``cabin`` the greenhouse polygon, ``axles`` the wheel centres.
_BODIES: dict[str, dict] = {
    "sedan": {"belt": 0.50, "sill": 0.84, "axles": (0.19, 0.80), "bed": None,
              "cabin": [(0.17, 0.50), (0.31, 0.05), (0.59, 0.02), (0.75, 0.50)],
              "nose": 0.62, "tail": 0.56},
    "hatch": {"belt": 0.52, "sill": 0.84, "axles": (0.17, 0.81), "bed": None,
              "cabin": [(0.04, 0.52), (0.10, 0.04), (0.55, 0.01), (0.73, 0.52)],
              "nose": 0.64, "tail": 0.55},
    "estate": {"belt": 0.50, "sill": 0.84, "axles": (0.17, 0.81), "bed": None,
               "cabin": [(0.03, 0.50), (0.06, 0.04), (0.60, 0.01), (0.76, 0.50)],
               "nose": 0.63, "tail": 0.52},
    "suv": {"belt": 0.50, "sill": 0.80, "axles": (0.17, 0.82), "bed": None,
            "cabin": [(0.04, 0.50), (0.07, 0.03), (0.64, 0.0), (0.79, 0.50)],
            "nose": 0.56, "tail": 0.52},
    "pickup": {"belt": 0.47, "sill": 0.80, "axles": (0.16, 0.82), "bed": (0.02, 0.39),
               "cabin": [(0.39, 0.47), (0.41, 0.03), (0.60, 0.0), (0.73, 0.47)],
               "nose": 0.52, "tail": 0.47},
    "van": {"belt": 0.45, "sill": 0.84, "axles": (0.15, 0.84), "bed": None,
            "cabin": [(0.02, 0.45), (0.02, 0.03), (0.78, 0.0), (0.95, 0.48)],
            "nose": 0.55, "tail": 0.50},
}

_GLASS = (38, 52, 66)
_TYRE = (24, 24, 26)


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------
def _clip(c: np.ndarray | tuple[float, ...]) -> RGB:
    a = np.clip(np.round(np.asarray(c, dtype=np.float64)), 0, 255).astype(int)
    return int(a[0]), int(a[1]), int(a[2])


def _shade(c: RGB, f: float) -> RGB:
    return _clip(np.asarray(c, dtype=np.float64) * f)


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return _clip(np.asarray(a, dtype=np.float64) * (1 - t) + np.asarray(b, dtype=np.float64) * t)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's embedded default font at ``size`` px (bitmap fallback without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # very old Pillow
        return ImageFont.load_default()


@lru_cache(maxsize=1)
def _gauss_lut() -> np.ndarray:
    """256 equiprobable quantiles of the standard normal: random bytes → Gaussian noise."""
    nd = NormalDist()
    return np.array([nd.inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)


def add_noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Gaussian sensor noise (σ = ``sigma``) on an RGB image; alpha, if any, is kept.

    The noise is drawn as random bytes mapped through a table of normal quantiles: the
    same distribution to within 1/256 quantile steps, at a fraction of the cost."""
    if sigma <= 0:
        return img
    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    arr = np.asarray(img.convert("RGB")).astype(np.int16)
    lut = np.round(_gauss_lut() * np.float32(sigma)).astype(np.int16)
    arr += lut[np.frombuffer(rng.bytes(arr.size), dtype=np.uint8)].reshape(arr.shape)
    np.clip(arr, 0, 255, out=arr)
    out = Image.fromarray(arr.astype(np.uint8), "RGB")
    if alpha is not None:
        out.putalpha(alpha)
    return out


def _vgradient(w: int, h: int, top: RGB, bottom: RGB) -> np.ndarray:
    """A (h, w, 3) read-only view of a vertical colour gradient."""
    t = np.linspace(0.0, 1.0, max(h, 1), dtype=np.float32)[:, None, None]
    col = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.broadcast_to(col, (h, w, 3))


def background(size: tuple[int, int], rng: np.random.Generator, horizon: int) -> Image.Image:
    """An outdoor scene without the car: a sky gradient above ``horizon``, ground below it,
    a few muted distant blocks (buildings/hedges) on the horizon. Colours are kept low in
    saturation so that the car's own colour is what characterises a class."""
    w, h = size
    horizon = int(min(max(horizon, 1), h - 1))
    if rng.random() < 0.7:  # blue sky
        top = _clip((_u(rng, 70, 150), _u(rng, 120, 180), _u(rng, 185, 240)))
    else:  # overcast
        g = _u(rng, 150, 205)
        top = _clip((g, g + _u(rng, 0, 8), g + _u(rng, 4, 16)))
    sky_low = _mix(top, (230, 232, 236), _u(rng, 0.3, 0.7))
    g = _u(rng, 70, 140)
    tint = rng.choice(3)
    ground = np.array([g, g, g]) + (np.array([[14, 6, -8], [-6, 10, -10], [0, 0, 4]])[tint] * _u(rng, 0.5, 1.5))
    ground_top = _clip(ground * _u(rng, 0.85, 1.0))
    ground_bottom = _clip(ground * _u(rng, 0.55, 0.85))
    arr = np.empty((h, w, 3), np.uint8)
    arr[:horizon] = _vgradient(w, horizon, top, sky_low)
    arr[horizon:] = _vgradient(w, h - horizon, ground_top, ground_bottom)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 5))):  # distant blocks standing on the horizon
        bw = _u(rng, 0.08, 0.3) * w
        bh = _u(rng, 0.05, 0.25) * h
        x = _u(rng, -0.1, 1.0) * w
        v = _u(rng, 90, 180)
        col = _clip((v + _u(rng, -12, 12), v + _u(rng, -12, 12), v + _u(rng, -12, 12)))
        d.rectangle([x, horizon - bh, x + bw, horizon + 1], fill=col)
    return img


# ---------------------------------------------------------------------------------------
# The car
# ---------------------------------------------------------------------------------------
def _draw_wheel(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, style: CarStyle, rot: float) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_TYRE)
    rr = r * 0.62
    d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=style.rim)
    dark = _shade(style.rim, 0.45) if sum(style.rim) > 200 else _mix(style.rim, (160, 160, 160), 0.4)
    for k in range(style.spokes):
        a = rot + 2 * math.pi * k / style.spokes
        d.line([cx + math.cos(a) * rr * 0.25, cy + math.sin(a) * rr * 0.25,
                cx + math.cos(a) * rr * 0.95, cy + math.sin(a) * rr * 0.95],
               fill=dark, width=max(1, int(r * 0.09)))
    hub = r * 0.16
    d.ellipse([cx - hub, cy - hub, cx + hub, cy + hub], fill=dark)


def draw_car_layer(style: CarStyle, length: int, rng: np.random.Generator) -> Image.Image:
    """The car alone on a transparent RGBA canvas, facing right, ``length`` px long.

    The body colour is one of the class palette's colours under a random lighting factor;
    everything else (silhouette, proportions, wheel size, trim, rim, roof) is the class's.
    """
    spec = _BODIES[style.body]
    L = max(8, int(length)) * SS
    H = max(4, int(round(length * style.aspect))) * SS
    pad = 2 * SS
    img = Image.new("RGBA", (L + 2 * pad, H + 2 * pad), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    light = _u(rng, 0.82, 1.08)
    body = _shade(tuple(style.palette[int(rng.integers(len(style.palette)))]), light)
    body_dark = _shade(body, 0.72)

    def P(x: float, y: float) -> tuple[float, float]:
        return pad + x * L, pad + y * H

    belt, sill = spec["belt"], spec["sill"]
    r = style.wheel * L
    wheel_cy = H - r  # tyres touch y = 1
    nose, tail = spec["nose"], spec["tail"]
    # cabin (greenhouse) in body colour, then glass inset
    cabin = [P(x, y) for x, y in spec["cabin"]]
    d.polygon(cabin, fill=body)
    cx = sum(p[0] for p in cabin) / len(cabin)
    cy = sum(p[1] for p in cabin) / len(cabin)
    glass = [(cx + (px - cx) * 0.86, cy + (py - cy) * 0.84 + 0.02 * H) for px, py in cabin]
    d.polygon(glass, fill=_shade(_GLASS, light))
    if style.roof is not None:
        (x0, y0), (x1, y1) = cabin[1], cabin[2]
        d.polygon([(x0, y0), (x1, y1), (x1, y1 + 0.05 * H), (x0, y0 + 0.05 * H)], fill=style.roof)
    # B/C pillars
    gx0 = min(p[0] for p in glass)
    gx1 = max(p[0] for p in glass)
    for t in (0.5,) if style.body in ("sedan", "pickup") else (0.42, 0.72):
        x = gx0 + (gx1 - gx0) * t
        d.line([x, pad, x, P(0, belt)[1]], fill=body, width=max(2, int(L * 0.012)))
    # lower body: a rounded slab from tail to nose
    slab = [P(0.0, tail), P(0.03, belt - 0.02), P(0.6, belt - 0.03), P(0.96, nose - 0.04),
            P(1.0, nose + 0.06), P(1.0, sill - 0.06), P(0.98, sill), P(0.02, sill), P(0.0, sill - 0.08)]
    d.polygon(slab, fill=body)
    if spec["bed"] is not None:  # pickup bed rail and tailgate line
        b0, b1 = spec["bed"]
        d.line([P(b0, belt - 0.01), P(b1, belt - 0.01)], fill=body_dark, width=max(2, int(L * 0.01)))
        d.line([P(0.015, tail + 0.02), P(0.015, sill - 0.05)], fill=body_dark, width=max(1, int(L * 0.006)))
    # trim: bumper/skirt band in the class's trim colour
    d.polygon([P(0.0, sill - 0.12), P(1.0, sill - 0.12), P(1.0, sill - 0.04), P(0.98, sill),
               P(0.02, sill), P(0.0, sill - 0.04)], fill=style.trim)
    # door lines and handles
    door_xs = (0.40, 0.60) if style.body not in ("van", "pickup") else ((0.55, 0.74) if style.body == "van" else (0.50, 0.72))
    for x in door_xs:
        d.line([P(x, belt + 0.02), P(x, sill - 0.13)], fill=body_dark, width=max(1, int(L * 0.004)))
        hx, hy = P(x - 0.07, belt + 0.07)
        d.rectangle([hx, hy, hx + 0.04 * L, hy + 0.02 * H], fill=body_dark)
    # lights
    hx0, hy0 = P(0.955, nose)
    d.rectangle([hx0, hy0, pad + L - 1, hy0 + 0.07 * H], fill=(250, 246, 214))
    tx1, ty0 = P(0.03, tail + 0.02)
    d.rectangle([pad, ty0, tx1, ty0 + 0.08 * H], fill=(196, 20, 24))
    # wheel arches, then wheels
    spin = _u(rng, 0, 2 * math.pi)
    for ax in spec["axles"]:
        x = pad + ax * L
        y = pad + wheel_cy
        ra = r * 1.13
        d.pieslice([x - ra, y - ra, x + ra, y + ra], 180, 360, fill=_shade(body, 0.25))
        d.rectangle([x - ra, y, x + ra, y + r * 0.2], fill=(0, 0, 0, 0))
        _draw_wheel(d, x, y, r, style, spin)
    return img.reduce(SS)


def _affine(layer: Image.Image, angle_deg: float, shear: float) -> Image.Image:
    """Rotate (degrees, counter-clockwise) and shear an RGBA layer, expanding the canvas so
    nothing is cut off."""
    w, h = layer.size
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    m = rot @ np.array([[1.0, shear], [0.0, 1.0]])
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=np.float64).T
    out = m @ corners
    mn = out.min(axis=1)
    size = (int(math.ceil(out[0].max() - mn[0])), int(math.ceil(out[1].max() - mn[1])))
    inv = np.linalg.inv(m)
    off = inv @ mn
    data = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return layer.transform(size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)


def alpha_bbox(alpha: np.ndarray, threshold: int = 64) -> BBox | None:
    """Tight ``[x0, y0, x1, y1]`` (exclusive ends) of the pixels with alpha > threshold."""
    ys = np.flatnonzero((alpha > threshold).any(axis=1))
    xs = np.flatnonzero((alpha > threshold).any(axis=0))
    if not len(xs) or not len(ys):
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


@dataclass
class Rendered:
    """One rendered photo: the image and, for a car, its bounding box in that image."""

    image: Image.Image
    bbox: BBox | None


def render_car(style: CarStyle, size: tuple[int, int], rng: np.random.Generator, *,
               transparent: bool = False, noise: tuple[float, float] = (2.0, 6.0)) -> Rendered:
    """A photo of one car of ``style`` in a random pose, scale, position and scene.

    With ``transparent`` the car is returned on a fully transparent background (an RGBA
    "studio cut-out", with a half-transparent shadow) instead of an outdoor scene.
    """
    w, h = size
    frac = _u(rng, 0.30, 0.80)
    flip = bool(rng.random() < 0.5)
    angle = _u(rng, -5.0, 5.0)
    shear = _u(rng, -0.10, 0.10)
    length = max(8, int(round(frac * w)))
    layer = None
    for _ in range(8):  # shrink until the transformed car fits with a margin
        layer = draw_car_layer(style, length, rng)
        if flip:
            layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        layer = _affine(layer, angle, shear)
        if layer.width <= w - 4 and layer.height <= h - 4:
            break
        length = int(length * 0.85)
    assert layer is not None
    layer = layer.crop(layer.getchannel("A").getbbox())  # drop the transparent margins
    box = alpha_bbox(np.asarray(layer.getchannel("A")))
    assert box is not None
    bx0, by0, bx1, by1 = box
    # place the car fully inside the frame, in the lower three quarters
    x = int(rng.integers(2, max(3, w - 2 - layer.width + 1)))
    y_lo = max(2, int(h * 0.25) - by0)
    y_hi = max(y_lo + 1, h - 2 - layer.height + 1)
    y = int(rng.integers(y_lo, y_hi))
    car_bottom = y + by1
    car_h = by1 - by0
    horizon = int(car_bottom - car_h * _u(rng, 0.25, 0.7))
    if transparent:
        bg = Image.new("RGBA", size, (0, 0, 0, 0))
    else:
        bg = background(size, rng, horizon).convert("RGBA")
    shadow = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(shadow).ellipse(
        [x + bx0 + 0.03 * (bx1 - bx0), car_bottom - 0.08 * car_h, x + bx1 - 0.03 * (bx1 - bx0), car_bottom + 0.06 * car_h],
        fill=(0, 0, 0, 90))
    bg.alpha_composite(shadow)
    bg.alpha_composite(layer, (x, y))
    bbox = (x + bx0, y + by0, x + bx1, y + by1)
    bbox = (max(0, bbox[0]), max(0, bbox[1]), min(w, bbox[2]), min(h, bbox[3]))
    if transparent:
        return Rendered(bg, bbox)
    img = add_noise(bg.convert("RGB"), rng, _u(rng, *noise))
    return Rendered(img, bbox)


def render_studio(style: CarStyle, size: tuple[int, int], rng: np.random.Generator, *,
                  frac: float = 0.8, noise: float = 1.5) -> Rendered:
    """A press/dealer "studio" shot: the car side-on, centred, ``frac`` of the width
    long, on a plain white background, in the same pose whatever the class. Two cars of
    one body type shot this way share their silhouette (their grey pHash/dHash are a few
    bits apart) and differ in colour and detail: the near-duplicate trap of real
    studio photos."""
    w, h = size
    layer = draw_car_layer(style, int(frac * w), rng)
    layer = layer.crop(layer.getchannel("A").getbbox())
    bg = Image.new("RGBA", size, (255, 255, 255, 255))
    x = (w - layer.width) // 2
    y = int(h * 0.78) - layer.height
    bg.alpha_composite(layer, (x, y))
    box = alpha_bbox(np.asarray(layer.getchannel("A")))
    assert box is not None
    bbox = (x + box[0], y + box[1], x + box[2], y + box[3])
    return Rendered(add_noise(bg.convert("RGB"), rng, noise), bbox)


# ---------------------------------------------------------------------------------------
# Non-car photos
# ---------------------------------------------------------------------------------------
def render_interior(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Front seats seen from the back door: dark cabin, a window, two seats."""
    w, h = size
    base = _clip(np.array([_u(rng, 25, 70)] * 3) + rng.uniform(-6, 6, 3))
    img = Image.new("RGB", (w * SS, h * SS), base)
    d = ImageDraw.Draw(img)
    W, H = w * SS, h * SS
    sky = _clip((_u(rng, 150, 220), _u(rng, 170, 225), _u(rng, 190, 240)))
    d.polygon([(0.05 * W, 0.05 * H), (0.95 * W, 0.03 * H), (0.9 * W, 0.3 * H), (0.1 * W, 0.32 * H)], fill=sky)
    seat = [(35, 35, 38), (192, 170, 140), (110, 110, 116), (140, 32, 30), (86, 60, 42)][int(rng.integers(5))]
    seat = _shade(seat, _u(rng, 0.85, 1.1))
    seam = _shade(seat, 0.7)
    for cx in (0.28, 0.72):
        cx = (cx + _u(rng, -0.04, 0.04)) * W
        sw = _u(rng, 0.28, 0.34) * W
        d.rounded_rectangle([cx - sw / 2, 0.22 * H, cx + sw / 2, 0.88 * H], radius=int(0.08 * W), fill=seat)
        d.rounded_rectangle([cx - sw * 0.3, 0.08 * H, cx + sw * 0.3, 0.24 * H], radius=int(0.04 * W), fill=seat)
        for t in (0.4, 0.55, 0.7):
            d.line([cx - sw * 0.4, t * H, cx + sw * 0.4, t * H], fill=seam, width=SS * 2)
    d.rectangle([0, 0.86 * H, W, H], fill=_shade(base, 0.6))
    img = img.reduce(SS)
    return add_noise(img, rng, _u(rng, 2, 6))


def render_dashboard(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The driver's view: windscreen, dark dashboard, two gauges, a screen and the wheel."""
    w, h = size
    W, H = w * SS, h * SS
    sky = _clip((_u(rng, 110, 200), _u(rng, 150, 215), _u(rng, 190, 245)))
    img = Image.new("RGB", (W, H), sky)
    d = ImageDraw.Draw(img)
    road = _u(rng, 70, 110)
    d.rectangle([0, 0.28 * H, W, 0.45 * H], fill=_clip((road, road, road)))
    dash = _clip(np.array([_u(rng, 18, 45)] * 3))
    d.rectangle([0, 0.38 * H, W, H], fill=dash)
    needle = [(230, 60, 20), (240, 160, 20), (255, 255, 255)][int(rng.integers(3))]
    for gx in (0.33, 0.57):
        cx, cy, r = gx * W, 0.55 * H, 0.1 * W
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(10, 10, 12), outline=(180, 180, 186), width=SS * 2)
        for k in range(11):
            a = math.radians(135 + 27 * k)
            d.line([cx + math.cos(a) * r * 0.75, cy + math.sin(a) * r * 0.75,
                    cx + math.cos(a) * r * 0.92, cy + math.sin(a) * r * 0.92], fill=(230, 230, 230), width=SS)
        a = math.radians(135 + _u(rng, 20, 250))
        d.line([cx, cy, cx + math.cos(a) * r * 0.85, cy + math.sin(a) * r * 0.85], fill=needle, width=SS * 2)
    d.rectangle([0.72 * W, 0.45 * H, 0.92 * W, 0.62 * H], fill=_clip((20, _u(rng, 60, 120), _u(rng, 140, 220))))
    # steering wheel: a thick ring with three spokes, in front of the gauges
    cx, cy = _u(rng, 0.38, 0.5) * W, _u(rng, 0.85, 0.98) * H
    rx, ry = 0.34 * W, 0.3 * H
    rim = _clip(np.array([_u(rng, 10, 40)] * 3))
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=rim, width=int(0.045 * W))
    for a in (200, 340, 90):
        t = math.radians(a)
        d.line([cx, cy, cx + math.cos(t) * rx, cy + math.sin(t) * ry], fill=rim, width=int(0.05 * W))
    d.ellipse([cx - 0.07 * W, cy - 0.07 * W, cx + 0.07 * W, cy + 0.07 * W], fill=_shade(rim, 1.5))
    img = img.reduce(SS)
    return add_noise(img, rng, _u(rng, 2, 6))


def render_wheel(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A rim close-up: a tyre filling most of the frame, spokes, brake disc and caliper."""
    w, h = size
    W, H = w * SS, h * SS
    body = _clip(rng.uniform(30, 220, 3))
    img = Image.new("RGB", (W, H), body)
    d = ImageDraw.Draw(img)
    g = _u(rng, 60, 120)
    d.rectangle([0, 0.82 * H, W, H], fill=_clip((g, g, g)))
    cx, cy = _u(rng, 0.4, 0.6) * W, _u(rng, 0.45, 0.55) * H
    r = min(W, H) * _u(rng, 0.40, 0.48)
    d.ellipse([cx - r * 1.1, cy - r * 1.1, cx + r * 1.1, cy + r * 1.1], fill=_shade(body, 0.2))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_TYRE)
    rr = r * 0.68
    rim = [(200, 202, 208), (40, 40, 44), (150, 130, 80), (120, 122, 128)][int(rng.integers(4))]
    d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=_shade(rim, 0.5))
    disc = rr * 0.8
    d.ellipse([cx - disc, cy - disc, cx + disc, cy + disc], fill=(110, 104, 98))
    caliper = [(200, 20, 20), (230, 190, 20), (40, 40, 40)][int(rng.integers(3))]
    d.rounded_rectangle([cx + disc * 0.3, cy - disc * 0.8, cx + disc * 0.75, cy - disc * 0.1], radius=SS * 4, fill=caliper)
    n = int(rng.integers(5, 11))
    spin = _u(rng, 0, 2 * math.pi)
    for k in range(n):
        a = spin + 2 * math.pi * k / n
        d.line([cx, cy, cx + math.cos(a) * rr, cy + math.sin(a) * rr], fill=rim, width=int(rr * 0.16))
    hub = rr * 0.22
    d.ellipse([cx - hub, cy - hub, cx + hub, cy + hub], fill=rim)
    for k in range(5):
        a = 2 * math.pi * k / 5
        lx, ly = cx + math.cos(a) * hub * 0.6, cy + math.sin(a) * hub * 0.6
        d.ellipse([lx - SS * 2, ly - SS * 2, lx + SS * 2, ly + SS * 2], fill=(60, 60, 60))
    img = img.reduce(SS)
    return add_noise(img, rng, _u(rng, 2, 6))


BANNER_TEXTS: tuple[tuple[str, ...], ...] = (
    ("FINANCING", "AVAILABLE", "from 2.9% APR"),
    ("SOLD",),
    ("CALL NOW", "0800 555 0199"),
    ("12 MONTHS", "WARRANTY"),
    ("NEW ARRIVAL", "more photos soon"),
    ("PART EXCHANGE", "WELCOME"),
    ("FULL SERVICE", "HISTORY"),
)


def _centered_text(d: ImageDraw.ImageDraw, lines: tuple[str, ...], box: tuple[float, float, float, float],
                   colour: RGB, max_size: int) -> None:
    x0, y0, x1, y1 = box
    n = len(lines)
    size = max(6, int(min(max_size, (y1 - y0) / (n * 1.35))))
    while size > 6:
        f = font(size)
        if all(d.textlength(t, font=f) <= (x1 - x0) * 0.94 for t in lines):
            break
        size -= 1
    f = font(size)
    total = n * size * 1.3
    y = y0 + ((y1 - y0) - total) / 2
    for t in lines:
        tw = d.textlength(t, font=f)
        d.text((x0 + ((x1 - x0) - tw) / 2, y), t, fill=colour, font=f)
        y += size * 1.3


def render_text_banner(size: tuple[int, int], rng: np.random.Generator, lines: tuple[str, ...]) -> Image.Image:
    """Text on a saturated coloured card (what sellers upload as a "photo")."""
    w, h = size
    card = _clip(rng.uniform(0, 255, 3))
    mx = int(np.argmax(card))
    card = _clip(np.asarray(card) * 0.6 + np.eye(3)[mx] * 100)
    img = Image.new("RGB", size, card)
    d = ImageDraw.Draw(img)
    ink = (255, 255, 255) if sum(card) < 400 else (20, 20, 20)
    m = int(min(w, h) * 0.06)
    d.rectangle([m, m, w - m - 1, h - m - 1], outline=ink, width=max(1, m // 3))
    _centered_text(d, lines, (2 * m, 2 * m, w - 2 * m, h - 2 * m), ink, max_size=int(h * 0.22))
    return add_noise(img, rng, _u(rng, 0.5, 2.5))


def render_dealer_banner(size: tuple[int, int]) -> Image.Image:
    """The one dealer banner that a dealer puts into every listing (no randomness)."""
    w, h = size
    img = Image.new("RGB", size, (14, 46, 96))
    d = ImageDraw.Draw(img)
    for k in range(6):
        y = h * (0.72 + 0.05 * k)
        d.line([0, y, w, y - h * 0.3], fill=(240, 180, 30) if k % 2 == 0 else (30, 90, 170), width=max(1, h // 40))
    r = min(w, h) * 0.16
    cx, cy = w * 0.18, h * 0.34
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 180, 30))
    _centered_text(d, ("AM",), (cx - r, cy - r, cx + r, cy + r), (14, 46, 96), max_size=int(r))
    _centered_text(d, ("AUTOHAUS", "MUSTERMANN"), (w * 0.36, h * 0.12, w * 0.97, h * 0.56), (255, 255, 255),
                   max_size=int(h * 0.16))
    _centered_text(d, ("Quality used cars since 1987",), (w * 0.05, h * 0.56, w * 0.95, h * 0.7), (220, 230, 245),
                   max_size=int(h * 0.08))
    return img


# ---------------------------------------------------------------------------------------
# Encoders (including the deliberately broken ones)
# ---------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **params) -> bytes:
    """Encode an image with Pillow into bytes (``fmt``: JPEG/PNG/GIF)."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def jpeg(img: Image.Image, quality: int = 90, **params) -> bytes:
    """Baseline JPEG with 4:2:0 subsampling at ``quality``."""
    return encode(img, "JPEG", quality=int(quality), **params)


def exif_orientation_jpeg(upright: Image.Image, quality: int = 90) -> bytes:
    """A JPEG whose stored pixels are rotated 90° counter-clockwise, with EXIF
    Orientation = 6 ("rotate 90° CW to display"): viewers and ``ImageOps.exif_transpose``
    show the upright image; a decoder that ignores EXIF sees it on its side."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(stored, quality, exif=exif.tobytes())


def animated_gif(frames: list[Image.Image], duration_ms: int = 400) -> bytes:
    """A looping GIF of ``frames`` (quantised to 256 colours each)."""
    pal = [f.convert("RGB").quantize(255, method=Image.Quantize.FASTOCTREE) for f in frames]
    return encode(pal[0], "GIF", save_all=True, append_images=pal[1:], duration=duration_ms, loop=0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=4)
def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A decompression bomb: a *valid* 1-bit greyscale PNG of ``width`` × ``height`` pixels of
    black, tiny on disk (~width·height/8/1000 bytes) but ``width·height`` pixels when decoded
    (Pillow refuses to open one above 2 × ``Image.MAX_IMAGE_PIXELS``).

    Written by hand: IHDR declares the size; the IDAT stream is zlib-compressed zero rows fed
    in chunks, so generating it never holds more than one chunk of zeros in memory."""
    row = 1 + (width + 7) // 8  # filter byte + packed bits
    comp = zlib.compressobj(9)
    chunk_rows = max(1, (1 << 20) // row)
    zeros = bytes(row * chunk_rows)
    parts = []
    left = height
    while left > 0:
        n = min(left, chunk_rows)
        parts.append(comp.compress(zeros if n == chunk_rows else zeros[: n * row]))
        left -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def html_error_page(status: str = "Image temporarily unavailable") -> bytes:
    """An HTML page of the kind a CDN serves in place of a missing image (saved as .jpg)."""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + status + "</title></head>\n"
        "<body><h1>" + status + "</h1><p>The requested image could not be delivered. "
        "Please try again later.</p><hr><address>demo-cdn/1.0</address></body></html>\n"
    ).encode()
