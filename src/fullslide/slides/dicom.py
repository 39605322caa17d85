"""DICOM whole-slide images (DICOM Supplement 145): a slide is a folder of instances, one per pyramid level.

OpenSlide 4 reads a DICOM WSI from any one instance file and finds the series' other instances in the same
folder, so fullslide opens a folder through one of its instances. The slide's path stays the folder (what users
have), its id is the folder's name (never an instance's UID file name) and its size and time stamp, which decide
whether tiles are reused, are those of all its instances together.
"""

from __future__ import annotations

import os
from pathlib import Path

#: DICOM Part 10 files carry "DICM" after a 128-byte preamble.
_MAGIC_OFFSET, _MAGIC = 128, b"DICM"


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` is a DICOM Part 10 file (by content: PACS exports often have no suffix)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(_MAGIC_OFFSET)
            return fh.read(4) == _MAGIC
    except OSError:
        return False


def maybe_dicom(path: Path) -> bool:
    """A cheap filter before ``is_dicom_file``: a ``.dcm`` suffix or no suffix at all."""
    return path.suffix.lower() == ".dcm" or not path.suffix


def dicom_instances(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (sorted), empty when it holds none."""
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file() and maybe_dicom(p))
    except OSError:
        return []
    return [p for p in entries if is_dicom_file(p)]


def instance_to_open(folder: Path, instances: list[Path]) -> Path:
    """The instance OpenSlide is given for ``folder``: the largest file (the full-resolution level)."""
    return max(instances, key=lambda p: (p.stat().st_size, p.name))


def slide_stat(path: Path) -> tuple[int, int]:
    """(bytes, newest mtime in ns) of a slide: the file's own, or over a DICOM folder's instances.

    Raises FileNotFoundError / OSError like ``Path.stat``.
    """
    st = path.stat()
    if not path.is_dir():
        return int(st.st_size), int(st.st_mtime_ns)
    stats = [os.stat(p) for p in dicom_instances(path)]
    if not stats:
        return int(st.st_size), int(st.st_mtime_ns)
    return sum(int(s.st_size) for s in stats), max(int(s.st_mtime_ns) for s in stats)


def default_slide_id(path: Path) -> str:
    """A slide's id when none is given: the file's stem; for DICOM, the series folder's name."""
    if path.is_dir():
        return path.name
    if path.suffix.lower() == ".dcm" or (not path.suffix and is_dicom_file(path)):
        return path.parent.resolve().name
    return path.stem
