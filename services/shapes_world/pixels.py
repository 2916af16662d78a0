"""The shapes world's pixels: `render` an image satisfying a prompt, `verify` one from pixels only,
`corrupt` a render so that it no longer does (training negatives for the learned reward model)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .grammar import COLORS, CORRUPTIONS, IMAGE_SIZE, PALETTE, SHAPES, parse

_SIZE_RANGE = (7, 11)  # object bounding-box side in px, inclusive
_GAP = 2  # min px between the bounding boxes of two rendered objects
# (min offset along the relation axis in px, max |perpendicular offset| / axis offset). The renderer draws
# with the strict margin, the verifier accepts the lax one, so renders pass with room to spare.
_RENDER_MARGIN = (5.0, 1.0)
_VERIFY_MARGIN = (2.0, 1.5)
_MIN_BRIGHT = 100  # a pixel whose brightest channel is below this is background
_MAX_COLOR_DIST = 100.0  # max distance of a brightness-normalised pixel to its palette colour
_MIN_AREA = 6  # components smaller than this (px) are noise
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (7, 3)


@dataclass(frozen=True)
class Verdict:
    """Result of `verify`: partial-credit `score` in [0, 1] and `strict` (every requirement met, no extras)."""

    score: float
    strict: bool


@dataclass(frozen=True)
class Requirements:
    """What `verify` counted in one image, requirement by requirement (`requirements`): of the prompt's `objects`
    required (colour, shape, count) entries, how many have their colour present, their shape present and exactly
    their count of that colour and shape; whether the relation holds (None: the prompt has none); the detected
    objects the prompt does not name (`extras`) and all detected objects (`found`)."""

    objects: int
    colour: int
    shape: int
    count: int
    relation: bool | None
    extras: int
    found: int

    @property
    def points(self) -> int:
        return self.colour + self.shape + self.count + bool(self.relation)

    @property
    def total(self) -> int:
        """The most points the prompt can give: 3 per required object, 1 for a relation."""
        return 3 * self.objects + (self.relation is not None)

    def score(self, extras_weight: float = 1.0) -> float:
        """points / (total + extras_weight × extras): `verify`'s partial credit at the default weight 1."""
        return self.points / (self.total + extras_weight * self.extras)

    @property
    def verdict(self) -> Verdict:
        return Verdict(score=self.score(), strict=self.points == self.total and self.extras == 0)


@dataclass(frozen=True)
class Detection:
    """One object found in an image: `centroid` is (y, x) in px, `bbox` is (y0, x0, y1, x1), end exclusive."""

    color: str
    shape: str
    centroid: tuple[float, float]
    area: int
    bbox: tuple[int, int, int, int]



@functools.cache
def _shape_mask(shape: str, s: int) -> np.ndarray:
    """Filled upright shape in an s x s box: (s, s) bool; read-only (cached)."""
    c = np.arange(s) + 0.5  # pixel centres
    y, x = c[:, None], c[None, :]
    if shape == "square":
        mask = np.ones((s, s), dtype=bool)
    elif shape == "circle":
        mask = (x - s / 2) ** 2 + (y - s / 2) ** 2 <= (s / 2) ** 2
    else:  # triangle, apex up: half-width grows from 0 at the top to s/2 at the bottom; +0.5 px draws the apex
        mask = np.abs(x - s / 2) <= y / 2 + 0.5
    mask.setflags(write=False)
    return mask


def _relation_holds(ca: tuple[float, float], cb: tuple[float, float], relation: str,
                    margin: tuple[float, float]) -> bool:
    """Does the object at centroid `ca` (y, x) stand in `relation` to the one at `cb`?

    Holds when the offset along the relation's axis is at least margin[0] px in the right direction and the
    perpendicular offset is at most margin[1] times it (a cone around the axis, as in GenEval).
    """
    dy, dx = cb[0] - ca[0], cb[1] - ca[1]
    axis, perp = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return axis >= margin[0] and abs(perp) <= margin[1] * axis


def relation_holds(ca: tuple[float, float], cb: tuple[float, float], relation: str) -> bool:
    """`verify`'s test of a relation between two centroids (y, x), with the verifier's margin."""
    return _relation_holds(ca, cb, relation, _VERIFY_MARGIN)


def _centroid(shape: str, box: tuple[int, int, int]) -> tuple[float, float]:
    """(y, x) centroid in px of `shape` drawn in box (y0, x0, side)."""
    ys, xs = np.nonzero(_shape_mask(shape, box[2]))
    return box[0] + float(ys.mean()), box[1] + float(xs.mean())


def _layout(objects: list[tuple[str, str]], relation: str | None, rng: np.random.Generator
            ) -> list[tuple[int, int, int]]:
    """Random boxes (y0, x0, side) for (colour, shape) objects: inside the canvas, >= _GAP px apart, and for
    a relation, the first object's centroid in that relation to the second's with the render margin."""
    def apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
        return (a[0] + a[2] + _GAP <= b[0] or b[0] + b[2] + _GAP <= a[0]
                or a[1] + a[2] + _GAP <= b[1] or b[1] + b[2] + _GAP <= a[1])

    for _ in range(1000):
        boxes: list[tuple[int, int, int]] = []
        for s in rng.integers(_SIZE_RANGE[0], _SIZE_RANGE[1] + 1, size=len(objects)):
            for y0, x0 in rng.integers(0, IMAGE_SIZE - s + 1, size=(50, 2)).tolist():
                if all(apart((y0, x0, int(s)), b) for b in boxes):
                    boxes.append((y0, x0, int(s)))
                    break
        if len(boxes) < len(objects):
            continue
        if relation is None or _relation_holds(
            *(_centroid(shape, b) for (_, shape), b in zip(objects, boxes, strict=True)), relation, _RENDER_MARGIN
        ):
            return boxes
    raise RuntimeError(f"no layout found for {objects} {relation}")  # not seen in practice


def render(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """Draw an image satisfying `prompt`: (32, 32, 3) uint8. Deterministic given the rng state."""
    spec = parse(prompt)
    objects = [(c, s) for c, s, n in spec.objects for _ in range(n)]
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # (H, W, 3)
    for (color, shape), (y0, x0, s) in zip(objects, _layout(objects, spec.relation, rng), strict=True):
        image[y0:y0 + s, x0:x0 + s][_shape_mask(shape, s)] = PALETTE[color]
    return image


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"image must have shape (32, 32, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must have dtype uint8 (0..255), got {image.dtype}")


def _classify_pixels(image: np.ndarray) -> np.ndarray:
    """(32, 32, 3) uint8 -> (32, 32) int: index into COLORS, or -1 for background.

    Pixels are scaled so their brightest channel is 255 before taking the nearest palette colour, so dim or
    blurred edges of a shape keep its hue; dark pixels (< _MIN_BRIGHT) and off-palette hues are background.
    """
    px = image.astype(np.float32)  # (H, W, 3)
    peak = px.max(axis=-1)  # (H, W)
    scaled = px * (255.0 / np.maximum(peak, 1.0))[..., None]
    dist = np.linalg.norm(scaled[..., None, :] - _PALETTE_ARRAY, axis=-1)  # (H, W, 7)
    ok = (peak >= _MIN_BRIGHT) & (dist.min(axis=-1) <= _MAX_COLOR_DIST)
    return np.where(ok, dist.argmin(axis=-1), -1)


def _classify_shape(mask: np.ndarray) -> str:
    """Shape of one component cropped to its bounding box, mask (h, w) bool.

    Triangles taper: the bottom quarter of rows is much wider than the top quarter (circles and squares are
    symmetric). Of the rest, squares fill their box (~1.0), circles ~0.785 of it.
    """
    h, w = mask.shape
    widths = mask.sum(axis=1) / w  # (h,)
    q = max(1, round(h / 4))
    if widths[-q:].mean() - widths[:q].mean() > 0.3:
        return "triangle"
    return "square" if mask.mean() > 0.88 else "circle"


def _components(image: np.ndarray) -> list[tuple[Detection, np.ndarray]]:
    """Detected objects with their (32, 32) bool masks."""
    _check_image(image)
    labels = _classify_pixels(image)
    out = []
    for ci in np.unique(labels[labels >= 0]):  # only the colours present: label() is the costly part
        comp, _ = ndimage.label(labels == ci, structure=np.ones((3, 3)))  # 8-connected
        for k, sl in enumerate(ndimage.find_objects(comp), start=1):
            full = comp == k
            ys, xs = np.nonzero(full)
            if len(ys) >= _MIN_AREA:
                bbox = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
                centroid = (float(ys.mean()), float(xs.mean()))
                out.append((Detection(COLORS[ci], _classify_shape(full[sl]), centroid, len(ys), bbox), full))
    return out


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in a (32, 32, 3) uint8 image, from pixels only (components of >= 6 px per palette colour)."""
    return [det for det, _ in _components(image)]


def verify(prompt: str, image: np.ndarray) -> Verdict:
    """Check a (32, 32, 3) uint8 image against `prompt` from pixels only.

    Scoring rule (partial credit per requirement, as in GenEval):
      * each required object (colour, shape, count) is worth 3 points: 1 if any object of that colour is
        present, 1 if any object of that shape is present, 1 if exactly `count` objects of that colour and
        shape are present;
      * a position prompt adds 1 point if some pair of the two required objects satisfies the relation
        between centroids (>= 2 px along the axis, perpendicular offset <= 1.5x that);
      * every detected object whose (colour, shape) the prompt does not name is an extra and adds 1 to the
        denominator. score = points / (max points + extras); strict = all points and no extras.
    E.g. "two red circles" with one red circle: 2/3; "a red circle" with a red square: 1/(3 + 1) = 0.25;
    "a red circle" plus a green square: 3/4; a position prompt with only the relation wrong: 6/7.
    """
    return requirements(prompt, image).verdict


def requirements(prompt: str, image: np.ndarray, found: list[Detection] | None = None) -> Requirements:
    """`verify`'s counts for one (32, 32, 3) uint8 image, before they become a score: which requirement failed
    (e.g. "two red circles" drawn as one red circle and one red square: colour 1, shape 1, count 0, one extra).
    `found`: the image's `detect` result when the caller already has it (detection is the costly part)."""
    spec = parse(prompt)
    found = detect(image) if found is None else found
    colour = shape = count = 0
    for c, s, n in spec.objects:
        colour += any(d.color == c for d in found)
        shape += any(d.shape == s for d in found)
        count += sum((d.color, d.shape) == (c, s) for d in found) == n
    relation = None
    if spec.relation is not None:
        (c1, s1, _), (c2, s2, _) = spec.objects
        first = [d.centroid for d in found if (d.color, d.shape) == (c1, s1)]
        second = [d.centroid for d in found if (d.color, d.shape) == (c2, s2)]
        relation = any(_relation_holds(a, b, spec.relation, _VERIFY_MARGIN) for a in first for b in second)
    named = {(c, s) for c, s, _ in spec.objects}
    extras = sum((d.color, d.shape) not in named for d in found)
    return Requirements(len(spec.objects), colour, shape, count, relation, extras, len(found))


def _mirror(image: np.ndarray, comps: list[tuple[Detection, np.ndarray]], relation: str) -> np.ndarray:
    """Mirror each object's box position along the relation's axis (shapes keep their orientation)."""
    out = image.copy()
    for _, mask in comps:
        out[mask] = 0
    for det, mask in comps:
        y0, x0, y1, x1 = det.bbox
        patch, keep = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        if relation in ("left of", "right of"):
            y0, x0, y1, x1 = y0, IMAGE_SIZE - x1, y1, IMAGE_SIZE - x0
        else:
            y0, x0, y1, x1 = IMAGE_SIZE - y1, x0, IMAGE_SIZE - y0, x1
        out[y0:y1, x0:x1][keep] = patch[keep]
    return out


def _add_object(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one random extra object in free space (>= 2 px from anything), trying smaller sizes if needed."""
    busy = ndimage.binary_dilation(_classify_pixels(image) >= 0, structure=np.ones((3, 3)), iterations=_GAP)
    for s in range(_SIZE_RANGE[0], 4, -1):
        for _ in range(200):
            y0, x0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - s + 1, size=2))
            if not busy[y0:y0 + s, x0:x0 + s].any():
                out = image.copy()
                shape, color = SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))]
                out[y0:y0 + s, x0:x0 + s][_shape_mask(shape, s)] = PALETTE[color]
                return out
    raise RuntimeError("no free space left for an extra object")


def corrupt(prompt: str, image: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """A copy of `image` (a render of `prompt`, (32, 32, 3) uint8) broken so that it no longer satisfies it.

    kind: "recolor" (one object to another palette colour), "remove" (blacken one object), "move" (position
    prompts only: mirror the layout along the relation's axis), "reshape" (redraw one object as another
    shape, same colour, inside its old box), "add" (an extra random object in free space).
    """
    spec = parse(prompt)
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
    comps = _components(image)
    if not comps:
        raise ValueError(f"image for {prompt!r} has no objects to corrupt")
    if kind == "move":
        if spec.relation is None:
            raise ValueError(f"'move' needs a position prompt, got {prompt!r} ({spec.category})")
        return _mirror(image, comps, spec.relation)
    if kind == "add":
        return _add_object(image, rng)
    det, mask = comps[rng.integers(len(comps))]
    out = image.copy()
    if kind == "remove":
        out[mask] = 0
    elif kind == "recolor":
        others = [c for c in COLORS if c != det.color]
        out[mask] = PALETTE[others[rng.integers(len(others))]]
    else:  # reshape
        out[mask] = 0
        y0, x0, y1, x1 = det.bbox
        s = min(y1 - y0, x1 - x0)
        others = [s_ for s_ in SHAPES if s_ != det.shape]
        out[y0:y0 + s, x0:x0 + s][_shape_mask(others[rng.integers(len(others))], s)] = PALETTE[det.color]
    return out
