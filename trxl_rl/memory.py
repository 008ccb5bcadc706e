"""Transformer-XL memory encoder (Dai et al. 2019) for agents that act one step at a time.

Every token (one environment step), in every layer, attends to a sliding window: itself and
its M predecessors of the same episode. The window does not depend on how the stream is cut
into segments, so the rollout (``step``, N = 1) and the update (segments of N tokens) compute
the same function. With L layers the receptive field is L x M tokens.

The memory (:class:`MemoryState`) holds, per row and per layer, the *input* hidden state of
that layer for the last M tokens. It is read-only for gradients (stop-gradient) but projected
with the current weights. During inference the projected keys/values of the memory are cached
in the state, so one ``step`` costs O(M) and not O(M * dim^2); the cache is tagged with the
weights that made it and rebuilt from the stored hidden states when the weights change.

:class:`TransformerXL` is one :class:`MemoryBackbone`, the interface every memory of the
trainer follows (the GRU, LSTM and no-memory backbones are in :mod:`trxl_rl.backbones`).

Shape legend: B rows (environments), N tokens in a segment, M memory length, L layers,
D model dim, H heads, Dh = D / H head dim.

This module imports torch and the standard library only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITIONAL_ENCODINGS = ("relative", "absolute", "learned", "none")
NORMS = ("pre", "post")
_instances = itertools.count()


class MemoryBackbone(nn.Module):
    """The interface of a memory that the trainer runs: a state per row (environment) that
    carries the past from call to call and is reset at episode starts.

    Shapes: B rows, N tokens per row in a segment, I = input size, O = :attr:`output_dim`,
    K = :attr:`history_length`, C rows of a training minibatch.

    - :meth:`initial_state` ``(B)``: the state before any token.
    - :meth:`forward` ``(x [B, N, I], state, episode_start [B, N] bool)`` ->
      ``(y [B, N, O], state after the segment)``. Where ``episode_start`` is True the token
      starts a new episode: nothing before it may influence it or any later token.
    - :meth:`step` ``(x [B, I], state, episode_start [B])`` -> ``(y [B, O], state)``: the
      same function as :meth:`forward` with N = 1 (the rollout acts one step at a time).
    - The state supports ``state[rows]`` (any index valid for dimension 0).

    What the rollout stores so that the state before any (env, segment) chunk can be rebuilt
    exactly, with no gradient flowing into it:

    - :meth:`step_record` ``(state)``: a dict of tensors ``[B, ...]`` that the step which made
      ``state`` leaves (stored for every step of a rollout);
    - :meth:`history` ``(state)``: the K newest records a state holds, oldest first
      (``{name: [B, K, ...]}``) and which are valid (``[B, K]`` bool); stored before each
      rollout and in checkpoints;
    - :meth:`state_from_history` ``(records {name: [C, K, ...]}, valid [C, K])``: the state
      after those K steps. ``valid`` is False for slots of another episode than the last
      step's, or empty slots before the first step.

    The defaults below fit a state that is one tensor ``[B, ...]``, complete in itself, like a
    recurrent network's hidden state: the record of a step is the state after it (K = 1).
    A subclass with such a state implements ``output_dim``, :meth:`initial_state` and
    :meth:`forward` only.
    """

    output_dim: int
    history_length: int = 1

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        raise NotImplementedError

    def forward(self, x: Tensor, state: Any, episode_start: Tensor) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def step(self, x: Tensor, state: Any, episode_start: Tensor) -> tuple[Tensor, Any]:
        """One token per row: ``x`` ``[B, I]``, ``episode_start`` ``[B]`` -> ``([B, O], state)``."""
        y, state = self(x[:, None], state, episode_start[:, None])
        return y[:, 0], state

    def step_record(self, state: Tensor) -> dict[str, Tensor]:
        return {"state": state}

    def history(self, state: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        valid = torch.ones(state.shape[0], 1, dtype=torch.bool, device=state.device)
        return {"state": state[:, None]}, valid

    def state_from_history(self, records: dict[str, Tensor], valid: Tensor) -> Tensor:
        # A state from another episode is never read: forward resets it at the episode start.
        return records["state"][:, -1]

    def diagnostics(self, x: Tensor, state: Any, episode_start: Tensor) -> dict[str, float]:
        """Named scalars that say how the memory behaves on a segment (the arguments of
        :meth:`forward`; no gradient), logged by the trainer once per update as
        ``diagnostics/<name>``. The default has none."""
        return {}

    def weights_changed(self) -> None:
        """Tell the backbone its weights changed in a way autograd's version counters do not
        see (fused optimizers, edits through ``p.data``); backbones that cache anything
        computed from the weights drop those caches. The default has none."""


def parameter_versions(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """``(data_ptr, version counter)`` of every parameter of ``module``: changes when a
    parameter is replaced or modified in place through autograd-visible ops, the part of a
    cache tag that needs no telling (fused optimizers and ``p.data`` edits do not count)."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


@dataclass
class TrXLConfig:
    """Hyperparameters of :class:`TransformerXL`.

    :param input_dim: size of the per-step input vector.
    :param dim: model width D; must be divisible by ``num_heads``.
    :param num_layers: number of Transformer-XL blocks L.
    :param num_heads: attention heads H, each with its own Dh = D / H projections.
    :param memory_length: M, how many past tokens of the same episode each token sees per layer
        (0 = no memory: every token sees only itself).
    :param positional_encoding: ``"relative"`` (Transformer-XL: sinusoid of the query-key
        distance, projected by a learned matrix, with global biases u and v), ``"absolute"``
        (sinusoid of the step index within the episode, added to the input), ``"learned"``
        (a learned table over distances 0..M used in place of the sinusoid), or ``"none"``.
    :param gating: GTrXL GRU-type gates instead of residual additions (Parisotto et al. 2019).
    :param norm: ``"pre"`` (identity-map reordering, LayerNorm before each sublayer, plus a final
        LayerNorm) or ``"post"`` (LayerNorm after each residual addition).
    :param ff_dim: hidden width of the position-wise feed-forward block (default 4 * dim).
    :param gate_bias: initial bias b_g of the update gate; large values start each gated block
        near the identity map.
    """

    input_dim: int
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    memory_length: int = 64
    positional_encoding: str = "relative"
    gating: bool = False
    norm: str = "pre"
    ff_dim: int | None = None
    gate_bias: float = 2.0

    def __post_init__(self) -> None:
        for name in ("input_dim", "dim", "num_layers", "num_heads"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("memory_length", self.memory_length, minimum=0)
        if self.ff_dim is not None:
            _check_int("ff_dim", self.ff_dim, minimum=1)
        if self.dim % self.num_heads:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.positional_encoding not in POSITIONAL_ENCODINGS:
            raise ValueError(
                f"positional_encoding must be one of {POSITIONAL_ENCODINGS}, "
                f"got {self.positional_encoding!r}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not isinstance(self.gating, bool):
            raise ValueError(f"gating must be a bool, got {self.gating!r}")


def check_segment(x: Tensor, episode_start: Tensor, input_dim: int) -> None:
    """:raises ValueError: ``x`` is not ``[B, N, input_dim]`` or ``episode_start`` not a bool
    ``[B, N]`` (the segment arguments of every :class:`MemoryBackbone`)."""
    if x.dim() != 3 or x.shape[-1] != input_dim:
        raise ValueError(f"x must have shape [B, N, {input_dim}], got {tuple(x.shape)}")
    if episode_start.shape != x.shape[:2] or episode_start.dtype != torch.bool:
        raise ValueError(f"episode_start must be a bool tensor of shape {tuple(x.shape[:2])}, "
                         f"got {episode_start.dtype} {tuple(episode_start.shape)}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class MemoryState:
    """Per-row Transformer-XL memory.

    :param hidden: ``[B, L, M, D]`` input hidden state of every layer for the last M tokens,
        oldest first (may be stored in a lower precision than the model, e.g. bfloat16).
    :param valid: ``[B, M]`` bool, True where the slot holds a token of the current episode.
    :param position: ``[B]`` int64, index within its episode of the row's next token.
    :param keys: inference cache, one ``[B, H, M, Dh]`` tensor per layer, or None.
    :param values: like ``keys``.
    :param pos_keys: inference cache, one projected distance table ``[M + 1, H, Dh]`` per layer
        (relative and learned encodings), or None.
    :param cache_tag: identifies the weights the caches were computed with.
    :param use_cache: whether calls with this state keep the key/value cache.
    """

    hidden: Tensor
    valid: Tensor
    position: Tensor
    keys: tuple[Tensor, ...] | None = None
    values: tuple[Tensor, ...] | None = None
    pos_keys: tuple[Tensor, ...] | None = None
    cache_tag: tuple | None = None
    use_cache: bool = True

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def memory_length(self) -> int:
        return self.hidden.shape[2]

    def _map(self, fn_float, fn_other, per_row: bool = False) -> MemoryState:
        """Apply ``fn_float`` to the floating tensors and ``fn_other`` to the others; with
        ``per_row`` the row-independent distance cache is left as it is."""
        def per_layer(ts, fn):
            return None if ts is None else tuple(fn(t) for t in ts)
        return replace(
            self,
            hidden=fn_float(self.hidden),
            valid=fn_other(self.valid),
            position=fn_other(self.position),
            keys=per_layer(self.keys, fn_float),
            values=per_layer(self.values, fn_float),
            pos_keys=self.pos_keys if per_row else per_layer(self.pos_keys, fn_float),
        )

    def detach(self) -> MemoryState:
        return self._map(Tensor.detach, Tensor.detach)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> MemoryState:
        """Move to ``device``; ``dtype`` is the new storage dtype of the hidden states.

        The key/value caches hold what the model computed in its own dtype from the hidden
        states as stored; a new storage dtype rounds those differently, so the caches are
        dropped then (the next call rebuilds them from the converted hidden states)."""
        moved = self._map(lambda t: t.to(device=device), lambda t: t.to(device))
        if dtype is None or dtype == self.hidden.dtype:
            return moved
        return replace(moved, hidden=moved.hidden.to(dtype), keys=None, values=None,
                       pos_keys=None, cache_tag=None)

    def __getitem__(self, rows) -> MemoryState:
        """The state of a subset of rows (any index valid for dimension 0)."""
        return self._map(lambda t: t[rows], lambda t: t[rows], per_row=True)

    def reset(self, mask: Tensor) -> MemoryState:
        """Forget the memory of the rows where ``mask`` ``[B]`` (bool) is True."""
        if mask.shape != (self.batch_size,) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape [{self.batch_size}]")
        keep = ~mask
        return replace(self, valid=self.valid & keep[:, None], position=self.position * keep)


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal encoding (Vaswani et al. 2017) of ``positions`` ``[...]`` -> ``[..., dim]``."""
    half = dim // 2
    freq = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32)
        * (-math.log(10000.0) / max(half, 1))
    )
    angles = positions.to(torch.float32)[..., None] * freq
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        enc = F.pad(enc, (0, 1))
    return enc


class GRUGate(nn.Module):
    """GTrXL gate g(x, y) (Parisotto et al. 2019), in place of the residual x + y.

    With the update-gate bias b_g > 0 at initialisation, z ~ sigmoid(-b_g) is small and the
    gate starts close to the identity map g(x, y) ~ x.
    """

    def __init__(self, dim: int, bias: float) -> None:
        super().__init__()
        self.from_y = nn.Linear(dim, 3 * dim, bias=False)  # W_r, W_z, W_g
        self.from_x = nn.Linear(dim, 2 * dim, bias=False)  # U_r, U_z
        self.candidate_x = nn.Linear(dim, dim, bias=False)  # U_g
        self.update_bias = nn.Parameter(torch.full((dim,), float(bias)))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x: residual stream ``[..., D]``; y: sublayer output ``[..., D]`` -> ``[..., D]``."""
        wr, wz, wg = self.from_y(y).chunk(3, dim=-1)
        ur, uz = self.from_x(x).chunk(2, dim=-1)
        r = torch.sigmoid(wr + ur)
        z = torch.sigmoid(wz + uz - self.update_bias)
        candidate = torch.tanh(wg + self.candidate_x(r * x))
        return (1 - z) * x + z * candidate


class TrXLLayer(nn.Module):
    """One Transformer-XL block: windowed multi-head attention, then a feed-forward block."""

    def __init__(self, cfg: TrXLConfig) -> None:
        super().__init__()
        d, h = cfg.dim, cfg.num_heads
        self.num_heads, self.head_dim = h, d // h
        self.pre_norm = cfg.norm == "pre"
        self.norm_attn = nn.LayerNorm(d)
        self.norm_ff = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.key_value = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        ff_dim = cfg.ff_dim or 4 * d
        self.ff = nn.Sequential(nn.Linear(d, ff_dim), nn.ReLU(), nn.Linear(ff_dim, d))
        self.relative = cfg.positional_encoding in ("relative", "learned")
        if self.relative:
            self.pos_proj = nn.Linear(d, d, bias=False)  # W_{k,R}
            self.content_bias = nn.Parameter(torch.zeros(h, self.head_dim))  # u
            self.position_bias = nn.Parameter(torch.zeros(h, self.head_dim))  # v
        self.gates = nn.ModuleList([GRUGate(d, cfg.gate_bias) for _ in range(2)]) \
            if cfg.gating else None

    def _heads(self, t: Tensor) -> Tensor:
        """``[B, T, D]`` -> ``[B, H, T, Dh]``."""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of layer inputs ``h`` ``[B, T, D]`` -> two ``[B, H, T, Dh]``."""
        if self.pre_norm:
            h = self.norm_attn(h)
        k, v = self.key_value(h).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def project_positions(self, table: Tensor) -> Tensor:
        """Distance table ``[M + 1, D]`` -> per-head position keys ``[M + 1, H, Dh]``."""
        return self.pos_proj(table).unflatten(-1, (self.num_heads, self.head_dim))

    def _residual(self, i: int, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> Tensor:
        if self.gates is not None:
            out = self.gates[i](x, F.relu(y) if self.pre_norm else y)
        else:
            out = x + y
        return out if self.pre_norm else norm(out)

    def attention_weights(self, h: Tensor, keys: Tensor, visible: Tensor,
                          pos_keys: Tensor | None, distance: Tensor) -> Tensor:
        """The attention probabilities of the block's queries over ``keys``: the softmax of
        :meth:`attention_logits`. ``[B, H, N, M + N]``, zero where a key is not visible."""
        return self.attention_logits(h, keys, visible, pos_keys, distance).softmax(-1)

    def attention_logits(self, h: Tensor, keys: Tensor, visible: Tensor,
                         pos_keys: Tensor | None, distance: Tensor) -> Tensor:
        """The attention scores (softmax inputs) of the block's queries over ``keys``.

        Transformer-XL scores are ``((q + u).k_j + (q + v).r_{i-j}) / sqrt(Dh)`` with a
        distance table (relative and learned encodings), ``q.k_j / sqrt(Dh)`` without one.
        The softmax is written out rather than left to ``scaled_dot_product_attention``: with a
        bias that needs gradients torch falls back to the same ops there, plus checks that cost
        ~30% of the attention's time on CPU; and the attention heat map of ``evaluate`` reads
        these weights directly. Every query sees at least itself, so no row is all -inf.

        :param h: layer input ``[B, N, D]``; the other arguments are those of :meth:`forward`.
        :return: ``[B, H, N, M + N]``, -inf where a key is not visible.
        """
        # 1/sqrt(Dh) is applied to the queries (and biases), [B, H, N, Dh], rather than to the
        # scores, [B, H, N, M + N]: the same scores for a fraction of the work.
        scale = self.head_dim ** -0.5
        q = self._heads(self.query(self.norm_attn(h) if self.pre_norm else h)) * scale
        if pos_keys is None:
            scores = q @ keys.transpose(-1, -2)
        else:
            by_distance = torch.einsum("bhnd,khd->bhnk", q + scale * self.position_bias[:, None],
                                       pos_keys)  # [B, H, N, M + 1]
            position = by_distance.gather(-1, distance.expand(*by_distance.shape[:2], -1, -1))
            scores = (q + scale * self.content_bias[:, None]) @ keys.transpose(-1, -2) + position
        # An additive mask, not masked_fill: the same softmax input (s + 0 = s, s - inf = -inf)
        # and gradients, without copying the scores in the forward and the backward pass
        # (masking and softmax ~3x faster on CPU).
        mask = torch.zeros(visible.shape, dtype=scores.dtype, device=scores.device)
        return scores + mask.masked_fill_(~visible, float("-inf"))

    def forward(self, h: Tensor, keys: Tensor, values: Tensor, visible: Tensor,
                pos_keys: Tensor | None, distance: Tensor) -> Tensor:
        """One block over a segment.

        :param h: layer input ``[B, N, D]``.
        :param keys: memory + segment keys ``[B, H, M + N, Dh]``; ``values`` likewise.
        :param visible: ``[B, 1, N, M + N]`` bool, which keys each query may attend to.
        :param pos_keys: ``[M + 1, H, Dh]`` projected distance table, or None.
        :param distance: ``[N, M + N]`` int64 query-key distance clamped to 0..M.
        :return: layer output ``[B, N, D]``.
        """
        attn = self.attention_weights(h, keys, visible, pos_keys, distance) @ values
        y = self.out(attn.transpose(1, 2).flatten(2))  # [B, N, D]
        h = self._residual(0, h, y, self.norm_attn)
        y = self.ff(self.norm_ff(h) if self.pre_norm else h)
        return self._residual(1, h, y, self.norm_ff)


class TransformerXL(MemoryBackbone):
    """Transformer-XL encoder with a per-row, per-episode sliding-window memory.

    As a :class:`MemoryBackbone`, the record of a step is the token's index in its episode
    (``position``) and, with M > 0, its input to every layer (``hidden`` ``[L, D]``, in the
    state's storage dtype); the history is the last M tokens (at least one, for the position).

    >>> trxl = TransformerXL(TrXLConfig(input_dim=8, dim=32, num_heads=4, memory_length=16))
    >>> state = trxl.initial_state(batch_size=3)
    >>> y, state = trxl(torch.randn(3, 5, 8), state, torch.zeros(3, 5, dtype=torch.bool))
    >>> y.shape
    torch.Size([3, 5, 32])
    """

    def __init__(self, config: TrXLConfig) -> None:
        super().__init__()
        self.config = config
        self._instance = next(_instances)  # part of the cache tag: caches never cross models
        self._weights_version = 0  # bumped by weights_changed(); part of the cache tag
        self.input_proj = nn.Linear(config.input_dim, config.dim)
        self.layers = nn.ModuleList(TrXLLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.dim) if config.norm == "pre" else nn.Identity()
        if config.positional_encoding == "learned":
            self.distance_table = nn.Parameter(
                0.02 * torch.randn(config.memory_length + 1, config.dim))

    @property
    def output_dim(self) -> int:
        return self.config.dim

    @property
    def history_length(self) -> int:
        return max(self.config.memory_length, 1)

    def _check_memory_length(self, memory_length: int) -> None:
        cfg = self.config
        _check_int("memory_length", memory_length, minimum=0)
        if cfg.positional_encoding == "learned" and memory_length != cfg.memory_length:
            raise ValueError(
                f"memory_length: a model with positional_encoding='learned' has a table over "
                f"distances 0..{cfg.memory_length} and cannot run with memory_length "
                f"{memory_length}; train with 'relative' or 'none' to change M at inference"
            )

    def initial_state(self, batch_size: int, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None, memory_length: int | None = None,
                      kv_cache: bool = True) -> MemoryState:
        """Empty memory for ``batch_size`` rows.

        :param device: defaults to the module's device.
        :param dtype: storage dtype of the hidden states (e.g. ``torch.bfloat16``); defaults to
            the module's dtype. Computation always runs in the module's dtype.
        :param memory_length: run with a memory of this length instead of the configured M
            (allowed for "relative", "none" and "absolute" encodings; "learned" has a fixed table).
        :param kv_cache: keep projected keys/values of the memory between inference calls.
        """
        _check_int("batch_size", batch_size, minimum=1)
        m = self.config.memory_length if memory_length is None else memory_length
        self._check_memory_length(m)
        param = self.input_proj.weight
        device = param.device if device is None else torch.device(device)
        cfg = self.config
        return MemoryState(
            hidden=torch.zeros(batch_size, cfg.num_layers, m, cfg.dim, device=device,
                               dtype=dtype or param.dtype),
            valid=torch.zeros(batch_size, m, dtype=torch.bool, device=device),
            position=torch.zeros(batch_size, dtype=torch.long, device=device),
            use_cache=kv_cache,
        )

    def weights_tag(self) -> tuple:
        """Changes whenever a parameter is replaced or modified in place through
        autograd-visible ops (``load_state_dict``, ``.to()``, a non-fused optimizer step,
        ``p.copy_()`` under ``torch.no_grad()``) and at every :meth:`weights_changed`, so that
        caches built with older weights are rebuilt.

        Fused optimizers (``fused=True``) and edits through ``p.data`` do not bump version
        counters: call :meth:`weights_changed` after them, e.g. with
        ``optimizer.register_step_post_hook(lambda *_: trxl.weights_changed())`` (the
        trainer does this for its own optimizer)."""
        return (self._instance, self._weights_version, *parameter_versions(self))

    def weights_changed(self) -> None:
        """Invalidate every key/value cache built with the current weights."""
        self._weights_version += 1

    # --- MemoryBackbone: what the rollout stores -------------------------------------------

    def step_record(self, state: MemoryState) -> dict[str, Tensor]:
        """``position`` ``[B]`` of the newest token and, with M > 0, its layer inputs
        ``hidden`` ``[B, L, D]``."""
        record = {"position": state.position - 1}
        if state.memory_length:
            record["hidden"] = state.hidden[:, :, -1]
        return record

    def history(self, state: MemoryState) -> tuple[dict[str, Tensor], Tensor]:
        """The last K = max(M, 1) tokens: ``hidden`` ``[B, M, L, D]`` (M > 0),
        ``position`` ``[B, K]``, valid ``[B, K]``."""
        m = state.memory_length
        if not m:  # no tokens are kept; one slot carries the position of the previous token
            return {"position": (state.position - 1)[:, None]}, (state.position > 0)[:, None]
        back = torch.arange(m, 0, -1, device=state.position.device)  # M .. 1 steps back
        records = {"hidden": state.hidden.transpose(1, 2),
                   "position": (state.position[:, None] - back).clamp_min(0)}
        return records, state.valid

    def state_from_history(self, records: dict[str, Tensor], valid: Tensor) -> MemoryState:
        """The memory after the K recorded tokens (no key/value cache)."""
        last = records["position"][:, -1]
        position = torch.where(valid[:, -1], last + 1, 0)
        if "hidden" not in records:
            hidden = torch.zeros(valid.shape[0], self.config.num_layers, 0, self.config.dim,
                                 device=valid.device, dtype=self.input_proj.weight.dtype)
            return MemoryState(hidden=hidden, valid=valid[:, :0], position=position)
        return MemoryState(hidden=records["hidden"].transpose(1, 2), valid=valid,
                           position=position)

    def _distance_table(self, memory_length: int, like: Tensor) -> Tensor | None:
        """``[M + 1, D]`` encodings of query-key distances 0..M, or None without one."""
        enc = self.config.positional_encoding
        if enc == "learned":
            return self.distance_table
        if enc == "relative":
            distances = torch.arange(memory_length + 1, device=like.device)
            return sinusoid(distances, self.config.dim).to(like.dtype)
        return None

    def _validate(self, x: Tensor, state: MemoryState, episode_start: Tensor) -> None:
        cfg = self.config
        check_segment(x, episode_start, cfg.input_dim)
        b, layers, _, dim = state.hidden.shape
        if (b, layers, dim) != (x.shape[0], cfg.num_layers, cfg.dim):
            raise ValueError(
                f"state must hold [B={x.shape[0]}, L={cfg.num_layers}, M, D={cfg.dim}] hidden "
                f"states, got {tuple(state.hidden.shape)}"
            )
        self._check_memory_length(state.memory_length)

    def forward(self, x: Tensor, state: MemoryState, episode_start: Tensor
                ) -> tuple[Tensor, MemoryState]:
        """Encode a segment of N tokens per row.

        :param x: ``[B, N, input_dim]`` inputs.
        :param state: memory before the segment (from :meth:`initial_state` or a previous call).
        :param episode_start: ``[B, N]`` bool, True where a token is the first of an episode:
            the memory before it becomes invisible to it and to every later token.
        :return: outputs ``[B, N, D]`` and the memory after the segment.
        """
        if not torch.jit.is_tracing():  # shapes are tensors then (trxl_rl.export checks the
            self._validate(x, state, episode_start)  # arguments in an eager call first)
        n, m = x.shape[1], state.memory_length
        dev = x.device

        # Episode bookkeeping. Episode ids inside the call: 0 = continues the memory's episode.
        seg_episode = episode_start.long().cumsum(1)  # [B, N]
        mem_episode = torch.where(state.valid, 0, -1)  # [B, M]
        key_episode = torch.cat([mem_episode, seg_episode], 1)  # [B, M + N]
        q_idx = torch.arange(n, device=dev)[:, None]
        k_idx = torch.arange(m + n, device=dev)[None, :]
        distance = m + q_idx - k_idx  # [N, M + N]
        in_window = (distance >= 0) & (distance <= m)
        visible = (key_episode[:, None, :] == seg_episode[:, :, None]) & in_window  # [B,N,M+N]
        visible = visible[:, None]  # [B, 1, N, M + N]
        distance = distance.clamp(0, m)

        # Index of every token within its episode (used by the absolute encoding). A single
        # token needs no running maximum (and ONNX, which trxl_rl.export writes the step to,
        # has no cummax).
        if n == 1:
            position = torch.where(episode_start, 0, state.position[:, None])  # [B, 1]
        else:
            starts = torch.where(episode_start, q_idx.T, -1).cummax(1).values  # [B, N]
            position = torch.where(starts >= 0, q_idx.T - starts,
                                   state.position[:, None] + q_idx.T)

        h = self.input_proj(x)  # [B, N, D]
        if self.config.positional_encoding == "absolute":
            h = h + sinusoid(position, self.config.dim).to(h.dtype)

        tag = self.weights_tag() if state.use_cache else None
        cached = (state.keys is not None and state.cache_tag == tag
                  and not torch.is_grad_enabled())
        # Keys and values are made from the layer inputs as the memory stores them (e.g. rounded
        # to bfloat16), so the cache, a later segment and a minibatch recompute agree.
        storage = state.hidden.dtype
        table = None if cached else self._distance_table(m, h)
        layer_inputs, keys_out, values_out, pos_out = [], [], [], []
        for i, layer in enumerate(self.layers):
            layer_inputs.append(h)
            if cached:
                mem_k, mem_v = state.keys[i], state.values[i]
                pos_keys = state.pos_keys[i] if state.pos_keys is not None else None
            else:
                memory = state.hidden[:, i].detach().to(h.dtype)  # stop-gradient: [B, M, D]
                mem_k, mem_v = layer.project_kv(memory)
                pos_keys = layer.project_positions(table) if table is not None else None
            seg_k, seg_v = layer.project_kv(h if storage == h.dtype else h.to(storage).to(h.dtype))
            keys = torch.cat([mem_k, seg_k], 2)  # [B, H, M + N, Dh]
            values = torch.cat([mem_v, seg_v], 2)
            h = layer(h, keys, values, visible, pos_keys, distance)
            if state.use_cache:
                keys_out.append(keys.narrow(2, n, m).detach())
                values_out.append(values.narrow(2, n, m).detach())
                if pos_keys is not None:
                    pos_out.append(pos_keys.detach())
        y = self.final_norm(h)

        new_inputs = torch.stack(layer_inputs, 1).detach().to(state.hidden.dtype)  # [B,L,N,D]
        new_state = MemoryState(
            hidden=torch.cat([state.hidden.detach(), new_inputs], 2).narrow(2, n, m),
            valid=(key_episode == seg_episode[:, -1:]).narrow(1, n, m),
            position=position[:, -1] + 1,
            use_cache=state.use_cache,
        )
        if state.use_cache:
            new_state.keys, new_state.values = tuple(keys_out), tuple(values_out)
            new_state.pos_keys = tuple(pos_out) if pos_out else None
            new_state.cache_tag = tag
        return y, new_state

    @torch.no_grad()
    def diagnostics(self, x: Tensor, state: MemoryState, episode_start: Tensor
                    ) -> dict[str, float]:
        """Per layer ``i``, over every query of the segment and every head:
        ``attention_entropy_layer{i}``, the mean entropy (nats) of the attention over the
        visible keys (0: each query looks at one key; log(M + 1): uniform over a full window),
        and ``attention_max_logit_layer{i}``, the largest attention score (a softmax input;
        values that grow without bound saturate the softmax). One extra forward pass."""
        logits: list[Tensor] = []

        def record(layer: TrXLLayer, args: tuple) -> None:
            h, keys, _values, visible, pos_keys, distance = args  # TrXLLayer.forward's
            logits.append(layer.attention_logits(h, keys, visible, pos_keys, distance))

        hooks = [layer.register_forward_pre_hook(record) for layer in self.layers]
        try:
            self(x, replace(state, use_cache=False), episode_start)
        finally:
            for hook in hooks:
                hook.remove()
        out = {}
        for i, scores in enumerate(logits):  # [B, H, N, M + N], -inf where not visible
            p = scores.softmax(-1)
            entropy = -(p * scores.log_softmax(-1)).nan_to_num(0.0).sum(-1)  # [B, H, N]
            out[f"attention_entropy_layer{i}"] = entropy.mean().item()
            out[f"attention_max_logit_layer{i}"] = scores.amax().item()
        return out

    def step(self, x: Tensor, state: MemoryState, episode_start: Tensor
             ) -> tuple[Tensor, MemoryState]:
        """One token per row: ``x`` ``[B, input_dim]``, ``episode_start`` ``[B]`` bool ->
        ``([B, D], state)``. The same computation as :meth:`forward` with N = 1."""
        if x.dim() != 2:
            raise ValueError(f"x must have shape [B, {self.config.input_dim}], got "
                             f"{tuple(x.shape)}")
        if episode_start.dim() != 1:
            raise ValueError(f"episode_start must have shape [B], got "
                             f"{tuple(episode_start.shape)}")
        y, state = self.forward(x[:, None], state, episode_start[:, None])
        return y[:, 0], state


__all__ = ["MemoryBackbone", "MemoryState", "TrXLConfig", "TransformerXL", "sinusoid"]
