"""``open_slide``: pick a backend (or use the one asked for) and wrap it in ``Slide``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fullslide.errors import SlideError
from fullslide.slides.base import Slide, SlideBackend

log = logging.getLogger(__name__)

#: Suffixes of plain images (decoded whole by the image backend).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Suffixes scanned for when a folder is given.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".dcm") + IMAGE_SUFFIXES
_IMAGE_MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def _openslide(path: Path) -> SlideBackend:
    from fullslide.slides.openslide_backend import OpenSlideBackend

    return OpenSlideBackend(path)


def _tiffslide(path: Path) -> SlideBackend:
    from fullslide.slides.tiffslide_backend import TiffSlideBackend

    return TiffSlideBackend(path)


def _fastslide(path: Path) -> SlideBackend:
    from fullslide.slides.fastslide_backend import FastSlideBackend

    return FastSlideBackend(path)


def _image(path: Path) -> SlideBackend:
    from fullslide.slides.image_backend import ImageBackend

    return ImageBackend(path)


#: Backend name -> constructor; each imports its library only when used.
BACKENDS: dict[str, Callable[[Path], SlideBackend]] = {
    "openslide": _openslide,
    "tiffslide": _tiffslide,
    "fastslide": _fastslide,  # optional, never chosen by "auto" (its JPEG pixels differ from OpenSlide's)
    "image": _image,
}
BACKEND_CHOICES = ("auto", *BACKENDS)


def open_slide(path: str | Path, *, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a slide; ``backend`` is "auto" or a name in ``BACKENDS``; ``mpp`` overrides metadata.

    ``path`` is a slide file or a DICOM WSI's folder of instances (read by OpenSlide from one of them).
    Raises SlideError with a one-line cause for a missing, unreadable, truncated or unknown file.
    """
    path = Path(path)
    if backend != "auto" and backend not in BACKENDS:
        raise SlideError(path, f"unknown backend {backend!r} (choose from {', '.join(BACKEND_CHOICES)})")
    try:
        path.stat()
    except FileNotFoundError:
        raise SlideError(path, "file not found" if not path.is_symlink() else "broken symbolic link") from None
    except OSError as exc:  # a symlink loop (ELOOP), a permission problem on a folder above, ...
        raise SlideError(path, f"cannot open ({exc.strerror or exc})") from None
    source = path
    if path.is_dir():
        from fullslide.slides.dicom import dicom_instances, instance_to_open

        instances = dicom_instances(path)
        if not instances:
            raise SlideError(path, "is a folder, not a slide file (and holds no DICOM instances)")
        source = instance_to_open(path, instances)
    try:
        name = backend if backend != "auto" else detect_backend(source)
        if source is not path and name not in ("openslide", "fastslide"):
            raise SlideError(path, f"a DICOM slide is read by OpenSlide or fastslide, not by the {name!r} backend")
        return Slide(path, BACKENDS[name](source), mpp=mpp)
    except OSError as exc:
        raise SlideError(path, f"cannot read file ({exc.strerror or exc})") from exc


def detect_backend(path: Path) -> str:
    """The backend for ``path``: plain images by content, then OpenSlide, then tiffslide for TIFFs."""
    from fullslide.slides.tiff_check import TIFF_MAGICS

    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise SlideError(path, "empty file, not a slide")
    if head.startswith(_IMAGE_MAGICS) or (path.suffix.lower() in IMAGE_SUFFIXES and not head.startswith(TIFF_MAGICS)):
        return "image"
    import openslide

    if openslide.OpenSlide.detect_format(str(path)) is not None:
        return "openslide"
    if head[:4] in TIFF_MAGICS:
        log.debug("%s: OpenSlide does not recognise it; reading it as TIFF with tiffslide", path)
        return "tiffslide"
    raise SlideError(path, "not a slide: neither OpenSlide nor tiffslide recognises the format")
