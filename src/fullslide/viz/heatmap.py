"""Per-tile scores (attention, per-tile predictions) drawn over the slide thumbnail, and as QuPath GeoJSON.

The PNG shows each tile's square coloured by its score - by default its percentile rank within the slide (CLAM-style:
the tissue is never one colour, however sparse the attention), or min-max scaled, or raw - blended over the
thumbnail at an opacity that leaves the morphology visible, optionally smoothed, with lesion or annotation outlines,
a title (slide, prediction, label, run and epoch) and a numeric colour bar; a gallery PNG shows the top-k and
bottom-k tiles at full resolution with their scores and coordinates. The GeoJSON holds one
``tile`` object per tile in level-0 pixel coordinates with the scores as measurements: File > Import
objects in QuPath overlays it on the slide (Measure > Show measurement maps colours it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fullslide.atomic import atomic_path, atomic_write_text


def percentile_rank(scores: np.ndarray) -> np.ndarray:
    """Each score's rank in [0, 1] (ties share the mean rank): contrast independent of the score's scale."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size <= 1:
        return np.ones_like(scores)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size)
    ranks[order] = np.arange(scores.size)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse] / (scores.size - 1)


SCALES = ("rank", "minmax", "raw")


@dataclasses.dataclass(frozen=True)
class HeatmapStyle:
    """How a score map is drawn (``fullslide heatmap`` flags)."""

    scale: str = "rank"
    """``rank``: percentile rank within the slide (default: the tissue is not one colour, whatever the score's
    spread); ``minmax``: the slide's lowest to highest score; ``raw``: the scores themselves, on the colour bar."""
    alpha: float = 0.45
    """Opacity of the score colours over the tissue (0: tissue only, 1: colours only)."""
    smooth: float = 0.0
    """Gaussian smoothing of the score map, sigma in tiles (0: the exact tile squares)."""
    cmap: str = "coolwarm"
    """Matplotlib colour map: a diverging one keeps mid scores near white, so the morphology shows through."""
    top_k: int = 8
    """Tiles of the top-k / bottom-k gallery (0: no gallery)."""

    def check(self) -> None:
        from fullslide.errors import ConfigError

        if self.scale not in SCALES:
            raise ConfigError(f"heatmap: --scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"heatmap: --alpha must be in [0, 1], got {self.alpha}")
        if not self.smooth >= 0 or self.top_k < 0:
            raise ConfigError(f"heatmap: --smooth and --top-k must be >= 0, got {self.smooth}, {self.top_k}")


def scaled(scores: np.ndarray, scale: str = "rank") -> tuple[np.ndarray, float, float]:
    """(scores mapped for colouring, the value at the colour bar's low end, at its high end). ``rank``: percentile
    ranks 0..1; ``minmax``: 0..1 from the slide's min to max (the bar shows the scores); ``raw``: unchanged."""
    scores = np.asarray(scores, dtype=np.float64)
    if scale == "rank":
        return percentile_rank(scores), 0.0, 1.0
    low, high = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    if scale == "raw":
        return scores, low, high if high > low else low + 1e-12
    span = high - low
    return ((scores - low) / span if span > 0 else np.ones_like(scores)), low, high


def _colormap(values: np.ndarray, name: str = "coolwarm") -> np.ndarray:
    """[N] in [0, 1] -> uint8 [N, 3] colours."""
    from matplotlib import colormaps

    return (colormaps[name](np.clip(values, 0, 1))[:, :3] * 255).astype(np.uint8)


def score_map(shape: tuple[int, int], level0_wh: tuple[int, int], level0_xy: np.ndarray, level0_px: int,
              values: np.ndarray, smooth_tiles: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(mean value per thumbnail pixel [h, w], covered mask [h, w]): each tile's value over its square; where
    tiles overlap (``--overlap``) their values are averaged; ``smooth_tiles`` > 0 blurs the map within the tissue
    (normalised convolution: uncovered pixels never pull values down)."""
    h, w = shape
    sx, sy = w / level0_wh[0], h / level0_wh[1]
    total = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.float64)
    for (x, y), v in zip(np.asarray(level0_xy).tolist(), np.asarray(values, dtype=np.float64)):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int(round((x + level0_px) * sx))), max(y0 + 1, int(round((y + level0_px) * sy)))
        total[y0:y1, x0:x1] += v
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    if smooth_tiles > 0:
        from scipy import ndimage

        sigma = smooth_tiles * level0_px * (sx + sy) / 2
        total = ndimage.gaussian_filter(np.where(covered, total / np.maximum(count, 1), 0.0), sigma)
        count = ndimage.gaussian_filter(covered.astype(np.float64), sigma)
        return np.where(covered, total / np.maximum(count, 1e-12), 0.0), covered
    return np.where(covered, total / np.maximum(count, 1), 0.0), covered


def render_heatmap(
    thumbnail: np.ndarray,
    level0_wh: tuple[int, int],
    level0_xy: np.ndarray,
    level0_px: int,
    scores: np.ndarray,
    *,
    style: HeatmapStyle = HeatmapStyle(),
) -> tuple[np.ndarray, float, float]:
    """(uint8 [h, w, 3] thumbnail with the scores blended over the tiles, colour bar low, colour bar high)."""
    values, low, high = scaled(scores, style.scale)
    unit = (values - low) / (high - low) if style.scale == "raw" else values
    grid, covered = score_map(thumbnail.shape[:2], level0_wh, level0_xy, level0_px, unit, style.smooth)
    colours = _colormap(grid.ravel(), style.cmap).reshape(*grid.shape, 3).astype(np.float32)
    a = style.alpha * covered[..., None]
    out = thumbnail.astype(np.float32) * (1 - a) + colours * a
    return out.clip(0, 255).astype(np.uint8), low, high


def save_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB PNG atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def tiles_geojson(
    level0_xy: np.ndarray, level0_px: int, measurements: Mapping[str, np.ndarray], *, name: str = "tile"
) -> dict:
    """A GeoJSON FeatureCollection of square tiles (level-0 px) with per-tile measurements, as QuPath reads it."""
    feats = []
    columns = {k: np.asarray(v, dtype=np.float64) for k, v in measurements.items()}
    for i, (x, y) in enumerate(np.asarray(level0_xy).tolist()):
        ring = [[x, y], [x + level0_px, y], [x + level0_px, y + level0_px], [x, y + level0_px], [x, y]]
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "tile",
                "classification": {"name": name},
                "measurements": {k: float(v[i]) for k, v in columns.items()},
            },
        })
    return {"type": "FeatureCollection", "features": feats}


def annotation_outlines(path: str | Path) -> list[np.ndarray]:
    """Outlines (level-0 px, ``[N, 2]`` x, y each) from a GeoJSON / QuPath export (a FeatureCollection, a list of
    features or one feature; Polygon and MultiPolygon rings, holes included) or a fullslide lesion-mask PNG."""
    from fullslide.errors import FullslideError

    path = Path(path)
    if path.suffix.lower() == ".png":
        from fullslide.slides.synth import load_lesion_mask

        try:
            mask, ds = load_lesion_mask(path)
        except (OSError, ValueError) as exc:
            raise FullslideError(f"{path}: cannot read the annotation mask ({exc})") from None
        return _mask_outlines(mask, ds)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FullslideError(f"{path}: not a readable GeoJSON file ({exc})") from None
    features = data.get("features", [data]) if isinstance(data, dict) else data
    rings: list[np.ndarray] = []
    for feature in features if isinstance(features, list) else []:
        geometry = (feature or {}).get("geometry") or {}
        kind, coords = geometry.get("type"), geometry.get("coordinates") or []
        polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
        for polygon in polygons:
            rings += [np.asarray(ring, dtype=np.float64)[:, :2] for ring in polygon if len(ring) >= 3]
    if not rings:
        raise FullslideError(f"{path}: no Polygon or MultiPolygon annotation in it")
    return rings


def _mask_outlines(mask: np.ndarray, ds: float) -> list[np.ndarray]:
    """The boundaries of a boolean mask as level-0 polylines (marching squares from matplotlib's contour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float32), 1)
    fig, ax = plt.subplots()
    ys, xs = (np.arange(padded.shape[0]) - 0.5) * ds, (np.arange(padded.shape[1]) - 0.5) * ds
    contour = ax.contour(xs, ys, padded, levels=[0.5])
    rings = [np.asarray(seg, dtype=np.float64) for seg in contour.allsegs[0] if len(seg) >= 3]
    plt.close(fig)
    return rings


@dataclasses.dataclass(frozen=True)
class HeatmapHeader:
    """What the title of a slide's heatmap says."""

    slide_id: str
    prediction: str = ""
    """e.g. ``P(tumor) 0.93 -> tumor`` or ``risk 1.27``."""
    label: str | None = None
    run: str = ""
    """e.g. ``runs/exp, epoch 7 (best)``."""


SCORE_NAMES = {"attention": "attention", "tile_prediction": "per-tile prediction (last class logit)"}


def draw_figure(overlay: np.ndarray, low: float, high: float, key: str, style: HeatmapStyle, header: HeatmapHeader,
                outlines: list[np.ndarray], level0_wh: tuple[int, int]) -> Any:
    """The heatmap as a matplotlib figure: title, the overlay at its own resolution, outlines, numeric colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    h, w = overlay.shape[:2]
    fig_w = max(6.0, w / 100 + 1.4)  # inches at 100 dpi: the thumbnail near its own resolution, 1.4 in for the bar
    img_h = h / w * (fig_w - 1.4)
    fig_h = img_h + max(0.62, 0.05 * fig_w)  # room for the two title lines
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=100)
    ax = fig.add_axes((0.05 / fig_w, 0.05 / fig_h, (fig_w - 1.45) / fig_w, img_h / fig_h))
    ax.imshow(overlay, interpolation="nearest")
    sx, sy = w / level0_wh[0], h / level0_wh[1]
    for i, ring in enumerate(outlines):
        ax.plot(ring[:, 0] * sx, ring[:, 1] * sy, color="#00d000", lw=1.4, label="annotation" if i == 0 else None)
    if outlines:
        ax.legend(loc="lower right", fontsize=max(9.0, min(18.0, 0.6 * max(6.0, w / 100 + 1.4))), framealpha=0.8)
    ax.set_axis_off()
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    parts = [header.slide_id]
    if header.prediction:
        parts.append(header.prediction)
    if header.label is not None:
        parts.append(f"label {header.label}")
    line2 = [SCORE_NAMES.get(key, key), f"scale {style.scale}", f"opacity {style.alpha:g}"]
    if style.smooth:
        line2.append(f"smoothed (sigma {style.smooth:g} tiles)")
    if header.run:
        line2.append(header.run)
    font = max(10.0, min(22.0, 1.0 * fig_w))  # readable when the PNG is shown at a page's width
    ax.set_title("  |  ".join(parts) + "\n" + ", ".join(line2), fontsize=font, loc="left")
    cax = fig.add_axes(((fig_w - 1.2) / fig_w, 0.1 / fig_h + 0.1 * img_h / fig_h, 0.18 / fig_w, 0.8 * img_h / fig_h))
    mappable = cm.ScalarMappable(norm=colors.Normalize(low, high), cmap=style.cmap)
    bar = fig.colorbar(mappable, cax=cax)
    if style.scale == "rank":
        bar.set_ticks([0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25", "50", "75", "100"])
        bar.set_label(f"{key}: percentile rank within the slide", fontsize=font * 0.8)
    else:
        bar.set_label(f"{key}" + (" (colours: slide min to max)" if style.scale == "minmax" else ""), fontsize=font * 0.8)
    bar.ax.tick_params(labelsize=font * 0.7)
    return fig


def gallery_figure(tiles: np.ndarray, scores: np.ndarray, xy: np.ndarray, top: int, key: str,
                   header: HeatmapHeader) -> Any:
    """Top-``top`` tiles (first row) and bottom ones (second row), each captioned with its score and level-0 x, y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = top
    fig, axes = plt.subplots(2, cols, figsize=(1.7 * cols + 0.6, 4.4), squeeze=False)
    for row, name in enumerate(("highest", "lowest")):
        for c in range(cols):
            ax = axes[row][c]
            ax.set_axis_off()
            i = row * cols + c
            if i >= len(tiles):
                continue
            image = tiles[i].transpose(1, 2, 0) if tiles[i].shape[0] == 3 else tiles[i]
            ax.imshow(image, interpolation="nearest")
            ax.set_title(f"{scores[i]:.3g}\n({int(xy[i][0])}, {int(xy[i][1])})", fontsize=8)
        axes[row][0].text(-0.12, 0.5, f"{name}\n{key}", transform=axes[row][0].transAxes, ha="right", va="center",
                          fontsize=9, rotation=90)
    fig.suptitle(f"{header.slide_id}: the {top} tiles of highest and of lowest {key} (score; level-0 x, y)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_heatmap(
    out_dir: Path,
    slide_id: str,
    thumbnail: np.ndarray,
    level0_wh: tuple[int, int],
    level0_xy: np.ndarray,
    level0_px: int,
    scores: Mapping[str, np.ndarray],
    *,
    style: HeatmapStyle = HeatmapStyle(),
    header: HeatmapHeader | None = None,
    annotations: str | Path | None = None,
    read_tiles: Callable[[np.ndarray], np.ndarray] | None = None,
    extra_scores: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[Path]:
    """``{slide_id}_{score}.png`` for each score (title, numeric colour bar, outlines of ``annotations``),
    ``{slide_id}_{score}_gallery.png`` (top-k / bottom-k tiles, when ``read_tiles`` reads tiles at level-0 x, y)
    and one ``{slide_id}.geojson`` holding every score. ``extra_scores`` (score -> (x, y, values) of extra tiles,
    ``--overlap``) join the map only: the gallery and GeoJSON keep the model's tiles."""
    style.check()
    header = header or HeatmapHeader(slide_id)
    outlines = annotation_outlines(annotations) if annotations else []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, values in scores.items():
        xy, vals = np.asarray(level0_xy), np.asarray(values, dtype=np.float64)
        if extra_scores and key in extra_scores:
            xy = np.concatenate([xy, extra_scores[key][0]])
            vals = np.concatenate([vals, extra_scores[key][1]])
        overlay, low, high = render_heatmap(thumbnail, level0_wh, xy, level0_px, vals, style=style)
        path = out_dir / f"{slide_id}_{key}.png"
        _save_figure(draw_figure(overlay, low, high, key, style, header, outlines, level0_wh), path)
        written.append(path)
        if read_tiles is not None and style.top_k > 0 and len(values):
            k = min(style.top_k, max(1, len(values) // 2))
            order = np.argsort(-np.asarray(values), kind="stable")
            pick = np.concatenate([order[:k], order[::-1][:k]])
            tiles = read_tiles(np.asarray(level0_xy)[pick])
            gallery = out_dir / f"{slide_id}_{key}_gallery.png"
            _save_figure(gallery_figure(tiles, np.asarray(values)[pick], np.asarray(level0_xy)[pick], k, key, header),
                         gallery)
            written.append(gallery)
    measurements = dict(scores)
    measurements.update({f"{k}_rank": percentile_rank(v) for k, v in scores.items()})
    geo = out_dir / f"{slide_id}.geojson"
    collection = tiles_geojson(level0_xy, level0_px, measurements)
    collection["fullslide"] = dataclasses.asdict(header)  # a foreign member: QuPath ignores it, `view` reads it
    atomic_write_text(geo, json.dumps(collection))
    written.append(geo)
    return written
