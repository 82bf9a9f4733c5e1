"""Privacy: what a split run's activations and gradients reveal, measured; and defenses against it.

* ``Defenses`` (``defenses.py``): noise on the activations the client sends, a decorrelation
  penalty in its loss, label protection on the gradients it sends back; turned on with
  ``SplitStrategy(privacy=...)``, ``open_split(privacy=...)`` or Hydra's ``client.privacy``.
* ``PrivacyReport`` (``report.py``): a Lightning callback that trains an inversion attacker the way
  the server could and scores it, with the label-leakage attacks, at the end of ``fit``
  (``attacks.py``; outputs in ``publish.py``).

A layer above ``split/`` (which takes the defenses duck-typed, through the runner's send hooks) and
below the strategy, which imports ``Defenses``; the wire, the channel and the server runtime never
import it: everything here runs on the client.
"""

from lightning_split.privacy.defenses import Defenses, distance_correlation
from lightning_split.privacy.report import PrivacyReport

__all__ = ["Defenses", "PrivacyReport", "distance_correlation"]
