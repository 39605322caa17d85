"""`fullslide view`: the local viewer's API (127.0.0.1 only, slides, tile scores, annotations, pyramid JPEGs), and
the page itself in a real headless browser (skipped, with the reason, only where no Chromium is installed)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    from fullslide.api import synth, tile, train
    from fullslide.viz.viewer import prepare, serve

    root = tmp_path_factory.mktemp("view")
    cohort = synth(root / "cohort", slides=8, size=768, lesion_fraction=0.08, seed=2)
    tile(cohort, root / "tiles", target_mpp=1.0, tile_px=32)
    run = train({"run_dir": str(root / "run"), "data": {"cohort": str(cohort), "coords_dir": str(root / "tiles"),
                                                         "target_mpp": 1.0, "tile_px": 32, "fractions": [0.5, 0.2, 0.3]},
                 "encoder": {"name": "tinycnn"}, "train": {"epochs": 1, "tiles_per_slide": 32, "device": "cpu",
                                                           "loader_workers": 0}, "eval": {"bootstrap": 20}},
                progress=False)
    data = prepare(run.path, annotations=root / "cohort" / "lesions")
    server = serve(data, 0)
    assert server.server_address[0] == "127.0.0.1"  # never reachable from another machine
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", data, root
    server.shutdown()
    server.server_close()
    data.close()


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, b"", ""


def test_api_serves_slides_scores_annotations_and_the_pyramid(served) -> None:
    from PIL import Image

    url, data, root = served
    status, body, kind = _get(url + "/")
    assert status == 200 and kind.startswith("text/html") and b"<canvas" in body
    assert b"src=" not in body.replace(b"img.src", b"") and b"cdn" not in body.lower()  # nothing from elsewhere
    slides = json.loads(_get(url + "/api/slides")[1])
    assert slides and all(s["prediction"].startswith("P(1) ") for s in slides)
    first = slides[0]["slide_id"]
    geo = json.loads((root / "run" / "heatmaps" / f"{first}.geojson").read_text())
    scores = json.loads(_get(f"{url}/api/tiles/{first}")[1])
    assert len(scores["x"]) == len(geo["features"]) and scores["size"] == 64  # 32 px at 1 um/px of a 0.5 um slide
    assert np.isclose(sum(scores["scores"]["attention"]), 1, atol=1e-4)
    positive = next(s["slide_id"] for s in slides if s["label"] == "1")
    assert json.loads(_get(f"{url}/api/annotations/{positive}")[1])  # the lesion outlines of a positive slide
    status, jpeg, kind = _get(f"{url}/tile/{first}/0/0_0.jpg")
    assert status == 200 and kind == "image/jpeg"
    image = np.asarray(Image.open(io.BytesIO(jpeg)))
    region = data.slide(first).read_region((0, 0), 0, (256, 256))
    assert image.shape == (256, 256, 3) and np.abs(image.astype(int) - region.astype(int)).mean() < 4  # JPEG of level 0
    coarse = np.asarray(Image.open(io.BytesIO(_get(f"{url}/tile/{first}/2/0_0.jpg")[1])))
    assert coarse.shape == (256, 256, 3)  # the whole 768 px slide at downsample 4 fits one tile
    for bad in (f"/tile/{first}/0/9_9.jpg", f"/tile/{first}/9/0_0.jpg", "/tile/../../etc/passwd/0/0_0.jpg",
                "/api/tiles/nope", f"/tile/{first}/0/x_0.jpg"):
        assert _get(url + bad)[0] == 404, bad


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (`.ci/run` installs one: apt-get install chromium)")
def test_the_page_draws_the_slide_with_its_scores_in_a_headless_browser(served, tmp_path: Path) -> None:
    from PIL import Image

    url, data, _ = served
    positive = next(s for s in data.listing() if s["label"] == "1")["slide_id"]
    base = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,800",
            "--virtual-time-budget=8000"]
    shots = {}
    for alpha in ("0", "0.6"):  # the same view without and with the score overlay
        shots[alpha] = tmp_path / f"view_{alpha}.png"
        subprocess.run(base + [f"--screenshot={shots[alpha]}", f"{url}/?slide={positive}&alpha={alpha}"],
                       capture_output=True, timeout=120)
    dom = subprocess.run(base + ["--dump-dom", f"{url}/?slide={positive}"], capture_output=True, text=True,
                         timeout=120).stdout
    assert all(s in dom for s in data.slides) and "P(1) " in dom  # the slide list with predictions
    assert f"{positive}  |  P(1)" in dom  # the title of the slide shown
    plain, over = (np.asarray(Image.open(shots[a]).convert("RGB")).astype(int)[80:, 270:] for a in ("0", "0.6"))
    r, g, b = plain[..., 0], plain[..., 1], plain[..., 2]
    assert ((r > 150) & (b > 150) & (g < 140)).mean() > 0.02  # eosin pink/purple: the slide itself is drawn
    assert ((g > 150) & (r < 80) & (b < 80)).sum() > 50  # the green annotation outline
    diff = over - plain
    assert (np.abs(diff).max(axis=-1) > 20).mean() > 0.02  # the overlay covers the tissue's tiles
    redder = (diff[..., 0] - diff[..., 2]) > 30  # coolwarm: high-rank tiles shift towards red ...
    bluer = (diff[..., 2] - diff[..., 0]) > 30  # ... low-rank tiles towards blue
    assert redder.sum() > 500 and bluer.sum() > 500
