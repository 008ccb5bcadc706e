"""Observation encoders, chosen from the observation space.

``make_encoder(space)`` returns an :class:`ObservationEncoder`: an ``nn.Module`` with an
``output_dim`` attribute whose ``forward(obs)`` maps a batch of observations to features
``[B, output_dim]``. Observations arrive as torch tensors (a dict of tensors for ``Dict``
spaces) with a leading batch dimension and in the space's own dtype: ``uint8`` images stay
``uint8`` until the encoder converts them, so rollout storage can keep them small.

Which encoder a space gets:

=====================================================  =========================================
space                                                  encoder
=====================================================  =========================================
``Box``, integer dtype, shape ``(H, W, C)``,           :class:`GridEmbeddingEncoder` (symbolic
``0 <= low``, ``max(high) < 255``                      grids such as MiniGrid's object/colour/state)
``Box``, ``uint8``, shape ``(H, W, C)``, high 255      :class:`NatureCNNEncoder` (images)
``Box`` with one dimension (any bounds, infinite       :class:`MLPEncoder` (``Discrete`` and
too), ``Discrete``, ``MultiDiscrete``, ``MultiBinary``  ``MultiDiscrete`` one-hot encoded)
``Dict`` of the above                                  :class:`DictEncoder` (sorted keys, concat)
=====================================================  =========================================

``Tuple`` observations are not encoded here: ``trxl_rl.envs.make_env`` turns them into
``MultiDiscrete`` or ``Dict`` ones (``UntupleObservation``), which checkpoints can store.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from trxl_rl.memory import parameter_versions

SUPPORTED_SPACES = (
    "Box(H, W, C) with integer dtype, low >= 0 and max(high) < 255 (symbolic grid); "
    "Box(H, W, C) uint8 with high 255 and H, W >= 36 (image); "
    "Box(n,) of any dtype, Discrete, MultiDiscrete, MultiBinary (vector); "
    "Dict of these"
)


def _orthogonal_init(module: nn.Module, gain: float = math.sqrt(2)) -> None:
    """PPO's usual initialisation: orthogonal weights, zero bias, for Linear and (transposed)
    convolutions."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.orthogonal_(module.weight, gain)
        nn.init.zeros_(module.bias)


class ObservationEncoder(nn.Module):
    """Base class: maps a batch of observations to features ``[B, output_dim]``."""

    output_dim: int

    def forward(self, obs: Tensor | dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def weights_changed(self) -> None:
        """Tell the encoder its weights changed in a way autograd's version counters do not
        see (fused optimizers, edits through ``p.data``): an encoder that caches features
        drops them. The default caches nothing; :class:`NatureCNNEncoder` caches."""


class GridEmbeddingEncoder(ObservationEncoder):
    """Symbolic grid ``[B, H, W, C]`` (integers) -> ``[B, out_dim]``.

    Every channel has its own vocabulary (MiniGrid: object type, colour, door state), so each
    channel ``c`` gets its own ``high_c + 1`` embedding rows (one table holds them all, channel
    ``c``'s from row ``offsets[c]``). A cell's features are its channels' embeddings,
    concatenated. The output is ReLU of two linear maps added: one of all cells' features
    flattened (what is where: walls ahead, the way out) and one of their maximum over cells
    (what is in view, wherever it is). The second lets an object seen in one place of the
    view be recognised in any other: in MiniGrid-Memory the cue is seen at a different place
    for every way the agent can turn back to look at it.

    ``forward`` rejects a value outside ``0..high_c`` (in the shared table it would silently
    read another channel's rows): ``ValueError`` on CPU, a device-side assert on CUDA (which
    does not make the host wait for the device). So the observation space must declare the
    true per-channel ``high``. Weights saved before the channels shared one table (separate
    ``embeddings.<c>.weight``) load into it.

    :param space: ``Box`` of shape ``(H, W, C)`` with integer dtype and ``low >= 0``.
    :param out_dim: feature size.
    :param embed_dim: embedding size per channel value.
    """

    def __init__(self, space: spaces.Box, out_dim: int = 256, embed_dim: int = 8) -> None:
        super().__init__()
        height, width, channels = space.shape
        # Highest value of each channel over all cells: (C,)
        channel_high = np.asarray(space.high).reshape(-1, channels).max(axis=0)
        # One table holding every channel's rows, channel c from offsets[c]: one lookup (and
        # one backward) per call instead of one per channel.
        sizes = [int(high) + 1 for high in channel_high]
        self.embedding = nn.Embedding(sum(sizes), embed_dim)
        self.register_buffer("offsets", torch.tensor(np.cumsum([0] + sizes[:-1])),
                             persistent=False)
        self.register_buffer("high", torch.tensor(sizes) - 1, persistent=False)
        self.linear = nn.Linear(height * width * channels * embed_dim, out_dim)
        self.pooled = nn.Linear(channels * embed_dim, out_dim, bias=False)
        _orthogonal_init(self.linear)
        nn.init.orthogonal_(self.pooled.weight, math.sqrt(2))
        self.output_dim = out_dim

    def forward(self, obs: Tensor) -> Tensor:
        """:param obs: ``[B, H, W, C]`` integers. :return: ``[B, out_dim]``."""
        obs = obs.long()
        self._check_range(obs)
        # The embedding lookup as index_select: the same rows and, in the backward pass, the
        # same sums in the same order (index_add), but ~3x faster than embedding's backward
        # on CPU (that was ~6% of a PPO update of the MiniGrid-Memory preset).
        rows = self.embedding.weight.index_select(0, (obs + self.offsets).flatten())
        cells = rows.view(*obs.shape, -1).flatten(-2)  # (B, H, W, C * embed)
        in_view = cells.flatten(1, 2).amax(1)  # (B, C * embed_dim)
        return torch.relu(self.linear(cells.flatten(1)) + self.pooled(in_view))

    def _check_range(self, obs: Tensor) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return  # an exported step (trxl_rl.export) is a graph without data-dependent branches
        outside = ((obs < 0) | (obs > self.high)).flatten(0, -2).any(0)  # (C,)
        if obs.is_cuda:
            torch._assert_async(~outside.any(), "grid observation value outside 0..high")
        elif outside.any():
            c = int(outside.nonzero()[0, 0])
            values = obs[..., c]
            raise ValueError(
                f"grid observation channel {c} holds values {values.min().item()}.."
                f"{values.max().item()}, outside 0..{self.high[c].item()} (per-channel high "
                f"{self.high.tolist()}): declare the observation space's true per-channel high"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Before one table: channel c's rows in `embeddings.<c>.weight`, in channel order.
        old = [f"{prefix}embeddings.{c}.weight" for c in range(len(self.offsets))]
        if all(key in state_dict for key in old):
            state_dict[f"{prefix}embedding.weight"] = torch.cat([state_dict.pop(k) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def distinct_rows(batch: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct entries of a batch, exactly: ``batch[first][inverse]`` equals ``batch``.

    Entries are compared byte for byte, as rows of int64 (zero-padded to a multiple of 8
    bytes; ~4x faster to sort than bytes), so two entries are merged only when identical.

    :param batch: ``[B, ...]``, any dtype.
    :return: ``first`` ``[U]``, the index of each distinct entry's first occurrence (U <= B,
        in no particular order), and ``inverse`` ``[B]``, each entry's position in ``first``;
        both int64.
    """
    n = len(batch)
    as_bytes = batch.reshape(n, math.prod(batch.shape[1:])).contiguous().view(torch.uint8)
    # as_bytes: [B, row bytes]. An int64 view needs 8-byte rows, 8-byte aligned.
    padding = -as_bytes.shape[1] % 8 if as_bytes.shape[1] else 8
    if padding:
        as_bytes = torch.nn.functional.pad(as_bytes, (0, padding))
    elif as_bytes.storage_offset() % 8:
        as_bytes = as_bytes.clone()
    keys, inverse = torch.unique(as_bytes.view(torch.int64), dim=0, return_inverse=True)
    first = torch.full((len(keys),), n, device=batch.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=batch.device), "amin")
    return first, inverse


class NatureCNNEncoder(ObservationEncoder):
    """Image ``[B, H, W, C]`` uint8 -> ``[B, out_dim]``: the Nature DQN CNN (Mnih et al. 2015).

    conv 8x8/4 -> 32, conv 4x4/2 -> 64, conv 3x3/1 -> 64 (ReLU after each), flatten,
    Linear -> ``out_dim``, ReLU. For 84x84x3 this is the CNN of CleanRL's ``ppo_trxl``.
    Pixels are scaled by 1/255 and moved to channels-first inside ``forward``.

    With ``dedupe`` the CNN runs once per *distinct* image of a batch and the features are
    copied to the repeats (:func:`distinct_rows`; the weights' gradients from repeats add up,
    as they would in the full batch; an input that requires grad is encoded whole). Images
    rendered from grid worlds repeat a lot: a rollout of MiniGrid-MemoryS9 (3x3 view, 84x84
    RGB, 16 envs x 256 steps) holds ~60 distinct images in 4,096 and a 512-sample minibatch
    ~50, so the update's CNN does a tenth of the work. The result is the same function; only
    float rounding can differ, as it does between batch sizes anyway.

    With dedupe, a batch of CPU images without gradient (acting, evaluation) is also looked
    up, image by image (its bytes), in the features this encoder computed since its weights
    last changed, and the CNN runs on the images not found: a grid world shows the same few
    images over and over (~60 in a rollout of S9), so after the first steps an acting step
    runs no CNN at all. At most ``MEMO_SIZE`` images are kept (then forgotten together).
    The memo notices weights replaced or changed through autograd-visible ops by their
    version counters, as :meth:`trxl_rl.TransformerXL.weights_tag` does; after a fused
    optimizer step or an edit through ``p.data`` call :meth:`weights_changed`
    (:meth:`MemoryAgent.weights_changed` reaches it; the trainer calls that after every
    optimizer step).

    ``dedupe=None`` (the default) decides per batch from its device: on for CPU tensors, off
    on a GPU. Measured with ``python -m benchmarks.run`` on the published-pixel config (rows
    ``b``, ``b-dedupe``, ``b-nodedupe``): on 2 CPU cores dedupe trains 1.6-1.9x faster; on an
    H200 it trains 2.4-2.6x *slower*, because the CNN is cheap there and ``torch.unique`` makes
    the host wait for the device. When images rarely repeat (natural images) the check costs
    ~5% of the CNN's time on a CPU: turn it off with ``dedupe=False`` (config
    ``model.encoder_dedupe``).

    With ``max_pool`` a second linear map, of each of the last convolution's 64 channels'
    maximum over positions (what is in view, wherever it is), is added before the ReLU, as
    :class:`GridEmbeddingEncoder` adds one over cells: a feature the CNN learned where an
    object first appeared then fires wherever it appears. The maxima are exactly the same for
    an object moved by a multiple of the CNN's stride (8 px) whose every view by the last
    convolution stays inside the image, and close for other moves. Off by default (the
    CNN as published).

    :param space: ``Box`` of shape ``(H, W, C)``, uint8, with ``H, W >= 36`` (the smallest
        image the three convolutions leave at least one pixel of).
    :param out_dim: feature size.
    :param dedupe: encode each distinct image of a batch once (None: on CPU only).
    :param max_pool: add the map of the channels' maxima over positions.
    """

    MIN_SIDE = 36
    MEMO_SIZE = 1024  # images whose features are kept for lookup (~23 MB at 84x84x3, 512)

    def __init__(self, space: spaces.Box, out_dim: int = 512,
                 dedupe: bool | None = None, max_pool: bool = False) -> None:
        super().__init__()
        height, width, channels = space.shape
        if min(height, width) < self.MIN_SIDE:
            raise ValueError(
                f"image observation space {space} is smaller than {self.MIN_SIDE} pixels in a "
                f"side, too small for the Nature CNN (images are expected as (H, W, C)); "
                f"if this is a symbolic grid, declare its true per-channel `high` (< 255) "
                f"so that it gets a GridEmbeddingEncoder"
            )
        self.cnn = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
        )
        with torch.no_grad():
            maps = self.cnn(torch.zeros(1, channels, height, width))  # (1, 64, h, w)
        self.linear = nn.Linear(maps[0].numel(), out_dim)
        self.apply(_orthogonal_init)
        self.pooled = None
        if max_pool:
            self.pooled = nn.Linear(maps.shape[1], out_dim, bias=False)
            nn.init.orthogonal_(self.pooled.weight, math.sqrt(2))
        self.output_dim = out_dim
        self.dedupe = dedupe
        self._weights_version = 0  # bumped by weights_changed(); part of the memo's tag
        self._memo: dict[bytes, Tensor] = {}  # image bytes -> features [out_dim]
        self._memo_tag: tuple | None = None

    def forward(self, obs: Tensor) -> Tensor:
        """:param obs: ``[B, H, W, C]`` uint8. :return: ``[B, out_dim]``."""
        # An input that needs its own gradient (saliency maps) gets the full batch: with
        # repeats merged, all of an image's gradient would go to its first occurrence.
        dedupe = obs.device.type == "cpu" if self.dedupe is None else self.dedupe
        if (dedupe and obs.device.type == "cpu" and not torch.is_grad_enabled()
                and not obs.requires_grad and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling()):
            return self._looked_up(obs)
        if dedupe and len(obs) > 1 and not obs.requires_grad:
            first, inverse = distinct_rows(obs)
            if len(first) < len(obs):
                return self.encode_all(obs[first])[inverse]
        return self.encode_all(obs)

    def weights_changed(self) -> None:
        self._weights_version += 1

    def _looked_up(self, obs: Tensor) -> Tensor:
        """``[B, out_dim]``, the memo's features for the images of ``obs`` ``[B, H, W, C]``
        (CPU, no gradient) it holds, the CNN's for the others (each distinct one once)."""
        tag = (self._weights_version, *parameter_versions(self))
        if tag != self._memo_tag:
            self._memo.clear()
            self._memo_tag = tag
        keys = [image.tobytes() for image in obs.numpy()]
        new: dict[bytes, int] = {}  # image bytes -> its first row in obs
        for row, key in enumerate(keys):
            if key not in self._memo:
                new.setdefault(key, row)
        computed: dict[bytes, Tensor] = {}
        if new:
            rows = torch.tensor(list(new.values()), device=obs.device)
            computed = dict(zip(new, self.encode_all(obs.index_select(0, rows)), strict=True))
        features = [self._memo.get(key, computed.get(key)) for key in keys]
        if len(self._memo) + len(computed) > self.MEMO_SIZE:
            self._memo.clear()
        self._memo.update(itertools.islice(computed.items(), self.MEMO_SIZE))
        if not features:
            return torch.zeros(0, self.output_dim, device=obs.device)
        return torch.stack(features)

    def encode_all(self, obs: Tensor) -> Tensor:
        """The CNN on every image of ``obs`` ``[B, H, W, C]`` (no dedupe)."""
        # (B, H, W, C) -> (B, C, H, W), in [0, 1]
        pixels = obs.permute(0, 3, 1, 2).float() / 255.0
        maps = self.cnn(pixels)  # (B, 64, h, w)
        features = self.linear(maps.flatten(1))
        if self.pooled is not None:
            features = features + self.pooled(maps.amax((2, 3)))
        return torch.relu(features)


class NatureCNNDecoder(nn.Module):
    """Features ``[B, in_dim]`` -> image ``[B, H, W, C]`` in [0, 1]: the mirror of
    :class:`NatureCNNEncoder` (Linear -> 64 x h x w, then transposed convolutions 3x3/1,
    4x4/2, 8x8/4 with ReLUs, and a sigmoid), sized to give back exactly ``space``'s images.

    Used for the auxiliary observation-reconstruction loss (``ppo.reconstruction_coef``;
    Pleines et al. 2023 found TrXL-PPO on finite memory tasks needs it). ``output_padding``
    makes up the pixels that the encoder's strided convolutions drop, so any ``H, W >= 36``
    works, not only 84.
    """

    def __init__(self, space: spaces.Box, in_dim: int) -> None:
        super().__init__()
        height, width, channels = space.shape
        sizes = [(height, width)]
        for kernel, stride in ((8, 4), (4, 2), (3, 1)):
            h, w = sizes[-1]
            sizes.append(((h - kernel) // stride + 1, (w - kernel) // stride + 1))
        (h0, w0), (h1, w1), (h2, w2), (h3, w3) = sizes

        def pad(out: int, inp: int, kernel: int, stride: int) -> int:
            return out - ((inp - 1) * stride + kernel)

        self.linear = nn.Linear(in_dim, 64 * h3 * w3)
        self.deconv = nn.Sequential(
            nn.Unflatten(1, (64, h3, w3)),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2,
                               output_padding=(pad(h1, h2, 4, 2), pad(w1, w2, 4, 2))),
            nn.ReLU(),
            nn.ConvTranspose2d(32, channels, 8, stride=4,
                               output_padding=(pad(h0, h1, 8, 4), pad(w0, w1, 8, 4))),
            nn.Sigmoid(),
        )
        self.apply(_orthogonal_init)

    def forward(self, features: Tensor) -> Tensor:
        """:param features: ``[B, in_dim]``. :return: ``[B, H, W, C]`` in [0, 1]."""
        return self.deconv(self.linear(features)).permute(0, 2, 3, 1)


class MLPEncoder(ObservationEncoder):
    """Vector ``[B, n]`` -> ``[B, out_dim]``: Linear + ReLU + Linear + ReLU.

    ``Discrete(n, start)`` observations ``[B]`` are one-hot encoded to ``[B, n]`` first;
    ``MultiDiscrete(nvec, start)`` observations ``[B, *nvec.shape]`` to the concatenation of
    every dimension's one-hot, ``[B, sum(nvec)]`` (a value is a category, not a quantity);
    ``MultiBinary`` and ``Box`` observations are cast to float (and flattened), whatever
    their bounds (infinite ones included).

    :param space: ``Box`` with one dimension, ``Discrete``, ``MultiDiscrete`` or
        ``MultiBinary``.
    :param out_dim: feature size.
    """

    offsets: Tensor | None

    def __init__(self, space: spaces.Box | spaces.Discrete | spaces.MultiDiscrete
                 | spaces.MultiBinary, out_dim: int = 64) -> None:
        super().__init__()
        offsets = None
        if isinstance(space, spaces.Discrete):
            # One dimension: values start .. start + n - 1 are one-hot columns 0 .. n - 1.
            offsets = torch.tensor([-int(space.start)])
            in_dim = int(space.n)
        elif isinstance(space, spaces.MultiDiscrete):
            # Dimension d's categories are one-hot columns offsets[d] .. offsets[d] + nvec[d].
            nvec = space.nvec.reshape(-1).astype(np.int64)
            first = np.cumsum([0, *nvec[:-1]]) - np.asarray(space.start).reshape(-1)
            offsets = torch.as_tensor(first, dtype=torch.int64)
            in_dim = int(nvec.sum())
        else:
            in_dim = int(np.prod(space.shape))
        self.register_buffer("offsets", offsets, persistent=False)
        self.in_dim = in_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim), nn.ReLU()
        )
        self.apply(_orthogonal_init)
        self.output_dim = out_dim

    def forward(self, obs: Tensor) -> Tensor:
        """:param obs: ``[B, n]`` (``[B]`` for ``Discrete``, ``[B, *nvec.shape]`` for
        ``MultiDiscrete``). :return: ``[B, out_dim]``."""
        if self.offsets is not None:
            # (B, D) column of each dimension's category -> (B, in_dim) of D ones
            # (obs.shape[0], not len(obs): an exported step keeps its batch size open)
            columns = obs.reshape(obs.shape[0], -1).long() + self.offsets
            obs = torch.zeros(obs.shape[0], self.in_dim, device=obs.device).scatter_(1, columns,
                                                                                      1.0)
        return self.mlp(obs.flatten(1).float())


class DictEncoder(ObservationEncoder):
    """``Dict`` observation -> ``[B, sum of the parts' output_dim]``.

    Each key is encoded by the encoder its own space selects; features are concatenated in
    sorted key order.

    :param space: ``Dict`` space.
    :param out_dim: passed to every part's encoder (``None``: each part's default).
    :param dedupe: passed to every part's encoder (see :func:`make_encoder`).
    :param max_pool: likewise.
    """

    def __init__(self, space: spaces.Dict, out_dim: int | None = None,
                 dedupe: bool | None = None, max_pool: bool = False) -> None:
        super().__init__()
        self.keys = sorted(space.spaces)
        self.parts = nn.ModuleDict(
            {key: make_encoder(space[key], out_dim, dedupe, max_pool) for key in self.keys}
        )
        self.output_dim = sum(part.output_dim for part in self.parts.values())

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        """:param obs: key -> ``[B, ...]``. :return: ``[B, output_dim]``."""
        return torch.cat([self.parts[key](obs[key]) for key in self.keys], dim=-1)


def _is_symbolic_grid(space: spaces.Box) -> bool:
    return (
        np.issubdtype(space.dtype, np.integer)
        and len(space.shape) == 3
        and bool(np.all(space.low >= 0))
        and int(np.max(space.high)) < 255
    )


def is_image_space(space: spaces.Space) -> bool:
    """Whether ``space`` holds images: ``Box`` ``(H, W, C)``, uint8, high 255."""
    return (isinstance(space, spaces.Box) and space.dtype == np.uint8
            and len(space.shape) == 3 and int(np.max(space.high)) == 255)


def make_encoder(space: spaces.Space, out_dim: int | None = None,
                 dedupe: bool | None = None, max_pool: bool = False) -> ObservationEncoder:
    """Choose the encoder for an observation space (rules in the module docstring).

    :param space: the (single-environment) observation space.
    :param out_dim: feature size; ``None`` keeps the encoder's default (grid 256, image 512,
        vector 64).
    :param dedupe: image encoders encode each distinct image of a batch once
        (:class:`NatureCNNEncoder`); the other encoders are cheap enough not to need it.
    :param max_pool: image encoders add a map of their channels' maxima over positions
        (:class:`NatureCNNEncoder`); the grid encoder always has one, the others none.
    :raises ValueError: for a space no rule covers, naming it and listing what is supported.
    """
    kwargs = {} if out_dim is None else {"out_dim": out_dim}
    if isinstance(space, spaces.Dict):
        return DictEncoder(space, out_dim, dedupe, max_pool)
    if isinstance(space, spaces.Box):
        if _is_symbolic_grid(space):
            return GridEmbeddingEncoder(space, **kwargs)
        if is_image_space(space):
            return NatureCNNEncoder(space, dedupe=dedupe, max_pool=max_pool, **kwargs)
        if len(space.shape) == 1:
            return MLPEncoder(space, **kwargs)
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        return MLPEncoder(space, **kwargs)
    raise ValueError(
        f"no observation encoder for space {space}; supported: {SUPPORTED_SPACES}"
    )
