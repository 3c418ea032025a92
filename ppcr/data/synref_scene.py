"""SynRef scenes: sampling object attributes and positions, shape masks, and rendering.

Masks are rasterised with numpy (implicit shapes) or PIL (polygons), never with per-pixel
Python loops. Objects are drawn back to front (``depth`` 0 first); an object's visible mask
is its full mask minus everything drawn after it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ppcr.data.synref_language import COLORS, FAMILIES, PATTERNS, SHAPES, SIZES

RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 140, 25), "yellow": (240, 220, 40), "green": (35, 165, 60),
    "cyan": (40, 200, 210), "blue": (35, 75, 215), "purple": (135, 55, 185), "pink": (245, 125, 190),
}
assert tuple(RGB) == COLORS
# at a 256-pixel image. synref-2.0 doubled them (13 / 20 / 29 before): a median target of 4.2-4.5 % of the image,
# about 2.3 vision tokens across at the small preset's 8 x 8 grid, and half of the targets partly occluded
# (notes/synref_geometry.md)
RADIUS: dict[str, float] = {"small": 26.0, "medium": 40.0, "large": 58.0}
MIN_VISIBLE = 0.5  # every object keeps at least this fraction of its pixels visible
PLACEMENT_TRIES = 30


@dataclass
class SceneObjectSpec:
    """One drawn object: attributes, geometry and masks."""

    shape: str
    color: str
    size: str
    pattern: str
    cx: float
    cy: float
    radius: float
    full: np.ndarray  # bool HxW, unoccluded
    visible: np.ndarray | None = None  # bool HxW, after occlusion

    @property
    def box(self) -> list[float]:
        """Extent [x0, y0, x1, y1] (pixel edges) of the unoccluded mask."""
        cols, rows = np.flatnonzero(self.full.any(0)), np.flatnonzero(self.full.any(1))
        return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


# --------------------------------------------------------------------------- masks


def _grid(size: int, cx: float, cy: float, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets from (cx, cy), in units of r."""
    coords = (np.arange(size, dtype=np.float32) + 0.5)
    return (coords[None, :] - cx) / r, (coords[:, None] - cy) / r


def _polygon(points: list[tuple[float, float]], size: int) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon(points, fill=1)
    return np.asarray(im, dtype=bool)


def _regular(n: int, cx: float, cy: float, r: float, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]


def _polygon_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape centred at (cx, cy) with half-extent about r."""
    if shape == "square":
        s = 0.8 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "triangle":
        return _regular(3, cx, cy + 0.15 * r, 1.05 * r)
    if shape == "pentagon":
        return _regular(5, cx, cy, r)
    if shape == "hexagon":
        return _regular(6, cx, cy, r, start=0.0)
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + math.pi * k / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + math.pi * k / 5)) for k in range(10)]
    if shape == "cross":
        a, w = r, 0.33 * r
        pts = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a),
               (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(cx + r * xi / 16.5, cy + r * (yi - 2.5) / 16.5) for xi, yi in zip(x, y)]
    raise ValueError(f"not a polygon shape: {shape}")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean ``size`` x ``size`` mask of ``shape`` centred at (cx, cy) with half-extent ``r``."""
    if shape in ("circle", "oval", "ring", "crescent"):
        dx, dy = _grid(size, cx, cy, r)
        if shape == "oval":
            return dx * dx + (dy / 0.62) ** 2 <= 1.0
        d2 = dx * dx + dy * dy
        if shape == "circle":
            return d2 <= 1.0
        if shape == "ring":
            return (d2 <= 1.0) & (d2 >= 0.3)
        return (d2 <= 1.0) & ((dx - 0.5) ** 2 + (dy + 0.15) ** 2 >= 0.64)  # crescent
    return _polygon(_polygon_points(shape, cx, cy, r), size)


# --------------------------------------------------------------------------- scene sampling


def _shape_palette(rng: np.random.Generator, family: str | None) -> list[str]:
    """A few shapes for this image (so categories repeat); >= 2 from ``family`` when given."""
    n = int(rng.integers(3, 6))
    if family is None:
        return [SHAPES[i] for i in rng.choice(len(SHAPES), n, replace=False)]
    own = FAMILIES[family]
    other = [s for s in SHAPES if s not in own]
    k = int(rng.integers(2, min(n, len(own)) + 1))
    return ([own[i] for i in rng.choice(len(own), k, replace=False)]
            + [other[i] for i in rng.choice(len(other), n - k, replace=False)])


def sample_attributes(rng: np.random.Generator, suite: str, family: str | None) -> list[dict[str, str]]:
    """Attributes of the objects of one image, in drawing order.

    ``synref+`` makes most objects share one shape and draws their colours from a few, so
    that only fine attributes tell them apart.
    """
    n = int(rng.integers(3 if suite == "synref" else 4, 11))
    palette = _shape_palette(rng, family)
    colors = list(COLORS)
    dominant = palette[0]
    if suite == "synref+":
        colors = [COLORS[i] for i in rng.choice(len(COLORS), 3, replace=False)]
    objs = []
    for _ in range(n):
        if suite == "synref+" and rng.random() < 0.65:
            shape = dominant
        else:
            shape = palette[int(rng.integers(len(palette)))]
        objs.append({"shape": shape, "color": colors[int(rng.integers(len(colors)))],
                     "size": SIZES[int(rng.integers(len(SIZES)))],
                     "pattern": PATTERNS[int(rng.integers(len(PATTERNS)))]})
    return objs


def _boxes_overlap(a: SceneObjectSpec, cx: float, cy: float, r: float) -> bool:
    return abs(a.cx - cx) < (a.radius + r) * 1.1 and abs(a.cy - cy) < (a.radius + r) * 1.1


def place_objects(rng: np.random.Generator, attrs: list[dict[str, str]], size: int) -> list[SceneObjectSpec]:
    """Place objects at random, back to front, rejecting placements that hide too much of another.

    Objects that cannot be placed in ``PLACEMENT_TRIES`` attempts are dropped.
    """
    scale = size / 256.0
    placed: list[SceneObjectSpec] = []
    for a in attrs:
        r = RADIUS[a["size"]] * scale * float(rng.uniform(0.92, 1.08))
        for _ in range(PLACEMENT_TRIES):
            cx, cy = (float(v) for v in rng.uniform(r + 2, size - r - 2, 2))
            full = shape_mask(a["shape"], cx, cy, r, size)
            hit = [p for p in placed if _boxes_overlap(p, cx, cy, r)]
            if all((p.visible & ~full).sum() >= MIN_VISIBLE * p.full.sum() for p in hit):
                for p in hit:
                    p.visible = p.visible & ~full
                placed.append(SceneObjectSpec(cx=round(cx, 2), cy=round(cy, 2), radius=r, full=full,
                                              visible=full.copy(), **a))
                break
    return placed


# --------------------------------------------------------------------------- rendering


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted random gradient with a faint sinusoidal texture, float32 3xHxW (channel first)."""
    c0, c1 = rng.uniform(60, 190, 3).astype(np.float32), rng.uniform(60, 190, 3).astype(np.float32)
    angle = float(rng.uniform(0, 2 * math.pi))
    coords = np.arange(size, dtype=np.float32) / np.float32(size)
    t = coords[None, :] * np.float32(math.cos(angle)) + coords[:, None] * np.float32(math.sin(angle))
    t = (t - t.min()) / np.float32(max(float(t.max() - t.min()), 1e-6))
    fx, fy, phase = (np.float32(v) for v in (*rng.uniform(8, 30, 2) * 2 * math.pi, rng.uniform(0, 2 * math.pi)))
    texture = np.float32(6.0) * np.sin(coords[None, :] * fx + coords[:, None] * fy + phase)
    return c0[:, None, None] + t[None] * (c1 - c0)[:, None, None] + texture[None]


def _paint(img: np.ndarray, obj: SceneObjectSpec, rng: np.random.Generator) -> None:
    """Paint ``obj``'s full mask with its colour and pattern (later objects paint over it)."""
    ys, xs = np.nonzero(obj.full)
    base = np.array(RGB[obj.color], dtype=np.float32)
    colors = np.broadcast_to(base[:, None], (3, len(xs))).copy()
    if obj.pattern == "striped":
        period = max(4.0, obj.radius * 0.5)
        angle = math.radians(float(rng.choice([0, 45, 90, 135])))
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        colors[:, (phase - np.floor(phase)) < 0.5] = (base * 0.45)[:, None]
    elif obj.pattern == "dotted":
        period = max(5.0, obj.radius * 0.5)
        u, v = (xs - obj.cx) % period - period / 2, (ys - obj.cy) % period - period / 2
        colors[:, u * u + v * v <= (0.3 * period) ** 2] = (base * 0.35 + 255 * 0.65)[:, None]
    img[:, ys, xs] = colors


def render_image(rng: np.random.Generator, objects: list[SceneObjectSpec], size: int,
                 blurred: bool, low_contrast: bool) -> np.ndarray:
    """Render the scene to a uint8 HxWx3 array (noise, optional blur and low contrast included)."""
    img = background(rng, size)
    for obj in objects:
        _paint(img, obj, rng)
    img += rng.standard_normal((size, size), dtype=np.float32)[None] * np.float32(6.0)  # luminance grain
    if low_contrast:
        mean = img.mean(axis=(1, 2), keepdims=True)
        img = mean + (img - mean) * np.float32(0.4)
    out = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    if blurred:
        radius = float(rng.uniform(1.2, 2.5)) * size / 256
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius)))
    return out


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a uint8 HxWx3 array."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
