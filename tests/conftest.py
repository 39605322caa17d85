"""Shared test fixtures: the vendored real slide and small synthetic slides, made once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def real_svs() -> Path:
    """The vendored Aperio SVS region (2220 x 2967, one level, 0.499 mpp)."""
    return DATA / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labels CSV of a tiny focal synthetic cohort: 4 slides of 1536 x 1536 px at 0.5 mpp, pyramidal TIFFs."""
    from fullslide.slides.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("synth_cohort"), 4, signal="focal", size=(1536, 1536), mpp=0.5,
                       lesion_fraction=0.06, seed=11)


def write_split_cohort(synth_cohort: Path, out: Path, paths: dict[int, Path] | None = None) -> Path:
    """A training CSV of ``synth_cohort``'s 4 slides with a split column (train, val, test, train: both labels
    train); ``paths`` replaces some rows' slide paths (e.g. by a DICOM folder)."""
    import csv

    rows = list(csv.DictReader(open(synth_cohort, newline="")))
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label", "split"])
        for i, (r, split) in enumerate(zip(rows, ("train", "val", "test", "train"))):
            path = (paths or {}).get(i, synth_cohort.parent / r["path"])
            w.writerow([r["slide_id"], str(path), r["label"], split])
    return out


@pytest.fixture(scope="module")
def split_cohort(synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth_cohort`` as a training CSV with a split column (:func:`write_split_cohort`)."""
    return write_split_cohort(synth_cohort, tmp_path_factory.mktemp("split_cohort") / "cohort.csv")


@pytest.fixture(scope="session")
def synth_slide(synth_cohort: Path) -> Path:
    """One pyramidal synthetic TIFF (the first slide of ``synth_cohort``)."""
    return synth_cohort.parent / "slides" / "synth_0000.tiff"


@pytest.fixture()
def rgb_image(tmp_path: Path) -> Path:
    """A small PNG with a pink 'tissue' square on white, for the plain-image backend (no mpp)."""
    from PIL import Image

    rgb = np.full((600, 800, 3), 245, dtype=np.uint8)
    rgb[150:450, 200:600] = (200, 110, 180)
    path = tmp_path / "plain.png"
    Image.fromarray(rgb).save(path)
    return path
