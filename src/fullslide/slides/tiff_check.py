"""Cheap integrity check of TIFF-based slides: every page's data must lie inside the file.

Slide libraries open a truncated file happily when its directories survive and only fail (or
return garbage) when a missing tile is read, possibly hours into training. Checking the page
offsets against the file size at open time turns that into an immediate one-line error.
"""

from __future__ import annotations

import logging
import re
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
    errors = _CollectErrors()
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(errors)
    propagate, tiff_log.propagate = tiff_log.propagate, False  # reported below, not printed
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            if errors.messages:  # tifffile logs (not raises) a broken directory chain
                raise SlideError(path, f"truncated or corrupt TIFF ({errors.messages[0]})")
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
    finally:
        tiff_log.removeHandler(errors)
        tiff_log.propagate = propagate


class _CollectErrors(logging.Handler):
    """Keeps the text of ERROR records (tifffile reports broken page chains by logging)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = re.sub(r"^<[^>]*>\s*", "", record.getMessage())  # drop tifffile's "<TiffPages @8>" prefix
        self.messages.append(" ".join(text.split()))
