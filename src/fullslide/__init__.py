"""fullslide: exact end-to-end training of tile encoders and MIL aggregators on whole slides.

Importing the package is cheap on purpose: no torch, no slide libraries, no network.
Import the submodules you need (``fullslide.slides``, ``fullslide.engine``, ...).
"""

__version__ = "0.1.0"
