"""Plain images (PNG, JPEG, ...) and in-memory arrays as one-level slides.

For small inputs only: the whole image is decoded into memory. Such files carry no reliable
mpp (their dpi fields are screen defaults), so the user supplies it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from fullslide.errors import SlideError
from fullslide.slides.base import BACKGROUND, SlideBackend

#: Largest plain image opened (pixels; Pillow's own decompression-bomb limit); bigger ones belong
#: in a pyramidal TIFF.
MAX_IMAGE_PIXELS = 178_956_970


class ImageBackend(SlideBackend):
    """One decoded RGB array; ``from_array`` builds one without a file (tests, fakes)."""

    name: ClassVar[str] = "image"

    def __init__(self, path: Path) -> None:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                # the size limit below replaces Pillow's DecompressionBombWarning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    if image.width * image.height > MAX_IMAGE_PIXELS:
                        raise SlideError(
                            path,
                            f"plain image of {image.width}x{image.height} px is too large to decode in memory; "
                            "convert it to a pyramidal TIFF",
                        )
                    fmt = (image.format or "image").lower()
                    rgb = _to_rgb(image)
        except SlideError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # PIL's unreadable/truncated errors
            raise SlideError(path, f"cannot decode image ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
        self._init(rgb, fmt)

    @classmethod
    def from_array(cls, rgb: np.ndarray, vendor: str = "array") -> ImageBackend:
        """A backend over a uint8 [h, w, 3] array, without a file."""
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected uint8 [h, w, 3], got {rgb.dtype} {rgb.shape}")
        self = cls.__new__(cls)
        self._init(rgb, vendor)
        return self

    def _init(self, rgb: np.ndarray, vendor: str) -> None:
        self._rgb = rgb
        self._vendor = vendor

    @property
    def vendor(self) -> str:
        return self._vendor

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return ((int(self._rgb.shape[1]), int(self._rgb.shape[0])),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def metadata_mpp(self) -> float | None:
        return None

    @property
    def properties(self) -> Mapping[str, object]:
        return {"image.format": self._vendor}

    def read_region(self, level0_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        x, y = level0_xy
        return self._rgb[y : y + size_wh[1], x : x + size_wh[0]]


def _to_rgb(image: object) -> np.ndarray:
    """Decode a PIL image to uint8 RGB, compositing any transparency onto white."""
    from PIL import Image

    assert isinstance(image, Image.Image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 4)
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if image.mode in ("I;16", "I;16B", "I", "F"):
        raise ValueError(f"unsupported {image.mode} image (only 8-bit images are read)")
    return np.asarray(image.convert("RGB"))
