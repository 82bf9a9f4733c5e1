"""Public data a server could own, for ``PrivacyReport(public=...)`` from a Hydra config.

The attacker the report trains is the server's: it learns to invert activations from data the
server could hold itself, never the client's. These give such data without a download, in the
example models' input formats::

    lightning-split train model=gpt2_tiny '+trainer.callbacks=[{_target_: lightning_split.privacy.PrivacyReport,
        public: {_target_: lightning_split.privacy.public.python_docs, seq_len: 64}}]'
"""

from __future__ import annotations

import torch


def python_docs(seq_len: int = 64, rows: int = 512, vocab_size: int = 256) -> torch.Tensor:
    """(rows, seq_len) token ids: the last windows of the Python documentation's topic pages, which
    ship with every CPython (``pydoc_data.topics``), as bytes; a byte outside ``vocab_size`` becomes
    ``?`` (the example GPT-2 configs' vocabularies)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics)).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    data[data >= vocab_size] = ord("?") if ord("?") < vocab_size else 0
    windows = data[: len(data) // seq_len * seq_len].view(-1, seq_len)
    return windows[-rows:]  # the end of the text: a client training on its start never saw these


def digits(rows: int = 297) -> torch.Tensor:
    """(rows, 64) inputs: scikit-learn's bundled digits, the rows after the 1500 that the example's
    digits loaders train on (``examples.modules.digits_loaders``), scaled to [0, 1] the same way."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data[1500 : 1500 + rows], dtype=torch.float32) / 16.0
