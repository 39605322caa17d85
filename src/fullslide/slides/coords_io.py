"""Tile coordinates on disk: one HDF5 file per slide, laid out as CLAM and TRIDENT do.

``coords`` is an int64 [N, 2] dataset of level-0 (x, y) tile origins; the tiling parameters are
attributes on that dataset (CLAM/TRIDENT names where they exist: patch_size, patch_size_level0,
patch_level, downsample, level_dim, name; ours beside them). Files are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fullslide.atomic import atomic_path
from fullslide.errors import SlideError
from fullslide.slides.grid import TileGeometry

COORDS = "coords"
#: Attributes every coords file must hold (beyond the geometry's own).
REQUIRED_ATTRS = ("name", "level0_width", "level0_height", "backend", "fingerprint")
FORMAT_VERSION = 1


def write_coords(
    h5_path: str | Path,
    level0_xy: np.ndarray,
    geometry: TileGeometry,
    *,
    slide_id: str,
    level0_wh: tuple[int, int],
    level_wh: tuple[int, int],
    backend: str,
    fingerprint: str,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write the coords file atomically (temp file + rename) and return its path."""
    import h5py

    coords = np.asarray(level0_xy, dtype=np.int64).reshape(-1, 2)
    attrs: dict[str, Any] = dict(geometry.to_attrs())
    attrs.update(
        name=slide_id,
        level_dim=np.array(level_wh, dtype=np.int64),
        downsampled_level_dim=np.array(level_wh, dtype=np.int64),
        level0_width=int(level0_wh[0]),
        level0_height=int(level0_wh[1]),
        backend=backend,
        fingerprint=fingerprint,
        fullslide_format=FORMAT_VERSION,
    )
    attrs.update(extra_attrs or {})
    h5_path = Path(h5_path)
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as h5:
            dataset = h5.create_dataset(COORDS, data=coords, maxshape=(None, 2))
            for key, value in attrs.items():
                dataset.attrs[key] = value
    return h5_path


def read_coords_attrs(h5_path: str | Path) -> dict[str, Any]:
    """The attributes of a coords file (validated), without loading the coordinates."""
    return _read(h5_path, load=False)[1]


def read_coords(h5_path: str | Path) -> tuple[np.ndarray, TileGeometry]:
    """Level-0 coords int64 [N, 2] and the geometry they were made with; SlideError on a bad file."""
    coords, attrs = _read(h5_path, load=True)
    assert coords is not None
    try:
        geometry = TileGeometry.from_attrs(attrs)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise SlideError(h5_path, f"not a fullslide coords file: bad tiling attributes ({exc})") from exc
    return coords, geometry


def _read(h5_path: str | Path, *, load: bool) -> tuple[np.ndarray | None, dict[str, Any]]:
    import h5py

    path = Path(h5_path)
    if not path.is_file():
        raise SlideError(path, "coords file not found")
    try:
        with h5py.File(path, "r") as h5:
            if COORDS not in h5 or not isinstance(h5[COORDS], h5py.Dataset):
                raise SlideError(path, f"not a coords file: no '{COORDS}' dataset")
            dataset = h5[COORDS]
            if dataset.ndim != 2 or dataset.shape[1] != 2 or dataset.dtype.kind not in "iu":
                raise SlideError(path, f"'{COORDS}' must be integer [N, 2], got {dataset.dtype} {dataset.shape}")
            attrs = {k: _plain(v) for k, v in dataset.attrs.items()}
            coords = np.asarray(dataset[...], dtype=np.int64) if load else None
    except SlideError:
        raise
    except (OSError, KeyError, ValueError) as exc:  # h5py: truncated/corrupt/not HDF5
        raise SlideError(path, f"cannot read coords file ({' '.join(str(exc).split())})") from exc
    missing = [k for k in REQUIRED_ATTRS + ("patch_size", "patch_size_level0", "patch_level") if k not in attrs]
    if missing:
        raise SlideError(path, f"not a fullslide coords file: missing attributes {', '.join(missing)}")
    return coords, attrs


def _plain(value: Any) -> Any:
    """HDF5 attribute value as a plain Python/numpy value (bytes decoded)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value
