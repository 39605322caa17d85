"""Training, evaluation and their bookkeeping: config, trainer loop, checkpoints, losses, metrics, logs.

The package is also callable: ``fullslide.train(config)`` is :func:`fullslide.api.train` (the Python API's
``fs.train``), while ``fullslide.train.config``, ``fullslide.train.trainer``, ... stay the modules they are. (Python
binds a subpackage to its parent's attribute of the same name on import, so the API function and this package
must be one object.)
"""

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from fullslide.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
