"""``fullslide view RUN``: a local slide viewer - pan and zoom at full resolution with the score overlay.

A small standard-library HTTP server, bound to 127.0.0.1 only, serves one static page (``viewer_static/index.html``,
its JavaScript inside the package: no CDN, nothing downloaded) and a JSON/JPEG API:

* ``/api/slides``: the run's slides with their prediction, label, size and tile geometry;
* ``/api/tiles/{slide}``: every tile's level-0 x, y and scores (attention and its percentile rank), read from the
  QuPath GeoJSON that ``fullslide heatmap`` writes (missing ones are computed at start-up);
* ``/api/annotations/{slide}``: outlines (level-0 polylines) from ``--annotations``;
* ``/tile/{slide}/{z}/{x}_{y}.jpg``: a 256 px JPEG of the slide at downsample ``2**z`` (read from the best pyramid
  level and resized), the deep-zoom pyramid the page draws from.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import urllib.parse
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from fullslide.errors import FullslideError

log = logging.getLogger("fullslide.view")
TILE = 256
STATIC = Path(__file__).with_name("viewer_static")


class ViewerData:
    """What the viewer serves: slide paths, predictions and tile scores of one run (read once), open slides."""

    def __init__(self, run_dir: Path, slides: dict[str, dict[str, Any]], annotations: Path | None = None,
                 backend: str = "auto") -> None:
        self.run_dir = run_dir
        self.slides = slides  # slide_id -> {"path", "mpp", "geojson", "header", "width", "height", ...}
        self.annotations = annotations
        self.backend = backend
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()

    def slide(self, slide_id: str) -> Any:
        from fullslide.slides import open_slide

        with self._lock:
            if slide_id not in self._open:
                info = self.slides[slide_id]
                self._open[slide_id] = open_slide(info["path"], backend=self.backend, mpp=info.get("mpp"))
            return self._open[slide_id]

    def listing(self) -> list[dict[str, Any]]:
        keys = ("slide_id", "prediction", "label", "run", "width", "height", "tile_level0", "max_zoom", "mpp")
        return [{k: info.get(k) for k in keys} for info in self.slides.values()]

    def tiles(self, slide_id: str) -> dict[str, Any]:
        geo = json.loads(Path(self.slides[slide_id]["geojson"]).read_text())
        xs, ys, scores = [], [], {}
        for feature in geo["features"]:
            ring = feature["geometry"]["coordinates"][0]
            xs.append(ring[0][0])
            ys.append(ring[0][1])
            for key, value in feature["properties"]["measurements"].items():
                scores.setdefault(key, []).append(value)
        return {"x": xs, "y": ys, "size": self.slides[slide_id]["tile_level0"], "scores": scores}

    def outlines(self, slide_id: str) -> list[list[list[float]]]:
        from fullslide.train.evaluate import annotation_for
        from fullslide.viz.heatmap import annotation_outlines

        path = annotation_for(slide_id, self.annotations)
        return [] if path is None else [ring.round(1).tolist() for ring in annotation_outlines(path)]

    def tile_jpeg(self, slide_id: str, z: int, tx: int, ty: int) -> bytes | None:
        """The ``TILE`` px JPEG of pyramid tile (tx, ty) at downsample ``2**z``; None outside the slide."""
        from PIL import Image

        from fullslide.slides.base import resize_rgb

        info = self.slides[slide_id]
        d = 2 ** z
        x0, y0 = tx * TILE * d, ty * TILE * d
        if not (0 <= z <= info["max_zoom"]) or tx < 0 or ty < 0 or x0 >= info["width"] or y0 >= info["height"]:
            return None
        slide = self.slide(slide_id)
        level = max([0] + [i for i, ds in enumerate(slide.level_downsamples) if ds <= d * (1 + 1e-6)])
        ds = slide.level_downsamples[level]
        side = max(1, int(round(TILE * d / ds)))
        with self._lock:  # slide libraries are not all thread-safe
            region = slide.read_region((x0, y0), level, (side, side))
        if region.shape[:2] != (TILE, TILE):
            region = resize_rgb(region, (TILE, TILE))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(region)).save(buffer, format="JPEG", quality=88)
        return buffer.getvalue()

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()


def prepare(run_dir: Path, *, split: str = "test", slide_ids: Sequence[str] | None = None,
            annotations: Path | None = None) -> ViewerData:
    """Find the slides to show, compute missing scores (``heatmap``), read sizes and predictions."""
    from fullslide.data.cohort import CohortTable
    from fullslide.data.splits import read_splits_csv
    from fullslide.slides import open_slide, read_coords
    from fullslide.train.config import load_run_config
    from fullslide.train.evaluate import heatmaps_for_run
    from fullslide.viz.heatmap import HeatmapStyle

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FullslideError(f"{run_dir}: not a run folder (no config.yaml)")
    if annotations is not None and not annotations.exists():
        raise FullslideError(f"{annotations}: annotation file or folder not found")
    config = load_run_config(run_dir)
    cohort = CohortTable.from_csv(config.data.cohort, task=config.data.task, label_column=config.data.label_column,
                                  check_paths=False, require_labels=False)
    if slide_ids:
        unknown = [s for s in slide_ids if s not in cohort.slide_ids]
        if unknown:
            raise FullslideError(f"{run_dir}: slide '{unknown[0]}' is not in the run's cohort")
        wanted = list(slide_ids)
    else:
        splits = read_splits_csv(run_dir / "splits.csv")
        wanted = [s for s in cohort.slide_ids if splits.get(s) == split]
    heat = run_dir / "heatmaps"
    missing = [s for s in wanted if not (heat / f"{s}.geojson").exists()]
    if missing:
        log.info("view: computing the scores of %d slide(s)", len(missing))
        heatmaps_for_run(run_dir, slide_ids=missing, style=HeatmapStyle(top_k=0), annotations=annotations)
    slides: dict[str, dict[str, Any]] = {}
    coords_dir = Path(config.data.coords_dir) if config.data.coords_dir else run_dir / "tiles"
    for slide_id in wanted:
        geo = heat / f"{slide_id}.geojson"
        if not geo.exists():
            log.warning("view: %s has no scores (it could not be read); left out", slide_id)
            continue
        record = cohort.by_id(slide_id)
        header = json.loads(geo.read_text()).get("fullslide", {})
        try:
            _, geometry = read_coords(coords_dir / "patches" / f"{slide_id}.h5")
            with open_slide(record.path, backend=config.data.backend, mpp=record.mpp) as slide:
                width, height = slide.dimensions
        except Exception as exc:  # one bad slide never stops the viewer
            log.warning("view: %s left out: %s", slide_id, str(exc).splitlines()[0] if str(exc) else exc)
            continue
        slides[slide_id] = {
            "slide_id": slide_id, "path": str(record.path), "mpp": record.mpp, "geojson": str(geo),
            "prediction": header.get("prediction", ""), "label": header.get("label", record.label), "run":
            header.get("run", run_dir.name), "width": width, "height": height, "tile_level0": geometry.level0_px,
            "max_zoom": max(0, math.ceil(math.log2(max(width, height) / TILE))),
        }
    if not slides:
        raise FullslideError(f"{run_dir}: no slide to show (split '{split}')")
    return ViewerData(run_dir, slides, annotations, backend=config.data.backend)


def make_handler(data: ViewerData) -> type[BaseHTTPRequestHandler]:
    page = (STATIC / "index.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "fullslide-view"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the terminal shows the URL only
            log.debug(fmt, *args)

        def _send(self, body: bytes, kind: str, status: HTTPStatus = HTTPStatus.OK) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache" if kind.startswith("application/json") else "max-age=3600")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value: Any) -> None:
            self._send(json.dumps(value).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            parts = [urllib.parse.unquote(p) for p in urllib.parse.urlparse(self.path).path.split("/") if p]
            try:
                if not parts or parts == ["index.html"]:
                    return self._send(page, "text/html; charset=utf-8")
                if parts == ["api", "slides"]:
                    return self._json(data.listing())
                if len(parts) == 3 and parts[0] == "api" and parts[2] in data.slides:
                    if parts[1] == "tiles":
                        return self._json(data.tiles(parts[2]))
                    if parts[1] == "annotations":
                        return self._json(data.outlines(parts[2]))
                if len(parts) == 4 and parts[0] == "tile" and parts[1] in data.slides and parts[3].endswith(".jpg"):
                    tx, ty = (int(v) for v in parts[3].removesuffix(".jpg").split("_"))
                    body = data.tile_jpeg(parts[1], int(parts[2]), tx, ty)
                    if body is not None:
                        return self._send(body, "image/jpeg")
            except (ValueError, FullslideError) as exc:
                log.warning("view: %s: %s", self.path, exc)
            self._send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)

    return Handler


def serve(data: ViewerData, port: int = 8765) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:``port`` (0: any free port), not yet serving: call ``serve_forever``."""
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(data))
    server.daemon_threads = True
    return server
