"""The program evaluator: GenEval's scoring with shape detection in place of an object detector.

Detection (`detect_objects`): estimate the background from the image border, segment pixels far from it,
take connected components, estimate each component's colour (median of its inner half) and a soft
membership map (projection of each pixel onto the background->object colour axis, so blurred edges count
by half), fit the four shape templates by second moments and keep the best by soft IoU. Colours are the
nearest palette colour in CIELAB. Everything is measured relative to the image size, so any size works.

Judging (`judge`) follows GenEval's rules: include clauses ANDed, exclude clauses ORed; a clause takes the
top-`count` objects of its class (ranked by shape-fit score; a clause that names a colour ranks objects of
that colour first, which only matters when there are more objects of the class than the clause counts);
colour: at least `count` of them have the colour; position: every one of them stands in the relation to
every object matched by the referenced clause, by GenEval's shrunk-offset rule; exclude: fewer than `count`
objects of the class. Scores (`aggregate`): per-category accuracy, overall = mean over categories; its
standard error (`overall_standard_error`) and the paired change between two runs on the same prompts and
seeds (`paired_change`) treat prompts as the sampled units.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from selftok.shapes.scene import Scene
from selftok.shapes.spec import BACKGROUND, COLORS, SHAPES, relations_of, validate_spec

ImageLike = Image.Image | np.ndarray | str | Path


class ImageError(ValueError):
    """An input that cannot be turned into an RGB image to judge."""


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
    """Detection settings (the defaults are the ones benchmarked in docs/shapes.md)."""
    work_size: int = 128
    """Images whose longest side exceeds this are box-downscaled to it first (speed; shapes stay >= 32 px)."""
    min_size: int = 16
    """Images with a side below this are an error."""
    smooth_sigma: float = 0.7
    """Gaussian pre-smoothing in pixels against pixel noise."""
    fg_threshold: float = 0.15
    """Minimum RGB distance (0..1 per channel) from the background for a pixel to be foreground."""
    min_area: float = 0.005
    """Components smaller than this fraction of the image area are ignored (the smallest object covers
    about 0.031)."""
    min_shape_score: float = 0.55
    """Components whose best template fit (soft IoU) is below this are not counted as any shape."""

    def __post_init__(self) -> None:
        if self.work_size < self.min_size or self.min_size < 8:
            raise ValueError(f"need 8 <= min_size <= work_size, got {self.min_size}, {self.work_size}")
        if not 0 < self.fg_threshold < 1 or not 0 <= self.min_area < 1 or not 0 <= self.min_shape_score < 1:
            raise ValueError("fg_threshold, min_area and min_shape_score must lie in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object: `shape` ("unknown" if no template fits), palette `color`, `box` (x0, y0, x1, y1)
    as fractions of width/height, template-fit `score` in [0, 1], mean `rgb` (0..255), `area` fraction."""
    shape: str
    color: str
    box: tuple[float, float, float, float]
    score: float
    rgb: tuple[int, int, int]
    area: float


@dataclasses.dataclass(frozen=True)
class Claim:
    """One checked statement of a spec. `kind`: count | color | position | exclude; `clause`: e.g.
    "include[1]"; `checked` is False when GenEval skips it because an earlier check of the clause failed."""
    clause: str
    kind: str
    text: str
    passed: bool
    checked: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The verdict on one image: `correct` iff every claim holds (False when `error` is set)."""
    tag: str
    prompt: str
    correct: bool
    claims: tuple[Claim, ...]
    objects: tuple[Detection, ...]
    error: str | None = None

    @property
    def score(self) -> float:
        """Fraction of claims that hold (a graded reward; 0 on error)."""
        return sum(c.passed for c in self.claims) / len(self.claims) if self.claims else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "prompt": self.prompt, "correct": self.correct, "score": self.score,
                "error": self.error, "claims": [dataclasses.asdict(c) for c in self.claims],
                "objects": [dataclasses.asdict(o) for o in self.objects]}


@dataclasses.dataclass(frozen=True)
class Scores:
    """GenEval aggregation: `per_category` accuracy and image count, `overall` = mean of the category
    accuracies; `claims` = pass rate per claim kind over checked+unchecked claims; `n_errors` images that
    could not be judged (counted as incorrect)."""
    overall: float
    per_category: dict[str, float]
    counts: dict[str, int]
    claims: dict[str, float]
    n: int
    n_errors: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- images
def to_rgb_array(image: ImageLike) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a PIL image of any mode, a path, or an (H, W[, C]) array (uint8, or
    float in [0, 1]); alpha is composited over the background. Raises `ImageError`."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ImageError(f"{image}: not a readable image ({e})") from None
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, a path or an array, got {type(image).__name__}")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return _array_to_rgb(np.asarray(image, dtype=np.float32) / max(float(np.max(image)), 1.0))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        base = Image.new("RGBA", image.size, BACKGROUND + (255,))
        image = Image.alpha_composite(base, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ImageError("image array holds NaN or infinite values")
        a = np.clip(a, 0.0, 1.0)
    if a.shape[2] == 4:
        bg = np.asarray(BACKGROUND, dtype=np.float32) / 255.0
        a = a[..., :3] * a[..., 3:] + bg * (1 - a[..., 3:])
    return a


# ---------------------------------------------------------------------------------------------- detection
def detect_objects(image: ImageLike, config: EvaluatorConfig | None = None) -> list[Detection]:
    """Every object found in `image`, best-fitting first. Raises `ImageError` for unusable input."""
    cfg = config or EvaluatorConfig()
    rgb = _working_copy(to_rgb_array(image), cfg)
    h, w = rgb.shape[:2]
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3),
                             rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    s = cfg.smooth_sigma
    smooth = ndimage.gaussian_filter(rgb, sigma=(s, s, 0)) if s else rgb
    diff = smooth - bg
    dist = np.sqrt((diff * diff).sum(axis=2))
    labels, n = ndimage.label(dist > cfg.fg_threshold, structure=_EIGHT)
    if n == 0:
        return []
    min_area = cfg.min_area * h * w
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    out = []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or areas[idx] < min_area:
            continue
        win = _window(sl, labels.shape, pad=5)
        lab = labels[win]
        for part, others in _split(lab == idx, lab != 0, diff[win], dist[win], min_area):
            det = _describe(part, others, win, rgb, diff, dist, cfg)
            if det is not None:
                out.append(det)
    return sorted(out, key=lambda d: -d.score)


_EIGHT = np.ones((3, 3), dtype=bool)
# Projection weights: luma counts fully, chroma at a third (JPEG and tokenizers keep luma sharper).
_YCC = np.array([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])
_WEIGHT = _YCC.T @ np.diag([1.0, 1 / 9, 1 / 9]) @ _YCC


def _window(sl: tuple[slice, slice], shape: tuple[int, ...], pad: int) -> tuple[slice, slice]:
    return (slice(max(sl[0].start - pad, 0), min(sl[0].stop + pad, shape[0])),
            slice(max(sl[1].start - pad, 0), min(sl[1].stop + pad, shape[1])))


def _working_copy(rgb: np.ndarray, cfg: EvaluatorConfig) -> np.ndarray:
    h, w = rgb.shape[:2]
    if min(h, w) < cfg.min_size:
        raise ImageError(f"image is {w}x{h}; the evaluator needs at least {cfg.min_size} px per side")
    if max(h, w) > cfg.work_size:
        scale = cfg.work_size / max(h, w)
        size = (max(cfg.min_size, round(w * scale)), max(cfg.min_size, round(h * scale)))
        im = Image.fromarray(np.round(rgb * 255).astype(np.uint8)).resize(size, Image.BOX)
        rgb = np.asarray(im, dtype=np.float32) / 255.0
    return rgb


def _membership(diff: np.ndarray, color_diff: np.ndarray) -> np.ndarray:
    """Soft membership: each pixel's position on the background -> object colour axis (0 = background,
    1 = object colour; exact for blends of the two), in a luma-weighted metric."""
    axis = _WEIGHT @ color_diff
    return diff @ axis / max(float(color_diff @ axis), 1e-9)


def _inner(mask: np.ndarray, values: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Median of `values` over the component's pixels farthest from the background (its inner half)."""
    return np.median(values[mask & (dist >= np.median(dist[mask]))], axis=0)


def _split(mine: np.ndarray, fg: np.ndarray, diff: np.ndarray, dist: np.ndarray,
           min_area: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split a component whose objects are joined by blurred bridges: parts where membership > 0.5.
    Returns (part mask, mask of pixels belonging to other objects) pairs within the window."""
    t = _membership(diff, _inner(mine, diff, dist))
    cores, n = ndimage.label(mine & (t > 0.5), structure=_EIGHT)
    sizes = np.bincount(cores.ravel(), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if sizes[i] >= min_area / 2]
    if len(keep) < 2:
        return [(mine, fg & ~mine)]
    # give every pixel of the component to its nearest core
    seeds = np.where(np.isin(cores, keep), cores, 0)
    nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    owner = seeds[nearest[0], nearest[1]] * mine
    return [(owner == i, fg & (owner != i)) for i in keep]


def _describe(part: np.ndarray, others: np.ndarray, win: tuple[slice, slice], rgb: np.ndarray,
              diff: np.ndarray, dist: np.ndarray, cfg: EvaluatorConfig) -> Detection | None:
    h, w = rgb.shape[:2]
    wrgb, wdiff, wdist = rgb[win], diff[win], dist[win]
    color = _inner(part, wrgb, wdist)
    color_diff = _inner(part, wdiff, wdist)
    if float(np.sqrt(color_diff @ color_diff)) < cfg.fg_threshold:
        return None
    region = ndimage.binary_dilation(part, structure=_EIGHT, iterations=3) & ~others
    t = np.clip(_membership(wdiff, color_diff), 0.0, 1.0) * region
    mass = float(t.sum())
    if mass <= 1.0:
        return None
    ys, xs = np.mgrid[win[0], win[1]].astype(np.float64) + 0.5
    cx, cy = float((t * xs).sum() / mass), float((t * ys).sum() / mass)
    var_x = float((t * (xs - cx) ** 2).sum() / mass)
    var_y = float((t * (ys - cy) ** 2).sum() / mass)
    best = ("unknown", -1.0, (0.0, 0.0, 0.0, 0.0))
    for shape in SHAPES:
        box, sigma = _fit_box(shape, mass, cx, cy, var_x, var_y)
        tpl = _template(shape, box, xs, ys)
        if sigma > 0.3:
            tpl = ndimage.gaussian_filter(tpl, sigma)
        score = float(np.minimum(t, tpl).sum() / max(np.maximum(t, tpl).sum(), 1e-6))
        if score > best[1]:
            best = (shape, score, box)
    shape, score, box = best
    if score < cfg.min_shape_score:
        shape = "unknown"
    return Detection(shape=shape, color=classify_color(color), score=round(score, 4),
                     box=(box[0] / w, box[1] / h, box[2] / w, box[3] / h),
                     rgb=tuple(round(float(v) * 255) for v in color), area=round(mass / (h * w), 5))


# Per shape, with a unit box: area, second moments (x, y), and the centroid's offset below the box centre.
_AREA = {"circle": math.pi / 4, "square": 1.0, "diamond": 0.5, "triangle": 0.5}
_VAR = {"circle": (1 / 16, 1 / 16), "square": (1 / 12, 1 / 12), "diamond": (1 / 24, 1 / 24),
        "triangle": (1 / 24, 1 / 18)}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "diamond": 0.0, "triangle": 1 / 6}
MAX_BLUR = 0.2
"""The fitted blur may reach this fraction of the object's box side; softer blobs fit no template well."""


def _fit_box(shape: str, mass: float, cx: float, cy: float, var_x: float,
             var_y: float) -> tuple[tuple[float, float, float, float], float]:
    """Box and Gaussian blur sigma of `shape` matching the observed mass and second moments.

    A blur of sigma keeps the mass and adds sigma^2 to each variance, so for a box w x h:
    mass = area * w * h, var_x = c_x * w^2 + sigma^2, var_y = c_y * h^2 + sigma^2. Eliminating w and h,
    (var_x - s)(var_y - s) = K with K = c_x c_y (mass / area)^2, whose smaller root is s = sigma^2 (clipped
    at 0 when the shape is too small for the moments, and at MAX_BLUR of the box side).
    """
    (c_x, c_y), area = _VAR[shape], _AREA[shape]
    k = c_x * c_y * (mass / area) ** 2
    s2 = max(((var_x + var_y) - math.sqrt((var_x - var_y) ** 2 + 4 * k)) / 2, 0.0)

    def sides(s2: float) -> tuple[float, float]:
        return math.sqrt(max(var_x - s2, 1e-6) / c_x), math.sqrt(max(var_y - s2, 1e-6) / c_y)

    bw, bh = sides(s2)
    cap = (MAX_BLUR * min(bw, bh)) ** 2
    if s2 > cap:
        s2 = cap
        bw, bh = sides(s2)
    ccy = cy - _CENTROID_DY[shape] * bh
    return (cx - bw / 2, ccy - bh / 2, cx + bw / 2, ccy + bh / 2), math.sqrt(s2)


def _template(shape: str, box: tuple[float, ...], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased mask of `shape` in `box`: clip(0.5 - signed distance in pixels, 0, 1)."""
    x0, y0, x1, y1 = box
    hw, hh = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    dx, dy = xs - (x0 + x1) / 2, ys - (y0 + y1) / 2
    if shape == "circle":
        f = (np.sqrt((dx / hw) ** 2 + (dy / hh) ** 2) - 1) * min(hw, hh)
    elif shape == "square":
        f = np.maximum(np.abs(dx) - hw, np.abs(dy) - hh)
    elif shape == "diamond":
        f = (np.abs(dx) / hw + np.abs(dy) / hh - 1) * (hw * hh / math.hypot(hw, hh))
    else:  # triangle, apex up: the base and the two slanted sides
        slope = hw / (2 * hh)
        side = (np.abs(dx) - (dy + hh) * slope) / math.sqrt(1 + slope ** 2)
        f = np.maximum(dy - hh, side)
    return np.clip(0.5 - f, 0.0, 1.0)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    c = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (c @ m.T) / np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_NAMES = list(COLORS)
_PALETTE_LAB = _srgb_to_lab(np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64) / 255.0)


def classify_color(rgb: np.ndarray | tuple[float, float, float]) -> str:
    """Nearest palette colour name (CIELAB distance) of an RGB colour with channels in [0, 1]."""
    lab = _srgb_to_lab(np.asarray(rgb, dtype=np.float64))
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE_LAB - lab) ** 2).sum(axis=1)))]


# ---------------------------------------------------------------------------------------------- judging
def judge(objects: Iterable[Detection], spec: dict[str, Any]) -> tuple[bool, list[Claim]]:
    """Check `spec` against detected `objects` with GenEval's rules; returns (correct, claims)."""
    by_class: dict[str, list[Detection]] = {}
    for o in sorted(objects, key=lambda o: -o.score):
        by_class.setdefault(o.shape, []).append(o)
    claims: list[Claim] = []
    matched: list[list[Detection] | None] = []
    for i, req in enumerate(spec["include"]):
        name, cls, n = f"include[{i}]", req["class"], req.get("count", 1)
        cands = by_class.get(cls, [])
        if "color" in req:
            cands = sorted(cands, key=lambda o: o.color != req["color"])  # stable: keeps score order
        found = cands[:n]
        ok = len(found) >= n
        claims.append(Claim(name, "count", f"at least {n} {cls}", ok, True, f"found {len(cands)}"))
        if "color" in req:
            hits = sum(o.color == req["color"] for o in found)
            passed = ok and hits >= n
            claims.append(Claim(name, "color", f"{n} {req['color']} {cls}", passed, ok,
                                f"colours: {', '.join(o.color for o in found) or 'none'}"))
            ok = passed
        if "position" in req:
            rel, j = req["position"]
            target = matched[j] if j < len(matched) else None
            text = f"{cls} {rel} include[{j}] ({spec['include'][j]['class']})"
            if not ok:
                claims.append(Claim(name, "position", text, False, False, "not checked: clause failed"))
            elif target is None:
                ok = False
                claims.append(Claim(name, "position", text, False, True, "no target: include[{j}] failed"))
            else:
                found_rels = [sorted(relations_of(a.box, b.box)) for a in found for b in target]
                ok = all(rel in r for r in found_rels)
                claims.append(Claim(name, "position", text, ok, True, f"relations: {found_rels}"))
        matched.append(found if ok else None)
    for i, req in enumerate(spec.get("exclude", [])):
        cls, n = req["class"], req.get("count", 1)
        have = len(by_class.get(cls, []))
        claims.append(Claim(f"exclude[{i}]", "exclude", f"fewer than {n} {cls}", have < n, True,
                            f"found {have}"))
    return all(c.passed for c in claims), claims


def evaluate_image(image: ImageLike, spec: dict[str, Any],
                   config: EvaluatorConfig | None = None) -> Judgement:
    """Judge one image against one spec. Raises `SpecError` for a spec outside the shapes world and
    `ImageError` for unusable input (batch helpers turn both into per-image errors)."""
    validate_spec(spec, shapes_only=True)
    objects = detect_objects(image, config)
    correct, claims = judge(objects, spec)
    return Judgement(spec.get("tag", "unknown"), spec.get("prompt", ""), correct, tuple(claims),
                     tuple(objects))


def failed_judgement(spec: dict[str, Any] | None, error: str) -> Judgement:
    """The verdict recorded for an image that could not be judged."""
    spec = spec if isinstance(spec, dict) else {}
    return Judgement(str(spec.get("tag", "unknown")), str(spec.get("prompt", "")), False, (), (), error)


def category_means(rows: Iterable[tuple[str, float]]) -> tuple[float, dict[str, float], dict[str, int]]:
    """GenEval's aggregation: (category, value) rows → (overall = the mean over categories of the per-category
    means, per-category means, per-category counts); overall is 0 without rows."""
    per: dict[str, list[float]] = {}
    for tag, value in rows:
        per.setdefault(tag, []).append(value)
    means = {t: sum(v) / len(v) for t, v in per.items()}
    return (sum(means.values()) / len(means) if means else 0.0), means, {t: len(v) for t, v in per.items()}


def aggregate(judgements: Iterable[Judgement]) -> Scores:
    """GenEval aggregation of many verdicts."""
    judgements = list(judgements)
    kinds: dict[str, list[bool]] = {}
    for j in judgements:
        for c in j.claims:
            kinds.setdefault(c.kind, []).append(c.passed)
    overall, acc, counts = category_means((j.tag, j.correct) for j in judgements)
    n_errors = sum(j.error is not None for j in judgements)
    return Scores(overall=overall, per_category=acc, counts=counts,
                  claims={k: sum(v) / len(v) for k, v in kinds.items()},
                  n=len(judgements), n_errors=n_errors)


def category_standard_errors(rows: Iterable[tuple[str, str, float]]) -> dict[str, float | None]:
    """Standard error of each category's mean, {category: SE}.

    `rows`: (category, prompt, value) per image; value = 1/0 for a correct/incorrect image, or an image's
    after − before difference for a paired comparison. The prompts are the sampled units: images of one prompt
    (several seeds) are not independent draws, so a category's variance is that of its per-prompt means over
    its number of prompts. None for a category with fewer than two prompts."""
    per: dict[str, dict[str, list[float]]] = {}
    for tag, prompt, value in rows:
        per.setdefault(tag, {}).setdefault(prompt, []).append(float(value))
    return {tag: math.sqrt(statistics.variance([sum(v) / len(v) for v in prompts.values()]) / len(prompts))
            if len(prompts) >= 2 else None for tag, prompts in per.items()}


def overall_standard_error(rows: Iterable[tuple[str, str, float]]) -> float | None:
    """Standard error of a GenEval `overall` (the mean over categories of per-category means; rows and
    sampled units as in `category_standard_errors`). None when a category has fewer than two prompts."""
    errors = category_standard_errors(rows)
    if not errors or None in errors.values():
        return None
    return math.sqrt(sum(se * se for se in errors.values())) / len(errors)


def paired_change(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """`overall` after − before for two evaluations of the same images (same prompts and seeds; the per-image
    records of `evaluate_folder`'s report, matched by ``file_name``), with its paired standard error."""
    old = {r["file_name"]: r for r in before}
    if sorted(old) != sorted(r["file_name"] for r in after):
        raise ValueError("paired_change: the two evaluations do not cover the same image files")
    rows = [(r["tag"], r["prompt"], float(r["correct"]) - float(old[r["file_name"]]["correct"])) for r in after]
    per: dict[str, list[float]] = {}
    for tag, _, d in rows:
        per.setdefault(tag, []).append(d)
    return {"change": sum(sum(v) / len(v) for v in per.values()) / len(per) if per else 0.0,
            "standard_error": overall_standard_error(rows), "n_images": len(rows)}


def scene_objects(scene: Scene) -> list[Detection]:
    """The perfect detections of a rendered scene (exact boxes and colours): judging a spec against them
    says whether the spec is *true* of the scene, independent of the detector."""
    return [Detection(o.shape, o.color, o.box, 1.0, COLORS[o.color], 0.0) for o in scene.objects]
