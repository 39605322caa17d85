"""Make ``import timm`` work next to a CPU-only torch.

timm imports torchvision. The torchvision wheel that PyPI serves beside a CPU torch is a CUDA build
whose C extension fails to load; torchvision then registers fake (meta) kernels for
``torchvision::nms`` and ``torchvision::qnms`` at import time, and that registration raises
"operator torchvision::nms does not exist" because the extension that defines those operators is
missing. fullslide never uses these detection operators, so when (and only when) the extension fails to
load we define their schemas ourselves; the fake-kernel registration then succeeds and the rest of
torchvision (transforms, which timm needs) works. A working torchvision is left untouched.
"""

from __future__ import annotations

import importlib
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive for the life of the process


def ensure_torchvision_importable() -> None:
    """Import torchvision, defining the two missing operator schemas if its extension is broken."""
    global _library
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "__version__"):
        return
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
    import torch

    # Drop the half-imported modules, define the schemas, and import again.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    importlib.import_module("torchvision")


def import_timm():  # -> module timm
    """Return the ``timm`` module, importable on CPU-only installs."""
    ensure_torchvision_importable()
    return importlib.import_module("timm")
