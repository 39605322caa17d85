"""Cheap integrity check of TIFF-based slides: every page's data must lie inside the file.

Slide libraries open a truncated file happily when its directories survive and only fail (or
return garbage) when a missing tile is read, possibly hours into training. Checking the page
offsets against the file size at open time turns that into an immediate one-line error.
"""

from __future__ import annotations

from pathlib import Path

from fullslide.errors import SlideError

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff(path: Path) -> bool:
    """True when the file starts with a TIFF or BigTIFF header."""
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGICS


def check_tiff(path: Path) -> None:
    """Raise SlideError when a TIFF's directories or tile data run past the end of the file."""
    if not is_tiff(path):
        return
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            if not pages:
                raise SlideError(path, "truncated or corrupt TIFF: no image directory")
            for index, page in enumerate(pages):
                offsets = getattr(page, "dataoffsets", ())
                counts = getattr(page, "databytecounts", ())
                if len(offsets) == 0:
                    continue
                end = max(int(o) + int(c) for o, c in zip(offsets, counts))
                if end > size:
                    raise SlideError(
                        path,
                        f"truncated or corrupt TIFF: page {index} data ends at byte {end} "
                        f"but the file has {size} bytes",
                    )
    except SlideError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, IndexError...
        raise SlideError(path, f"truncated or corrupt TIFF ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
