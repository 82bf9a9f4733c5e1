"""A draft model for speculative decoding made of the client's own weights: the model exits early.

Assisted generation (``model.generate(..., assistant_model=draft)``) drafts tokens on the client
and has the server verify them all in one round trip. A separate small draft model must share the
vocabulary, be shipped and be held in memory. In a U-shaped split the client already holds the
model's first blocks and its final norm and output layer: run on their own they are a draft
(self-speculation: the model exits after its first blocks, as LayerSkip drafts), with no weights
of its own and no round trip to make.

The draft shares every module with the client's model (``copy.copy`` of the modules on the way to
the block list, a new list of the first ``layers`` blocks, a copy of the config that counts them);
nothing is copied or allocated. Its drafts are only as good as the model's early exit: a model
trained to exit early (LayerSkip) drafts well, others less so; greedy output is exact either way,
since the server's blocks verify every drafted token.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from lightning_split.split.spec import ResolvedSplit

# Config fields that count the blocks, by family (Hugging Face maps n_layer and friends onto
# num_hidden_layers for the models that have it; both are set where present).
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")


def early_exit_draft(model: nn.Module, split: ResolvedSplit, layers: int = 1) -> nn.Module:
    """The client's ``model`` cut to its first ``layers`` blocks, then its final norm and output layer.

    Only for a U-shaped split (a two-part split's client has no output layer), and ``layers`` at
    most the cut (the blocks after it are the server's)."""
    if split.shape != "u_shape":
        raise ValueError("an early-exit draft needs the output layer on the client: a U-shaped split")
    if not 1 <= layers <= split.cut:
        raise ValueError(f"an early-exit draft runs 1 to {split.cut} of the client's first blocks, not {layers}")
    if not split.blocks:
        raise ValueError("this model's blocks are not in a block list: it cannot exit early")
    config = copy.deepcopy(model.config)
    for name in _LAYER_COUNTS:
        if hasattr(config, name):
            setattr(config, name, layers)
    if isinstance(getattr(config, "layer_types", None), list):  # one entry per block (attention kinds)
        config.layer_types = config.layer_types[:layers]
    draft = _shallow(model, config)
    # The split's own wrappers of forward (client_model.py) and generate (decode_stats.py) speak for
    # the server: the draft is the plain model class on fewer blocks.
    for attribute in ("forward", "_split_original_forward", "generate", "generation_metrics"):
        draft.__dict__.pop(attribute, None)
    draft.generation_config = copy.deepcopy(model.generation_config)
    parent, *path, last = [draft, *split.blocks.split(".")]
    for name in path:
        parent._modules[name] = child = _shallow(parent._modules[name], config)
        parent = child
    parent._modules[last] = nn.ModuleList(list(parent._modules[last])[:layers])
    return draft


def _shallow(module: nn.Module, config: object) -> nn.Module:
    """A new module object with ``module``'s submodules, parameters and buffers (shared), and its
    own list of children, so that replacing one of them leaves ``module`` as it was."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    if "config" in module.__dict__:
        new.config = config
    return new
