"""lightning_split: split learning for PyTorch Lightning over mutually authenticated TLS gRPC.

Importing the package registers the strategy, so that ``Trainer(strategy="split")`` resolves
(the connection then comes from ``$LIGHTNING_SPLIT_ADDRESS``, ``$LIGHTNING_SPLIT_NODE_ID`` and
``$LIGHTNING_SPLIT_CERTS``); ``Trainer(strategy=SplitStrategy(...))`` takes it explicitly.
"""

from lightning_split.split.build import ModelSource
from lightning_split.split.decode_stats import GenerationMetrics, SplitProgress
from lightning_split.split.spec import SplitSpec
from lightning_split.strategy import SessionLost, SplitStrategy, register

__version__ = "0.1.0"
__all__ = ["GenerationMetrics", "SessionLost", "SplitProgress", "SplitStrategy", "SplitSpec", "ModelSource",
           "__version__"]

register()
