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
#: Key under which the readers report the coords dataset's stored dtype (not an HDF5 attribute).
STORED_DTYPE = "_stored_dtype"


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
    coords, geometry, _ = read_coords_and_attrs(h5_path)
    return coords, geometry


def read_coords_and_attrs(h5_path: str | Path) -> tuple[np.ndarray, TileGeometry, dict[str, Any]]:
    """:func:`read_coords` plus the file's attributes."""
    coords, attrs = _read(h5_path, load=True)
    assert coords is not None
    try:
        geometry = TileGeometry.from_attrs(attrs)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise SlideError(h5_path, f"not a fullslide coords file: bad tiling attributes ({exc})") from exc
    return coords, geometry, attrs


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
            attrs[STORED_DTYPE] = str(dataset.dtype)
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


def coords_problem(
    coords: np.ndarray, geometry: TileGeometry, attrs: Mapping[str, Any], slide_wh: tuple[int, int],
    slide_bytes: int | None = None,
) -> str | None:
    """Why these coordinates cannot be trusted for this slide (one phrase), or None.

    Checks the stored dtype (wide enough for level-0 pixels), that every tile origin lies on the slide, that
    there are no more rows than the slide has room for, and that the slide is the one that was tiled: its
    level-0 size and (where recorded) its file size.
    """
    dtype = np.dtype(attrs.get(STORED_DTYPE, "int64"))
    if dtype.itemsize < 4:
        return f"coords are {dtype}, too narrow for level-0 pixel positions (int32 or int64 expected)"
    width, height = (int(v) for v in slide_wh)
    tiled = (attrs.get("level0_width"), attrs.get("level0_height"))
    if None not in tiled and (int(tiled[0]), int(tiled[1])) != (width, height):
        return f"the slide is {width} x {height} px but was {tiled[0]} x {tiled[1]} px when tiled (re-tile it)"
    if slide_bytes is not None and attrs.get("slide_bytes") not in (None, slide_bytes):
        return f"the slide file is {slide_bytes} bytes but was {attrs['slide_bytes']} when tiled (re-tile it)"
    if len(coords):
        low, high = coords.min(axis=0), coords.max(axis=0)
        if low[0] < 0 or low[1] < 0 or high[0] >= width or high[1] >= height:
            return (f"tile origins span x {low[0]}..{high[0]}, y {low[1]}..{high[1]}, outside the slide's "
                    f"{width} x {height} px")
    room = (-(-width // geometry.level0_px)) * (-(-height // geometry.level0_px))
    if len(coords) > 4 * room:  # overlapping tilings (stride < tile) stay well below 4x
        return f"{len(coords)} tiles, more than a {width} x {height} px slide holds at {geometry.level0_px} px a tile"
    return None


def find_coords_file(coords_dir: str | Path, slide_id: str) -> Path | None:
    """The coords file of ``slide_id`` in ``coords_dir``: fullslide's and CLAM's ``patches/{id}.h5``, TRIDENT's
    ``patches/{id}_patches.h5`` (or either directly in the folder); None if there is none."""
    root = Path(coords_dir)
    for folder in (root / "patches", root):
        for name in (f"{slide_id}.h5", f"{slide_id}_patches.h5"):
            if (folder / name).is_file():
                return folder / name
    return None


def is_fullslide_coords(h5_path: str | Path) -> bool:
    """Whether a coords file carries fullslide's attributes (else it is CLAM's or TRIDENT's, to import)."""
    import h5py

    try:
        with h5py.File(h5_path, "r") as h5:
            return COORDS in h5 and "fullslide_format" in h5[COORDS].attrs
    except OSError:
        return True  # unreadable: let the regular reader report it


def import_coords(src: str | Path, slide: Any, out: str | Path, slide_id: str) -> Path:
    """Convert a TRIDENT or CLAM coords file to fullslide's (same tiles, geometry made explicit) at ``out``.

    TRIDENT: ``patch_size`` (target px) and ``patch_size_level0``. CLAM: ``patch_size`` at ``patch_level`` (read
    without resampling; level-0 size = ``patch_size`` x that level's downsample). The target mpp follows from the
    slide's mpp. A file with neither is refused with one line naming what is missing.
    """
    import h5py

    from fullslide.slides.grid import TileGeometry

    src = Path(src)
    try:
        with h5py.File(src, "r") as h5:
            if COORDS not in h5:
                raise SlideError(src, f"not a coords file: no '{COORDS}' dataset")
            xy = np.asarray(h5[COORDS][...])
            attrs = {k: _plain(v) for k, v in h5[COORDS].attrs.items()}
    except (OSError, KeyError, ValueError) as exc:
        raise SlideError(src, f"cannot read coords file ({' '.join(str(exc).split())})") from exc
    if "patch_size" not in attrs:
        raise SlideError(src, "coords file without a 'patch_size' attribute (neither fullslide, TRIDENT nor CLAM)")
    if xy.dtype.kind not in "iu" or xy.dtype.itemsize < 4 or xy.ndim != 2 or xy.shape[1] != 2:
        raise SlideError(src, f"'{COORDS}' must be integer [N, 2] of at least 32 bits, got {xy.dtype} {xy.shape}")
    tile_px = int(attrs["patch_size"])
    slide_mpp = slide.require_mpp()
    if "patch_size_level0" in attrs:  # TRIDENT
        level0_px = int(attrs["patch_size_level0"])
    elif "patch_level" in attrs:  # CLAM: tiles read at patch_level without resampling
        level = int(attrs["patch_level"])
        if not 0 <= level < len(slide.level_downsamples):
            raise SlideError(src, f"'patch_level' {level} does not exist in the slide ({len(slide.level_downsamples)} "
                                  "levels)")
        level0_px = int(round(tile_px * slide.level_downsamples[level]))
    else:
        raise SlideError(src, "coords file has 'patch_size' but neither 'patch_size_level0' (TRIDENT) nor "
                              "'patch_level' (CLAM): the tiles' level-0 size is unknown")
    from fullslide.slides.dicom import slide_stat
    from fullslide.slides.grid import plan_tile_geometry

    planned = plan_tile_geometry(slide_mpp, slide.level_downsamples, slide_mpp * level0_px / tile_px, tile_px)
    geometry = TileGeometry(target_mpp=slide_mpp * level0_px / tile_px, tile_px=tile_px, slide_mpp=slide_mpp,
                            level=planned.level, level_downsample=planned.level_downsample, read_px=planned.read_px,
                            level0_px=level0_px, match_tolerance=planned.match_tolerance)
    write_coords(out, xy.reshape(-1, 2), geometry, slide_id=slide_id, level0_wh=slide.dimensions,
                 level_wh=slide.level_dimensions[geometry.level], backend=slide.backend,
                 fingerprint=f"imported:{src}",
                 extra_attrs={"imported_from": str(src), "num_tiles": int(len(xy)),
                              "slide_bytes": slide_stat(Path(slide.path))[0]})
    return Path(out)
