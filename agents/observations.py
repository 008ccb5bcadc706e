"""Observations as tensors: a batch is one tensor, or a (nested) dict of tensors for ``Dict``
spaces, with the batch dimensions first and the space's own dtype."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

Obs = Tensor | dict[str, Tensor]


def tree_map(fn: Callable[[Tensor], Tensor], obs: Obs) -> Obs:
    """Apply ``fn`` to an observation tensor or to every tensor of a (nested) dict of them."""
    if isinstance(obs, dict):
        return {key: tree_map(fn, value) for key, value in obs.items()}
    return fn(obs)


def obs_to_tensor(obs, device: torch.device) -> Obs:
    """Batched numpy observation (array or dict of arrays) -> tensors on ``device``."""
    if isinstance(obs, dict):
        return {key: obs_to_tensor(value, device) for key, value in obs.items()}
    return torch.as_tensor(np.asarray(obs), device=device)
