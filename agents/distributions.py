"""Action heads and action distributions, chosen from the action space.

``make_action_head(space, in_dim)`` returns an :class:`ActionHead`, an ``nn.Module`` mapping
features ``[B, in_dim]`` to an :class:`ActionDistribution` that offers ``sample()``,
``mode()``, ``log_prob(actions) -> [B]`` and ``entropy() -> [B]``. Actions are in the
environment's own values (``Discrete(n, start)`` samples lie in ``start .. start + n - 1``).

=================  ==============================  ===============  ===================
space              head                            actions          storage
=================  ==============================  ===============  ===================
``Discrete(n)``    :class:`CategoricalHead`        ``[B]``          ``()``, int64
``MultiDiscrete``  :class:`MultiCategoricalHead`   ``[B, D]``       ``(D,)``, int64
``Box``            :class:`GaussianHead`           ``[B, *shape]``  ``shape``, float32
=================  ==============================  ===============  ===================

Adding a space means one new :class:`ActionHead` subclass (with its
``action_shape``/``action_dtype``) and one entry in ``_HEADS``; callers,
``make_action_head``, ``action_shape`` and ``action_dtype`` stay as they are.

``Box`` actions are *not* bounded by the head: samples of the Gaussian are stored and
learned from as drawn, and only the copy sent to the environment is clipped to the space's
bounds (:class:`trxl_rl.envs.wrappers.ClipBoxAction`, applied by ``make_env``), as in
CleanRL's continuous PPO. Clipping inside the head would make ``log_prob`` of the clipped
action wrong (the bounds carry probability mass, not density).

Sampling is Gumbel-max written as an exponential race, ``argmax(p / E)`` with
``E ~ Exp(1)``, on ``log_softmax`` computed once: measured on CPU (torch 2.13, one thread,
B=16, 3 actions, sample + log_prob + entropy from given logits) about 20 us per call against
31 us for ``torch.multinomial`` and 86 us for
``torch.distributions.Categorical(validate_args=False)`` (130 us with validation).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor, nn

# Floor for the exponential noise, so that a zero-probability choice never wins by 0 / 0.
_TINY = 1e-30
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ActionDistribution(ABC):
    """A batch of action distributions, one per row of the features that made it."""

    @abstractmethod
    def sample(self) -> Tensor:
        """A random action per row: ``[B, *action_shape]``."""

    @abstractmethod
    def mode(self) -> Tensor:
        """The most likely action per row (greedy evaluation): ``[B, *action_shape]``."""

    @abstractmethod
    def log_prob(self, actions: Tensor) -> Tensor:
        """``[B, *action_shape]`` -> log-probability of the whole action ``[B]``."""

    @abstractmethod
    def entropy(self) -> Tensor:
        """Entropy of the whole action per row: ``[B]``."""


class CategoricalDistribution(ActionDistribution):
    """Independent categoricals over the last axis of ``logits [B, *dims, n]``.

    Actions are ``[B, *dims]`` int64; ``log_prob`` and ``entropy`` sum over ``dims`` (a single
    ``Discrete`` action has ``dims = ()``). Action values outside the support are not
    checked (this runs every environment step).

    :param logits: unnormalised log-probabilities ``[B, *dims, n]``.
    :param start: lowest action value, a number or a tensor broadcastable to ``[*dims]``;
        ``None`` for 0.
    """

    def __init__(self, logits: Tensor, start: Tensor | int | None = None) -> None:
        self.log_probs = F.log_softmax(logits, dim=-1)  # (B, *dims, n)
        self.probs = self.log_probs.exp()
        self.start = start
        self.sum_dims = tuple(range(1, logits.dim() - 1))

    def _to_actions(self, index: Tensor) -> Tensor:
        return index if self.start is None else index + self.start

    def _reduce(self, per_dim: Tensor) -> Tensor:
        # (B, *dims) -> (B,)
        return per_dim.sum(self.sum_dims) if self.sum_dims else per_dim

    def sample(self) -> Tensor:
        # Gumbel-max trick: argmax(log p - log E) = argmax(p / E) with E ~ Exp(1).
        noise = torch.empty_like(self.probs).exponential_().clamp_min_(_TINY)
        return self._to_actions((self.probs / noise).argmax(dim=-1))

    def mode(self) -> Tensor:
        return self._to_actions(self.log_probs.argmax(dim=-1))

    def log_prob(self, actions: Tensor) -> Tensor:
        index = actions.long() if self.start is None else actions.long() - self.start
        # (B, *dims, n) -> (B, *dims)
        per_dim = self.log_probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return self._reduce(per_dim)

    def entropy(self) -> Tensor:
        return self._reduce(-(self.probs * self.log_probs).sum(dim=-1))


class ActionHead(nn.Module, ABC):
    """Features ``[B, in_dim]`` -> :class:`ActionDistribution` for one kind of action space.

    ``continuous``: its actions are real numbers (a density, not a probability per action).
    """

    continuous: ClassVar[bool] = False

    @staticmethod
    @abstractmethod
    def action_shape(space: spaces.Space) -> tuple[int, ...]:
        """Shape of one action (without the batch dimension)."""

    @staticmethod
    @abstractmethod
    def action_dtype(space: spaces.Space) -> torch.dtype:
        """Torch dtype of the actions ``sample()`` returns."""

    @abstractmethod
    def forward(self, features: Tensor) -> ActionDistribution:
        """:param features: ``[B, in_dim]``."""


def _logits_layer(in_dim: int, num_logits: int) -> nn.Linear:
    """Final layer with orthogonal gain 0.01: a near-uniform initial policy, or a Gaussian's
    near-zero initial mean (usual in PPO)."""
    layer = nn.Linear(in_dim, num_logits)
    nn.init.orthogonal_(layer.weight, 0.01)
    nn.init.zeros_(layer.bias)
    return layer


class CategoricalHead(ActionHead):
    """``Discrete(n, start)``: one categorical over ``n`` logits; actions int64 ``[B]``."""

    def __init__(self, space: spaces.Discrete, in_dim: int) -> None:
        super().__init__()
        self.logits = _logits_layer(in_dim, int(space.n))
        self.start = int(space.start) or None

    @staticmethod
    def action_shape(space: spaces.Discrete) -> tuple[int, ...]:
        return ()

    @staticmethod
    def action_dtype(space: spaces.Discrete) -> torch.dtype:
        return torch.int64

    def forward(self, features: Tensor) -> CategoricalDistribution:
        return CategoricalDistribution(self.logits(features), self.start)


def _check_flat_nvec(space: spaces.MultiDiscrete) -> None:
    if space.nvec.ndim != 1:
        raise ValueError(f"unsupported action space {space}: MultiDiscrete needs a 1-D nvec")


class MultiCategoricalHead(ActionHead):
    """``MultiDiscrete(nvec)`` with ``nvec`` of shape ``(D,)``: independent categoricals.

    One Linear produces ``sum(nvec)`` logits; they are laid out as ``[B, D, max(nvec)]``
    (padding the shorter dimensions with probability-0 slots) so that all dimensions are
    sampled in one vectorised call. Actions are int64 ``[B, D]``; ``log_prob`` and
    ``entropy`` are summed over the ``D`` dimensions.
    """

    pad_index: Tensor | None
    start: Tensor | None

    def __init__(self, space: spaces.MultiDiscrete, in_dim: int) -> None:
        super().__init__()
        _check_flat_nvec(space)
        nvec = [int(n) for n in space.nvec]
        self.num_dims, self.width = len(nvec), max(nvec)
        self.logits = _logits_layer(in_dim, sum(nvec))
        pad_index = None
        if min(nvec) != self.width:
            # Slot j of dimension d reads flat logit offset_d + j, or the pad column
            # (index sum(nvec)) where j >= nvec[d]: (D * max(nvec),)
            offsets = np.cumsum([0, *nvec[:-1]])
            pad_index = torch.tensor([
                offset + j if j < n else sum(nvec)
                for offset, n in zip(offsets, nvec, strict=True)
                for j in range(self.width)
            ])
        self.register_buffer("pad_index", pad_index, persistent=False)
        start = torch.as_tensor(np.asarray(space.start), dtype=torch.int64)  # (D,)
        self.register_buffer("start", start if bool(start.any()) else None, persistent=False)

    @staticmethod
    def action_shape(space: spaces.MultiDiscrete) -> tuple[int, ...]:
        _check_flat_nvec(space)
        return tuple(space.nvec.shape)

    @staticmethod
    def action_dtype(space: spaces.MultiDiscrete) -> torch.dtype:
        return torch.int64

    def forward(self, features: Tensor) -> CategoricalDistribution:
        flat = self.logits(features)  # (B, sum(nvec))
        if self.pad_index is not None:
            # Finite, not -inf: probability 0 times its log-probability must be 0, not nan.
            pad = flat.new_full((flat.shape[0], 1), torch.finfo(flat.dtype).min)
            flat = torch.cat([flat, pad], dim=-1)[:, self.pad_index]  # (B, D * max(nvec))
        logits = flat.view(-1, self.num_dims, self.width)  # (B, D, max(nvec))
        return CategoricalDistribution(logits, self.start)


class GaussianDistribution(ActionDistribution):
    """Independent normals ``N(mean, std)``, one per action dimension.

    Written out instead of ``torch.distributions.Normal`` (no argument validation, no
    broadcasting objects: this runs every environment step); the formulas are Normal's.

    :param mean: ``[B, *shape]``.
    :param log_std: ``[*shape]`` (state-independent) or ``[B, *shape]``.
    """

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        self.mean = mean
        self.log_std = log_std.expand_as(mean)
        self.sum_dims = tuple(range(1, mean.dim()))

    def _reduce(self, per_dim: Tensor) -> Tensor:
        # (B, *shape) -> (B,)
        return per_dim.sum(self.sum_dims) if self.sum_dims else per_dim

    @torch.no_grad()
    def sample(self) -> Tensor:
        # Not reparameterised (as torch's Normal.sample): PPO needs no gradient through it.
        return self.mean + self.log_std.exp() * torch.randn_like(self.mean)

    def mode(self) -> Tensor:
        return self.mean

    def log_prob(self, actions: Tensor) -> Tensor:
        z = (actions - self.mean) * torch.exp(-self.log_std)
        return self._reduce(-0.5 * z.square() - self.log_std - _HALF_LOG_2PI)

    def entropy(self) -> Tensor:
        return self._reduce(self.log_std + 0.5 + _HALF_LOG_2PI)


class GaussianHead(ActionHead):
    """``Box`` actions: a diagonal Gaussian with a state-independent learned log-std.

    As in CleanRL's continuous PPO: the mean is a linear map of the features (orthogonal
    init with gain 0.01, so the initial mean is ~0), the log-std one parameter per action
    dimension, initialised at 0 (std 1). Actions are float32 ``[B, *shape]``; ``log_prob``
    and ``entropy`` sum over the action dimensions. The space's bounds are not applied here
    (see the module docstring).
    """

    continuous = True

    def __init__(self, space: spaces.Box, in_dim: int) -> None:
        super().__init__()
        self.shape = tuple(space.shape)
        self.mean = _logits_layer(in_dim, math.prod(self.shape))
        self.log_std = nn.Parameter(torch.zeros(self.shape))

    @staticmethod
    def action_shape(space: spaces.Box) -> tuple[int, ...]:
        return tuple(space.shape)

    @staticmethod
    def action_dtype(space: spaces.Box) -> torch.dtype:
        return torch.float32

    def forward(self, features: Tensor) -> GaussianDistribution:
        mean = self.mean(features).view(-1, *self.shape)  # (B, *shape)
        return GaussianDistribution(mean, self.log_std)


_HEADS: tuple[tuple[type[spaces.Space], type[ActionHead]], ...] = (
    (spaces.Discrete, CategoricalHead),
    (spaces.MultiDiscrete, MultiCategoricalHead),
    (spaces.Box, GaussianHead),
)


def _head_class(space: spaces.Space) -> type[ActionHead]:
    for space_type, head in _HEADS:
        if isinstance(space, space_type):
            return head
    raise ValueError(
        f"unsupported action space {space}: supported are Discrete, MultiDiscrete and Box"
    )


def make_action_head(space: spaces.Space, in_dim: int) -> ActionHead:
    """The action head for an action space.

    :param space: the (single-environment) action space.
    :param in_dim: size of the features the head reads.
    :raises ValueError: for an unsupported space (``MultiBinary``, ``Tuple``, ...).
    """
    return _head_class(space)(space, in_dim)


def action_shape(space: spaces.Space) -> tuple[int, ...]:
    """Shape of one action of ``space`` (``Discrete``: ``()``, ``MultiDiscrete``: ``(D,)``,
    ``Box``: its shape)."""
    return _head_class(space).action_shape(space)


def action_dtype(space: spaces.Space) -> torch.dtype:
    """Torch dtype to store actions of ``space`` in (int64 for the discrete spaces, float32
    for ``Box``)."""
    return _head_class(space).action_dtype(space)


def continuous_actions(space: spaces.Space) -> bool:
    """Whether ``space``'s actions are real numbers (``Box``: a Gaussian head)."""
    return _head_class(space).continuous
