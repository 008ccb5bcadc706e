"""Memory backbones besides the Transformer-XL, and the registry the trainer builds them from.

Every backbone follows :class:`trxl_rl.memory.MemoryBackbone`: the same exact trainer runs
each of them, and the consistency invariant (the first minibatch of an update reproduces the
rollout) holds for all.

=========  =======================================  ===============================
name       backbone                                 config section (``model.<name>``)
=========  =======================================  ===============================
trxl       :class:`~trxl_rl.TransformerXL`           fields of :class:`~trxl_rl.TrXLConfig`
gtrxl      the same with GTrXL gating                ``model.trxl`` (``gating`` always on)
gru        :class:`RecurrentBackbone` (nn.GRU)      fields of :class:`RecurrentConfig`
lstm       :class:`RecurrentBackbone` (nn.LSTM)     fields of :class:`RecurrentConfig`
none       :class:`NoMemory` (the control)          none
=========  =======================================  ===============================

Shape legend: B rows, N tokens per row, I input size, H hidden size, layers = num_layers.

This module imports torch and the standard library only (and :mod:`trxl_rl.memory`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trxl_rl.memory import (
    MemoryBackbone,
    TransformerXL,
    TrXLConfig,
    _check_int,
    check_segment,
)


@dataclass
class RecurrentConfig:
    """Hyperparameters of :class:`RecurrentBackbone`.

    :param input_dim: size of the per-step input vector.
    :param hidden_size: width H of every recurrent layer (the output size).
    :param num_layers: stacked recurrent layers.
    :param cell: ``"gru"`` or ``"lstm"``.
    """

    input_dim: int
    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "gru"

    def __post_init__(self) -> None:
        for name in ("input_dim", "hidden_size", "num_layers"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {self.cell!r}")


class RecurrentBackbone(MemoryBackbone):
    """A GRU or LSTM (``torch.nn.GRU``/``nn.LSTM``) whose state is reset at episode starts.

    The state is one tensor ``[B, layers, H]`` (GRU) or ``[B, layers, 2H]`` (LSTM: h then c),
    so the rollout stores it whole after every step (the default :class:`MemoryBackbone`
    records). A segment is cut at every column where some row starts an episode; each piece
    runs as one ``nn.GRU`` call after the rows that start there are reset to zeros, so the
    segment computes exactly what N single steps do.
    """

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__()
        self.config = config
        cell = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = cell(config.input_dim, config.hidden_size, config.num_layers,
                        batch_first=True)
        self.output_dim = config.hidden_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None
                      ) -> Tensor:
        """Zeros ``[B, layers, H]`` (GRU) or ``[B, layers, 2H]`` (LSTM)."""
        _check_int("batch_size", batch_size, minimum=1)
        weight = self.rnn.weight_ih_l0
        width = self.config.hidden_size * (2 if self.config.cell == "lstm" else 1)
        return torch.zeros(batch_size, self.config.num_layers, width, dtype=weight.dtype,
                           device=weight.device if device is None else device)

    def _run(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, n, I]`` from ``state`` with no episode start after the first token."""
        h = state.transpose(0, 1).contiguous()  # [layers, B, H or 2H]
        if self.config.cell == "lstm":
            # cuDNN wants contiguous h and c.
            y, (h, c) = self.rnn(x, tuple(t.contiguous() for t in h.chunk(2, dim=-1)))
            h = torch.cat([h, c], dim=-1)
        else:
            y, h = self.rnn(x, h)
        return y, h.transpose(0, 1)

    def forward(self, x: Tensor, state: Tensor, episode_start: Tensor
                ) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, N, I]``, ``state`` ``[B, layers, H']``, ``episode_start`` ``[B, N]``
        -> ``(y [B, N, H], state after the segment)``."""
        check_segment(x, episode_start, self.config.input_dim)
        n = x.shape[1]
        # Columns where any row starts an episode (one host sync; none for N = 1).
        cuts = [0] if n == 1 else [0, *(episode_start[:, 1:].any(0).nonzero()[:, 0] + 1).tolist()]
        outputs = []
        for begin, end in zip(cuts, [*cuts[1:], n], strict=True):
            keep = ~episode_start[:, begin]
            state = state * keep[:, None, None].to(state.dtype)
            y, state = self._run(x[:, begin:end], state)
            outputs.append(y)
        return torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0], state


class NoMemory(MemoryBackbone):
    """No memory at all: the features are the encoder's (the control that shows whether a
    task needs memory). The state is an empty ``[B, 0]`` tensor; nothing is stored."""

    history_length = 0

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.output_dim = input_dim

    def initial_state(self, batch_size: int, device: torch.device | str | None = None
                      ) -> Tensor:
        _check_int("batch_size", batch_size, minimum=1)
        return torch.zeros(batch_size, 0, device=device)

    def forward(self, x: Tensor, state: Tensor, episode_start: Tensor
                ) -> tuple[Tensor, Tensor]:
        check_segment(x, episode_start, self.output_dim)
        return x, state

    def step_record(self, state: Tensor) -> dict[str, Tensor]:
        return {}

    def history(self, state: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return {}, torch.zeros(state.shape[0], 0, dtype=torch.bool, device=state.device)

    def state_from_history(self, records: dict[str, Tensor], valid: Tensor) -> Tensor:
        return torch.zeros(valid.shape[0], 0, device=valid.device)


# --- registry ---------------------------------------------------------------------------

BackboneFactory = Callable[..., MemoryBackbone]


def _fields(config_class: type, fields: dict, fixed: dict) -> dict:
    """Check ``fields`` against ``config_class`` (without ``input_dim`` and the ``fixed``
    ones), naming an unknown or fixed field."""
    known = {f.name for f in dataclasses.fields(config_class)} - {"input_dim", *fixed}
    for name in fields:
        if name == "input_dim":
            raise ValueError("input_dim is fixed: it is the encoder's output size")
        if name in fixed:
            raise ValueError(f"{name} is fixed to {fixed[name]!r} for this backbone")
        if name not in known:
            raise ValueError(f"unknown field {name!r}; known fields: {', '.join(sorted(known))}")
    return {**fields, **fixed}


def _trxl(gating: bool | None) -> BackboneFactory:
    fixed = {} if gating is None else {"gating": gating}

    def build(input_dim: int, /, **fields) -> MemoryBackbone:
        return TransformerXL(TrXLConfig(input_dim=input_dim, **_fields(TrXLConfig, fields, fixed)))
    return build


def _recurrent(cell: str) -> BackboneFactory:
    def build(input_dim: int, /, **fields) -> MemoryBackbone:
        fields = _fields(RecurrentConfig, fields, {"cell": cell})
        return RecurrentBackbone(RecurrentConfig(input_dim=input_dim, **fields))
    return build


def _none(input_dim: int, /, **fields) -> MemoryBackbone:
    if fields:
        raise ValueError(f"backbone 'none' takes no fields, got {', '.join(sorted(fields))}")
    return NoMemory(input_dim)


BACKBONES: dict[str, BackboneFactory] = {
    "trxl": _trxl(None),
    "gtrxl": _trxl(True),
    "gru": _recurrent("gru"),
    "lstm": _recurrent("lstm"),
    "none": _none,
}


def register_backbone(name: str, factory: BackboneFactory) -> None:
    """Make ``factory(input_dim, **fields) -> MemoryBackbone`` available as
    ``model.backbone: name``; its fields come from the config section ``model.custom``.
    Register it again before loading a checkpoint trained with it."""
    if name in ("trxl", "gtrxl", "gru", "lstm", "none"):
        raise ValueError(f"backbone name {name!r} is built in; choose another name")
    BACKBONES[name] = factory


def make_backbone(name: str, input_dim: int, fields: dict) -> MemoryBackbone:
    """Build backbone ``name`` for inputs of size ``input_dim`` from its config fields.

    :raises ValueError: an unknown backbone, or a field it does not know or accept.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} "
                         "(or register your own with trxl_rl.backbones.register_backbone)")
    return BACKBONES[name](input_dim, **fields)
