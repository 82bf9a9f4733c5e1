"""lightning_split: split learning for PyTorch Lightning over mutually authenticated TLS gRPC.

Importing the package registers the strategy, so that ``Trainer(strategy="split")`` resolves
(the connection then comes from ``$LIGHTNING_SPLIT_ADDRESS``, ``$LIGHTNING_SPLIT_NODE_ID`` and
``$LIGHTNING_SPLIT_CERTS``); ``Trainer(strategy=SplitStrategy(...))`` takes it explicitly.

The names below are loaded when first used (PEP 562). In the ``lightning-split`` console script the
registration waits too: its ``--help`` and ``certs`` need neither torch nor Lightning, whose
imports took 7 of the 9 seconds ``--help`` did; ``serve`` and ``train`` import what they use.
"""

import importlib
import sys
from pathlib import Path
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


if Path(sys.argv[0] if sys.argv else "").name != "lightning-split":
    __getattr__("register")()
