"""The PPO agent: observation encoder -> memory backbone -> policy and value heads, and
:func:`build_agent`, the one place an agent is built from a training config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from gymnasium import spaces
from torch import Tensor, nn

from trxl_rl.backbones import BACKBONES, make_backbone
from trxl_rl.memory import MemoryBackbone

from .distributions import ActionDistribution, make_action_head
from .encoders import (
    NatureCNNDecoder,
    ObservationEncoder,
    distinct_rows,
    is_image_space,
    make_encoder,
)
from .observations import Obs


class ActOutput(NamedTuple):
    """What the agent did for one step of B envs."""

    action: Tensor  # [B, *action_shape]
    log_prob: Tensor  # [B]
    value: Tensor  # [B]
    state: Any  # the backbone's state after this step


class EvalOutput(NamedTuple):
    """Recomputed outputs for segments ``[C, N]`` (C chunks of N steps)."""

    log_prob: Tensor  # [C, N]
    entropy: Tensor  # [C, N]
    value: Tensor  # [C, N]


def _flatten_obs(obs: Obs, lead: int) -> tuple[Obs, tuple[int, ...]]:
    """Merge the first ``lead`` dims of every observation tensor into one batch dim."""
    if isinstance(obs, dict):
        flat = {k: _flatten_obs(v, lead)[0] for k, v in obs.items()}
        return flat, next(iter(obs.values())).shape[:lead]
    return obs.flatten(0, lead - 1), obs.shape[:lead]


class MemoryAgent(nn.Module):
    """Actor-critic with a memory backbone; the spaces choose encoder and action head.

    :param observation_space: a single env's observation space.
    :param action_space: a single env's action space.
    :param backbone: ``backbone(input_dim) -> MemoryBackbone``, called with the encoder's
        output size (e.g. ``lambda d: TransformerXL(TrXLConfig(input_dim=d, ...))``).
    :param encoder_dim: encoder output size (None: the encoder's default).
    :param encoder_dedupe: image encoders encode each distinct image of a batch once
        (None: on CPU only; see :class:`~trxl_rl.agents.encoders.NatureCNNEncoder`).
    :param encoder_max_pool: image encoders add a map of their channels' maxima over
        positions (see :class:`~trxl_rl.agents.encoders.NatureCNNEncoder`).
    :param reconstruction: add an image decoder for :meth:`reconstruction_loss` (image
        observations only).
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space,
                 backbone: Callable[[int], MemoryBackbone], encoder_dim: int | None = None,
                 encoder_dedupe: bool | None = None, encoder_max_pool: bool = False,
                 reconstruction: bool = False) -> None:
        super().__init__()
        self.encoder = make_encoder(observation_space, encoder_dim, encoder_dedupe,
                                    encoder_max_pool)
        self.decoder = None
        if reconstruction:
            if not is_image_space(observation_space):
                raise ValueError(
                    f"observation reconstruction needs an image observation space (uint8 "
                    f"(H, W, C) with high 255), got {type(observation_space).__name__} of "
                    f"shape {observation_space.shape} and dtype {observation_space.dtype}"
                )
            self.decoder = NatureCNNDecoder(observation_space, self.encoder.output_dim)
        self.memory = backbone(self.encoder.output_dim)
        dim = self.memory.output_dim
        self.policy_body = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.action_head = make_action_head(action_space, dim)
        self.value_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))
        nn.init.orthogonal_(self.value_head[-1].weight, gain=1.0)
        nn.init.zeros_(self.value_head[-1].bias)

    def initial_state(self, batch_size: int, **kwargs) -> Any:
        """Empty memory for ``batch_size`` envs (keyword options are the backbone's, e.g.
        ``memory_length`` of :meth:`trxl_rl.TransformerXL.initial_state`)."""
        return self.memory.initial_state(batch_size, **kwargs)

    def weights_changed(self) -> None:
        """Tell the encoder(s) and the backbone that the weights changed unseen by version
        counters (see :meth:`trxl_rl.memory.MemoryBackbone.weights_changed`): their caches
        (the image encoder's features, TrXL's keys and values) are rebuilt."""
        for module in self.modules():
            if isinstance(module, ObservationEncoder):
                module.weights_changed()
        self.memory.weights_changed()

    def _heads(self, features: Tensor) -> tuple[ActionDistribution, Tensor]:
        """features ``[B, D]`` -> (action distribution over B, values ``[B]``)."""
        return self.action_head(self.policy_body(features)), self.value_head(features)[..., 0]

    def step(self, obs: Obs, state: Any, episode_start: Tensor
             ) -> tuple[ActionDistribution, Tensor, Any]:
        """The policy at one step, before an action is chosen: obs ``[B, ...]``,
        episode_start ``[B]`` bool -> (action distribution over B, values ``[B]``, the
        backbone's state after this step). :meth:`act` samples from it; ``trxl_rl.export``
        traces it."""
        features, state = self.memory.step(self.encoder(obs), state, episode_start)
        dist, value = self._heads(features)
        return dist, value, state

    @torch.no_grad()
    def act(self, obs: Obs, state: Any, episode_start: Tensor,
            deterministic: bool = False) -> ActOutput:
        """One rollout step. obs ``[B, ...]``, episode_start ``[B]`` bool."""
        dist, value, state = self.step(obs, state, episode_start)
        action = dist.mode() if deterministic else dist.sample()
        return ActOutput(action, dist.log_prob(action), value, state)

    @torch.no_grad()
    def value(self, obs: Obs, state: Any, episode_start: Tensor) -> Tensor:
        """V(obs | memory) ``[B]`` without advancing the memory (the state is not returned)."""
        features, _ = self.memory.step(self.encoder(obs), state, episode_start)
        return self.value_head(features)[..., 0]

    def evaluate(self, obs: Obs, actions: Tensor, state: Any,
                 episode_start: Tensor) -> EvalOutput:
        """Recompute segments in parallel with the current weights.

        :param obs: ``[C, N, ...]`` observations of C chunks of N steps.
        :param actions: ``[C, N, *action_shape]`` actions taken.
        :param state: memory before each chunk (``C`` rows).
        :param episode_start: ``[C, N]`` bool.
        """
        flat, (c, n) = _flatten_obs(obs, 2)
        return self._evaluate_encoded(self.encoder(flat), actions, state, episode_start)

    def _evaluate_encoded(self, encoded: Tensor, actions: Tensor, state: Any,
                          episode_start: Tensor) -> EvalOutput:
        """:meth:`evaluate` from the encoder's output ``[C * N, E]``."""
        c, n = episode_start.shape
        features, _ = self.memory(encoded.unflatten(0, (c, n)), state, episode_start)
        dist, value = self._heads(features.flatten(0, 1))  # features: [C, N, D]
        log_prob = dist.log_prob(actions.flatten(0, 1))
        return EvalOutput(log_prob.view(c, n), dist.entropy().view(c, n), value.view(c, n))

    def evaluate_with_reconstruction(self, obs: Tensor, actions: Tensor, state: Any,
                                     episode_start: Tensor) -> tuple[EvalOutput, Tensor]:
        """:meth:`evaluate` and :meth:`reconstruction_loss` of the same segments of images
        ``[C, N, H, W, C]``, the same numbers up to float rounding, with one encoder pass:
        the CNN runs once on the distinct images, whose features both the memory (copied to
        the repeats) and the decoder read, also on a GPU (where :meth:`evaluate` alone runs the
        CNN on every image). Doing both apart found the distinct images twice and ran the CNN
        a second time on them: the pixel preset's update took 1.23-1.29x as long on a CPU."""
        self._check_decoder()
        images = obs.flatten(0, 1)
        first, inverse = distinct_rows(images)
        distinct = images[first]
        if self.encoder.dedupe is False:  # the CNN on every image, as the encoder would
            encoded = self.encoder.encode_all(images)
            distinct_features = encoded[first]
        else:
            distinct_features = self.encoder.encode_all(distinct)
            encoded = distinct_features[inverse]
        out = self._evaluate_encoded(encoded, actions, state, episode_start)
        return out, self._reconstruction_error(distinct_features, distinct)

    @torch.no_grad()
    def memory_diagnostics(self, obs: Obs, state: Any, episode_start: Tensor
                           ) -> dict[str, float]:
        """:meth:`trxl_rl.memory.MemoryBackbone.diagnostics` of segments ``[C, N, ...]`` (the
        arguments of :meth:`evaluate` without the actions)."""
        flat, (c, n) = _flatten_obs(obs, 2)
        x = self.encoder(flat).unflatten(0, (c, n))  # [C, N, E]
        return self.memory.diagnostics(x, state, episode_start)

    def gradient_norms(self) -> dict[str, Tensor]:
        """The gradient's L2 norm per part of the agent: ``encoder`` (and the image
        ``decoder`` if any), ``memory``, ``heads`` (policy and value); 0-dim tensors."""
        parts = {"encoder": [self.encoder, self.decoder], "memory": [self.memory],
                 "heads": [self.policy_body, self.action_head, self.value_head]}
        out = {}
        for name, modules in parts.items():
            grads = [p.grad for m in modules if m is not None for p in m.parameters()
                     if p.grad is not None]
            out[name] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) \
                if grads else torch.zeros(())
        return out

    def reconstruction_loss(self, obs: Tensor) -> Tensor:
        """Auxiliary loss: mean squared error of each *distinct* image of ``obs``
        ``[..., H, W, C]`` (uint8) decoded from its encoder features, pixels in [0, 1].

        Distinct images count once each, however often they repeat, so a rarely seen view
        (a cue object in an unusual place) weighs as much as the corridor seen every step; it
        also keeps the decoder's cost to the few distinct images of rendered grid worlds (a
        tenth of a minibatch in MiniGrid). Here the encoder runs on them again; the PPO update
        calls :meth:`evaluate_with_reconstruction`, which shares the policy's encoder pass. On
        a GPU finding them makes the host wait for the device once per minibatch (benchmark
        row ``b-recon`` there, before the pass was shared: 0.47x ``b``).
        """
        self._check_decoder()
        images = obs.flatten(0, obs.dim() - 4)
        images = images[distinct_rows(images)[0]]
        return self._reconstruction_error(self.encoder.encode_all(images), images)

    def _check_decoder(self) -> None:
        if self.decoder is None:
            raise RuntimeError("this agent has no image decoder: build it with "
                               "reconstruction=True (config ppo.reconstruction_coef > 0)")

    def _reconstruction_error(self, features: Tensor, images: Tensor) -> Tensor:
        """Mean squared error of ``images`` ``[B, H, W, C]`` (uint8) decoded from their
        encoder ``features`` ``[B, E]``, pixels in [0, 1]."""
        decoded = self.decoder(features)
        return (decoded - images.float() / 255.0).square().mean()


def build_agent(cfg, observation_space: spaces.Space, action_space: spaces.Space
                ) -> MemoryAgent:
    """The agent a :class:`trxl_rl.config.TrainConfig` describes, for single-env spaces.

    :raises ValueError: an unknown backbone, a bad backbone field (the message names
        ``model.<section>``), or a space no encoder or action head supports.
    """
    model = cfg.model
    section, fields = model.backbone_fields()

    def backbone(input_dim: int) -> MemoryBackbone:
        try:
            return make_backbone(model.backbone, input_dim, fields)
        except (ValueError, TypeError) as err:
            known = model.backbone in BACKBONES
            where = f"model.{section}" if known and section else "model.backbone"
            raise ValueError(f"{where}: {err}") from None

    return MemoryAgent(observation_space, action_space, backbone, model.encoder_dim,
                       model.encoder_dedupe, model.encoder_max_pool,
                       reconstruction=cfg.ppo.reconstruction_coef > 0)
