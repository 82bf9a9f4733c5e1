"""lightning_split: split learning for PyTorch Lightning over mutually authenticated TLS gRPC.

Importing the package registers the strategy, so that ``Trainer(strategy="split")`` resolves
(the connection then comes from ``$LIGHTNING_SPLIT_ADDRESS``, ``$LIGHTNING_SPLIT_NODE_ID`` and
``$LIGHTNING_SPLIT_CERTS``); ``Trainer(strategy=SplitStrategy(...))`` takes it explicitly.

The names below are loaded when first used (PEP 562), and the registration waits for Lightning:
it runs when ``lightning.pytorch`` has been imported, now or later. A process that never imports
Lightning (a server, the ``lightning-split certs`` command, a client of the wire alone) never pays
for it: importing Lightning took 7 of the 10 seconds that importing the server took on a 2-core VM.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"
__all__ = ["GenerationMetrics", "SessionLost", "SplitProgress", "SplitStrategy", "SplitSpec", "ModelSource",
           "__version__"]

_HOMES = {"ModelSource": "lightning_split.split.build", "SplitSpec": "lightning_split.split.spec",
          "GenerationMetrics": "lightning_split.split.decode_stats",
          "SplitProgress": "lightning_split.split.decode_stats", "SessionLost": "lightning_split.strategy",
          "SplitStrategy": "lightning_split.strategy", "register": "lightning_split.strategy"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lightning_split' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Registers the strategy once ``lightning.pytorch`` has run: the finder takes part in that one
    import only, to wrap its loader (Python has no hook after an import; this is the usual way)."""

    NAME = "lightning.pytorch"

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)  # the rest of the finders find it; this one is done
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run_module = spec.loader.exec_module

            def run_then_register(module: ModuleType) -> None:
                run_module(module)
                __getattr__("register")()

            spec.loader.exec_module = run_then_register  # type: ignore[method-assign]
        return spec


if _RegisterAfterLightning.NAME in sys.modules:
    __getattr__("register")()
elif not any(isinstance(f, _RegisterAfterLightning) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterLightning())
