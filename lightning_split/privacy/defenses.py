"""Defenses on the client's send path: what crosses the cut, made to reveal less.

Turned on with ``SplitStrategy(privacy=Defenses(...))`` (or a dict of the same keys, or the Hydra key
``client.privacy``), or ``open_split(..., privacy=Defenses(...))``. Everything runs on the client,
before a tensor leaves it, through the runner's ``send_hooks`` and ``gradient_hooks``
(``split/remote.py``); the server is unchanged and cannot tell.

* ``clip`` and ``noise`` (activations): each token's activation vector (the last dimension of the
  hidden state at the cut; a row for a non-sequence model) is clipped to norm ``clip`` and Gaussian
  noise of standard deviation ``noise x clip`` per coordinate is added: the Gaussian mechanism's
  shape, a bounded contribution and noise in proportion to the bound. ``clip="auto"``: the median
  token norm of the first batch sent, kept from then on, so that one ``noise`` means the same at any
  cut depth. The noise's standard deviation is ``noise_std`` (logged as ``privacy/noise_std``).
* ``nopeek`` (a penalty in the client's loss): ``nopeek x`` the distance correlation between the
  client's inputs (token embeddings for a Hugging Face model, else the input tensor) and the
  activations it sends (NoPeek, Vepakomma et al. 2020). Under SplitStrategy it is added to the loss
  ``training_step`` returns (the logged task loss stays the task's); with ``open_split`` add
  ``defenses.penalty()`` to your loss yourself.
* ``label_noise`` (gradients the client sends back): where the loss is on the client and the server
  gets the gradient of its output (a U-shape, or a two-part split that asks for logits and computes
  the loss itself), those per-example gradients reveal the labels (the norm and direction attacks,
  Li et al. 2022). In Marvell's spirit (Li et al.), zero-mean Gaussian noise goes where it hides the
  labels best: along the batch's top ``label_directions`` principal directions of the per-example
  gradients (for two classes, the direction between the classes' mean gradients) with standard
  deviation ``label_noise x`` the batch's RMS gradient norm, and each example then gets isotropic
  noise up to the batch's largest norm (the norm attack's signal). Zero-mean: the expected
  gradient, and so what training converges to, is unchanged; the variance is the cost.
  A two-part split given ``labels`` sends them to the server in the clear with every FORWARD: no
  noise helps there; keep them on the client with ``SplitSpec(shape="u_shape")`` (docs/privacy.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


def clip_tokens(hidden: torch.Tensor, clip: float) -> torch.Tensor:
    """Each vector along the last dimension scaled down to norm ``clip`` at most (differentiable)."""
    norms = hidden.norm(dim=-1, keepdim=True)
    return hidden * (clip / norms.clamp_min(clip)).to(hidden.dtype)


def distance_correlation(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Sample distance correlation of paired rows ``x`` (n, p) and ``z`` (n, q), in [0, 1]
    (Székely et al. 2007): 0 iff independent (as n grows), 1 for a similarity transform.

    Distances from Gram matrices, not ``cdist``: its gradient is NaN where two rows coincide; the
    diagonal is masked so that sqrt's infinite slope at 0 never reaches autograd.
    """
    def centred(m: torch.Tensor) -> torch.Tensor:
        m = m.float()
        sq = (m * m).sum(-1)
        d2 = (sq[:, None] + sq[None, :] - 2 * m @ m.T).clamp_min(0)
        off = 1 - torch.eye(len(m), device=m.device, dtype=m.dtype)
        d = (d2 + eps).sqrt() * off
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x.reshape(len(x), -1)), centred(z.reshape(len(z), -1))
    xy, xx, yy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (xy.clamp_min(0) / (xx * yy).sqrt().clamp_min(eps)).sqrt()


def paired_rows(inputs: torch.Tensor, hidden: torch.Tensor, limit: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching rows of an input and an activation for a distance correlation: one per token of a
    sequence model ((B, T, d) both: the attacker decodes token by token), one per example otherwise;
    at most ``limit`` of them, drawn at random (the statistic costs n^2)."""
    if inputs.dim() == 3 and hidden.dim() == 3 and inputs.shape[:2] == hidden.shape[:2]:
        inputs, hidden = inputs.reshape(-1, inputs.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
    else:
        inputs, hidden = inputs.reshape(len(inputs), -1), hidden.reshape(len(hidden), -1)
    if len(hidden) > limit:
        pick = torch.randperm(len(hidden), generator=generator)[:limit].to(hidden.device)
        inputs, hidden = inputs[pick.to(inputs.device)], hidden[pick]
    return inputs.to(hidden.device), hidden


def protect_labels(grads: torch.Tensor, strength: float, directions: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example gradients ``grads`` (batch first) with Marvell-style noise (module docstring)."""
    n = grads.shape[0] if grads.dim() else 0
    if n < 2 or strength <= 0:
        return grads
    g = grads.reshape(n, -1).float()
    rms = g.norm(dim=1).pow(2).mean().sqrt()
    k = max(1, min(directions, n - 1))
    # The directions in which the examples differ most: for two classes, the one between them.
    _, _, vh = torch.linalg.svd(g - g.mean(0, keepdim=True), full_matrices=False)
    z = torch.randn(n, k, generator=generator, device=g.device)  # a generator of g's device, if any
    noisy = g + strength * rms * z @ vh[:k]
    # Norms equalised up to the batch's largest by isotropic noise (Li et al.'s max-norm defense):
    # the norm attack ranks examples by a norm that no longer depends on the label.
    target = g.norm(dim=1).max()
    room = (target.pow(2) - noisy.norm(dim=1).pow(2)).clamp_min(0).sqrt()
    iso = torch.randn(noisy.shape, generator=generator, device=g.device)
    noisy = noisy + iso * (room / max(1, g.shape[1]) ** 0.5)[:, None]
    return noisy.reshape(grads.shape).to(grads.dtype)


@dataclass
class Defenses:
    """The client's privacy defenses (module docstring); all off by default.

    Args:
        clip: per-token norm bound of the activations sent; ``"auto"``: the first batch's median
            token norm. Needed by ``noise``; alone, it only bounds each token's contribution.
        noise: Gaussian noise multiplier: standard deviation ``noise x clip`` per coordinate.
        nopeek: weight of the distance-correlation penalty in the client's training loss.
        nopeek_rows: tokens (or examples) drawn per step for the penalty, which costs rows^2.
        label_noise: strength of the label protection on gradients the client sends (0: off).
        label_directions: how many principal directions of a batch's gradients get the noise.
        seed: seed of the noise generator (None: torch's global generator).
    """

    clip: float | str | None = None
    noise: float = 0.0
    nopeek: float = 0.0
    nopeek_rows: int = 256
    label_noise: float = 0.0
    label_directions: int = 1
    seed: int | None = None
    # ``clip`` once "auto" is resolved, and the state of a run: none of it is configuration.
    clip_value: float | None = field(default=None, init=False, compare=False)
    _captured: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _generators: dict[str, torch.Generator] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.noise and self.clip is None:
            raise ValueError("noise needs a clip (a per-token norm bound, or 'auto'): the noise is relative to it")
        if self.clip is not None and self.clip != "auto" and not float(self.clip) > 0:
            raise ValueError(f"clip must be 'auto' or a positive norm, not {self.clip!r}")
        if min(self.noise, self.nopeek, self.label_noise) < 0:
            raise ValueError("noise, nopeek and label_noise must be >= 0")
        if self.clip not in (None, "auto"):
            self.clip_value = float(self.clip)

    @classmethod
    def from_config(cls, config: Defenses | dict[str, Any] | None) -> Defenses | None:
        """A Defenses from itself, a dict of its arguments (Hydra's ``client.privacy``), or None."""
        if config is None or isinstance(config, Defenses):
            return config
        return cls(**dict(config))

    @property
    def active(self) -> bool:
        return bool(self.clip is not None or self.nopeek or self.label_noise)

    @property
    def noise_std(self) -> float | None:
        """Standard deviation of the noise added to each activation coordinate (None before "auto" is resolved)."""
        if self.clip_value is None:
            return None
        return self.noise * self.clip_value

    def describe(self) -> dict[str, Any]:
        """The settings and what they resolved to, for reports."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["noise_std"] = self.noise_std
        return out

    # -- wiring ---------------------------------------------------------------------------------

    def attach(self, split: Any) -> None:
        """Put the defenses on a connected split (``SplitModel``): first on the runner's hooks, so
        that anything after them (a report's tap) sees what the server receives."""
        runner = split.runner
        if self.clip is not None or self.nopeek:
            runner.send_hooks.insert(0, self.on_send)
        if self.label_noise:
            runner.gradient_hooks.insert(0, self.on_gradients)
        if self.nopeek:
            self._capture_inputs(split.model)

    def _capture_inputs(self, model: torch.nn.Module) -> None:
        """Keep the last forward's inputs: the embeddings' output, else an ``inputs_embeds`` or
        first float argument of the model itself."""
        def root(_module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            given = kwargs.get("inputs_embeds")
            if given is None:
                given = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
            self._captured.pop("inputs", None)
            if isinstance(given, torch.Tensor):
                self._captured["inputs"] = given.detach()

        model.register_forward_pre_hook(root, with_kwargs=True)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(embeddings, torch.nn.Module):
            # Detached: the penalty shapes what the client sends, not the input it compares with.
            embeddings.register_forward_hook(lambda _m, _a, out: self._captured.__setitem__("inputs", out.detach()))

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    # -- the hooks ------------------------------------------------------------------------------

    def on_send(self, hidden: torch.Tensor) -> torch.Tensor:
        """The activations as they will leave: remembered for the penalty, clipped, noised."""
        if self.nopeek and torch.is_grad_enabled():
            self._captured["hidden"] = hidden
        if self.clip is None:
            return hidden
        if self.clip_value is None:  # "auto": from the first batch, then fixed
            self.clip_value = float(hidden.detach().float().norm(dim=-1).median())
        out = clip_tokens(hidden, self.clip_value)
        if self.noise:
            std = self.noise * self.clip_value
            noise = torch.randn(out.shape, generator=self._generator(out.device), device=out.device, dtype=out.dtype)
            out = out + std * noise
        return out

    def on_gradients(self, grad: torch.Tensor) -> torch.Tensor:
        generator = self._generator(grad.device)
        return protect_labels(grad, self.label_noise, self.label_directions, generator)

    # -- the penalty ----------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor | None:
        """``nopeek x`` dCor(inputs, activations) of the last forward, for the client's loss (None
        if nothing was captured); forgets the forward."""
        inputs, hidden = self._captured.pop("inputs", None), self._captured.pop("hidden", None)
        if not self.nopeek or inputs is None or hidden is None:
            return None
        x, z = paired_rows(inputs, hidden, self.nopeek_rows, self._generator(torch.device("cpu")))
        return self.nopeek * distance_correlation(x, z)

    def add_penalty(self, output: Any, module: Any = None) -> Any:
        """``training_step``'s output with the penalty added to its loss; logs the penalty's
        distance correlation and the noise's scale on ``module`` (a LightningModule)."""
        if module is not None and self.noise_std is not None and self.noise:
            module.log("privacy/noise_std", self.noise_std, on_step=True, on_epoch=False)
        extra = self.penalty()
        if extra is None:
            return output
        if module is not None:
            module.log("privacy/dcor", extra.detach() / self.nopeek, prog_bar=True, on_step=True, on_epoch=False)
        if isinstance(output, torch.Tensor):
            return output + extra.to(output.device)
        if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
            return {**output, "loss": output["loss"] + extra.to(output["loss"].device)}
        return output  # manual optimisation: the module backpropagates itself (add penalty() there)
