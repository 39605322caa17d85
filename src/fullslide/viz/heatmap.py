"""Per-tile scores (attention, per-tile predictions) drawn over the slide thumbnail, and as QuPath GeoJSON.

The PNG shows each tile's square coloured by its score, min-max scaled (attention in MIL is sparse: the few tiles
that carry the decision stand out; ``scale="rank"`` colours percentile ranks instead, CLAM-style), blended over
the thumbnail, with a colour bar. The GeoJSON holds one
``tile`` object per tile in level-0 pixel coordinates with the scores as measurements: File > Import
objects in QuPath overlays it on the slide (Measure > Show measurement maps colours it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

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


def scaled(scores: np.ndarray, scale: str = "linear") -> np.ndarray:
    """Scores mapped to [0, 1]: min-max (``linear``) or percentile rank (``rank``)."""
    if scale == "rank":
        return percentile_rank(scores)
    scores = np.asarray(scores, dtype=np.float64)
    span = float(scores.max() - scores.min()) if scores.size else 0.0
    return (scores - scores.min()) / span if span > 0 else np.ones_like(scores)


def _colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    """[N] in [0, 1] -> uint8 [N, 3] colours."""
    from matplotlib import colormaps

    return (colormaps[name](np.clip(values, 0, 1))[:, :3] * 255).astype(np.uint8)


def render_heatmap(
    thumbnail: np.ndarray,
    level0_wh: tuple[int, int],
    level0_xy: np.ndarray,
    level0_px: int,
    scores: np.ndarray,
    *,
    alpha: float = 0.55,
    cmap: str = "inferno",
    scale: str = "linear",
) -> np.ndarray:
    """uint8 [h, w, 3] image: the thumbnail with every tile's square coloured by its scaled score."""
    h, w = thumbnail.shape[:2]
    sx, sy = w / level0_wh[0], h / level0_wh[1]
    overlay = thumbnail.astype(np.float32).copy()
    colours = _colormap(scaled(scores, scale), cmap).astype(np.float32)
    for (x, y), colour in zip(np.asarray(level0_xy).tolist(), colours):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int(round((x + level0_px) * sx))), max(y0 + 1, int(round((y + level0_px) * sy)))
        overlay[y0:y1, x0:x1] = (1 - alpha) * overlay[y0:y1, x0:x1] + alpha * colour
    return overlay.clip(0, 255).astype(np.uint8)


def with_colorbar(image: np.ndarray, title: str, cmap: str = "inferno") -> np.ndarray:
    """Append a labelled colour bar (low -> high rank) under ``image``."""
    from PIL import Image, ImageDraw, ImageFont

    w = image.shape[1]
    font_px = max(12, w // 64)
    font = ImageFont.load_default(size=font_px)
    bar_h, text_h = max(8, w // 60), font_px + 6
    bar = np.repeat(_colormap(np.linspace(0, 1, w), cmap)[None], bar_h, axis=0)
    canvas = Image.new("RGB", (w, image.shape[0] + bar_h + text_h), "white")
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(Image.fromarray(bar), (0, image.shape[0]))
    draw = ImageDraw.Draw(canvas)
    y = image.shape[0] + bar_h + 2
    draw.text((2, y), "low", fill="black", font=font)
    draw.text((max(2, w // 2 - font_px * len(title) // 4), y), title, fill="black", font=font)
    draw.text((w - 3 * font_px, y), "high", fill="black", font=font)
    return np.asarray(canvas)


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


def write_heatmap(
    out_dir: Path,
    slide_id: str,
    thumbnail: np.ndarray,
    level0_wh: tuple[int, int],
    level0_xy: np.ndarray,
    level0_px: int,
    scores: Mapping[str, np.ndarray],
) -> list[Path]:
    """``{slide_id}_{score}.png`` for each score and one ``{slide_id}.geojson`` holding all of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, values in scores.items():
        image = with_colorbar(render_heatmap(thumbnail, level0_wh, level0_xy, level0_px, values), f"{key} (min-max)")
        path = out_dir / f"{slide_id}_{key}.png"
        save_png(path, image)
        written.append(path)
    measurements = dict(scores)
    measurements.update({f"{k}_rank": percentile_rank(v) for k, v in scores.items()})
    geo = out_dir / f"{slide_id}.geojson"
    atomic_write_text(geo, json.dumps(tiles_geojson(level0_xy, level0_px, measurements)))
    written.append(geo)
    return written
