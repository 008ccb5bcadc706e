"""Resuming a training run exactly, and stopping one cleanly on SIGINT / SIGTERM.

Weights and optimizer state are not enough for a resumed run to continue as if it had never
stopped. A checkpoint written by the trainer also holds (:func:`training_state`):

- the random generators: torch (CPU and CUDA; action sampling), numpy, python, and the
  trainer's minibatch ``shuffle`` generator;
- the rollout carry: every env's current observation, its episode-start flag and its
  memory, as the backbone's history (:meth:`~trxl_rl.memory.MemoryBackbone.history`; for the
  Transformer-XL the hidden states, valid slots and positions; its key/value caches are
  not stored, they are rebuilt from the hidden states);
- the environments, as plain data: each env's episode seed and the actions taken in its
  current episode (:mod:`trxl_rl.envs.replay`), plus the running episode returns and lengths.

A data-parallel run (:mod:`trxl_rl.distributed`) has one such training state per rank: rank 0
gathers them and writes them all (``other_ranks``); each rank restores its own
(:func:`rank_view`), and only with as many ranks as wrote them (:func:`check_world_size`).

:func:`restore_training` puts all of it back; on CPU the resumed run then computes exactly
what the uninterrupted run would have (tested bit for bit). The environments are rebuilt by
replaying their current episode, which requires ``reset(seed=...)`` and ``step`` to be
deterministic (gymnasium's contract); an env that replays differently is reported and the
run continues from the state the env actually reached.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trxl_rl.agents.observations import obs_to_tensor, tree_map
from trxl_rl.checkpoint import (
    CheckpointError,
    config_from_checkpoint,
    load_weights,
    rng_state,
    set_rng_state,
)
from trxl_rl.config import ConfigError, TrainConfig, build_config, config_to_dict
from trxl_rl.distributed import launch_command
from trxl_rl.memory import MemoryBackbone, MemoryState

# Config keys that may change when a run is resumed: none of them changes what is learned,
# except total_steps, which stretches the linear schedules from the resume point on; stop_at,
# stop_updates and stop_greedy_episodes change only where training ends (``--stop_at null``
# continues a run that stopped solved).
RESUME_OVERRIDABLE = ("total_steps", "stop_at", "stop_updates", "stop_greedy_episodes",
                      "device", "threads", "progress", "checkpoint_every", "eval_episodes",
                      "eval_deterministic", "track", "wandb_project_name", "wandb_entity")


def _plain(tree: Any) -> Any:
    """numpy arrays -> tensors, recursively (``weights_only`` loads no numpy arrays)."""
    if isinstance(tree, dict):
        return {key: _plain(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(value) for value in tree]
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree))
    return tree


def _numpy(tree: Any) -> Any:
    """Inverse of :func:`_plain`."""
    if isinstance(tree, dict):
        return {key: _numpy(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_numpy(value) for value in tree]
    if isinstance(tree, Tensor):
        return tree.numpy()
    return tree


def training_state(envs, obs, backbone: MemoryBackbone, state: Any, episode_start: Tensor,
                   shuffle: torch.Generator) -> dict[str, Any]:
    """Everything besides model and optimizer that the next update depends on.

    :param envs: the trainer's vector env (built with ``make_vector_env(..., replay=True)``).
    :param obs: the batched observation the next rollout starts from (numpy, as the vector
        env returned it).
    :param backbone: the agent's memory; ``state``: every env's memory state (B rows);
        ``episode_start``: ``[B]`` bool.
    :param shuffle: the minibatch generator of the PPO update.
    """
    from trxl_rl.envs import vector_env_state

    cpu = torch.device("cpu")
    records, valid = backbone.history(state)
    return {
        "rng": rng_state(),
        "shuffle": shuffle.get_state(),
        "carry": {
            "obs": tree_map(lambda t: t.clone(), obs_to_tensor(obs, cpu)),
            "episode_start": episode_start.cpu(),
            "memory": {"records": {name: value.cpu() for name, value in records.items()},
                       "valid": valid.cpu()},
        },
        "envs": _plain(vector_env_state(envs)),
    }


def checkpoint_world_size(checkpoint: dict) -> int:
    """The number of ranks of the run that wrote ``checkpoint`` (1 before format 4)."""
    return int(checkpoint.get("world_size", 1))


def check_world_size(checkpoint: dict, world_size: int) -> None:
    """:raises CheckpointError: the checkpoint was written by a run of another number of
    ranks (it holds each rank's envs, memory and generators, which cannot be split or
    merged)."""
    saved = checkpoint_world_size(checkpoint)
    if saved == world_size:
        return
    def runs(k: int) -> str:
        return "a single process" if k == 1 else f"{k} ranks"
    command = launch_command(saved)
    raise CheckpointError(
        f"{checkpoint.get('path', 'checkpoint')!r} was written by {runs(saved)} and this run "
        f"has {runs(world_size)}: resume it with {runs(saved)} ({command} --resume RUN)")


def rank_view(checkpoint: dict, rank: int) -> dict:
    """``checkpoint`` with rank ``rank``'s training state in place of rank 0's."""
    if rank == 0:
        return checkpoint
    return {**checkpoint, **checkpoint["other_ranks"][rank - 1]}


def _obs_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_obs_equal(a[k], b[k]) for k in a)
    return np.array_equal(np.asarray(a), np.asarray(b))


def restore_training(checkpoint: dict, agent: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     shuffle: torch.Generator, envs, device: torch.device
                     ) -> tuple[Any, Any, Tensor]:
    """Load model, optimizer, generators and environments from a checkpoint written by the
    trainer (after ``envs.reset``); returns the carry ``(obs, state, episode_start)``."""
    from gymnasium.vector.utils import concatenate, create_empty_array

    from trxl_rl.envs import ReplayError, restore_vector_env

    load_weights(agent, checkpoint)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"{checkpoint.get('path', 'checkpoint')!r}: its optimizer state does not fit the "
            f"model ({err}); it can be evaluated (python -m trxl_rl.evaluate) but not resumed"
        ) from None
    shuffle.set_state(checkpoint["shuffle"])
    carry = checkpoint["carry"]
    obs = _numpy(carry["obs"])
    space = envs.single_observation_space
    try:
        replayed = restore_vector_env(envs, _numpy(checkpoint["envs"]))
    except ReplayError as err:
        raise CheckpointError(f"cannot restore the environments: {err}") from None
    replayed = concatenate(space, replayed, create_empty_array(space, n=len(replayed)))
    if not _obs_equal(replayed, obs):
        warnings.warn("the environments did not replay to the observations saved in the "
                      "checkpoint (nondeterministic env?); the resumed run continues from "
                      "where they are, but is not identical to an uninterrupted one",
                      stacklevel=2)
        obs = replayed
    state = _memory_state(agent.memory, carry["memory"], device)
    episode_start = carry["episode_start"].to(device)
    set_rng_state(checkpoint["rng"])
    return obs, state, episode_start


def _memory_state(backbone: MemoryBackbone, memory: dict, device: torch.device) -> Any:
    """The carried memory of :func:`training_state`; format 2 stored a Transformer-XL's
    ``MemoryState`` fields themselves."""
    if "records" not in memory:
        return MemoryState(hidden=memory["hidden"].to(device), valid=memory["valid"].to(device),
                           position=memory["position"].to(device))
    records = {name: value.to(device) for name, value in memory["records"].items()}
    return backbone.state_from_history(records, memory["valid"].to(device))


def run_dir_of(checkpoint_path: str | Path) -> Path:
    """The run directory of a checkpoint file (``<run>/checkpoints/update_*.pt``)."""
    path = Path(checkpoint_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def resume_config(checkpoint: dict, overrides: dict[str, Any]) -> TrainConfig:
    """The checkpoint's config, writing into the run directory the checkpoint is in, with the
    few ``overrides`` a resumed run may change (:data:`RESUME_OVERRIDABLE`).

    :raises ConfigError: an override of another key.
    """
    refused = sorted(key for key in overrides if key not in RESUME_OVERRIDABLE)
    if refused:
        raise ConfigError(
            f"--resume continues a run with the config it was started with; it cannot change "
            f"{', '.join(refused)} (allowed: {', '.join(RESUME_OVERRIDABLE)})"
        )
    cfg = build_config(config_to_dict(config_from_checkpoint(checkpoint)), overrides)
    run_dir = run_dir_of(checkpoint["path"])
    cfg.log_dir, cfg.run_name = str(run_dir.parent), run_dir.name
    return cfg.validate()


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint.

    :param signum: the signal; :attr:`exit_code` is the shell's ``128 + signum`` (130 for
        SIGINT, 143 for SIGTERM).
    :param checkpoint: the checkpoint written just before stopping.
    """

    def __init__(self, signum: int, checkpoint: Path) -> None:
        self.signum, self.checkpoint = signum, Path(checkpoint)
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after saving {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Turn the first SIGINT / SIGTERM into a request (:attr:`signum`) that the training loop
    honours after the current update; a second one acts as usual (SIGINT raises
    ``KeyboardInterrupt``, SIGTERM ends the process), leaving the previous checkpoint.

    Handlers can only be installed from the main thread; elsewhere this does nothing.

    :param announce: print what happens on stderr when the signal arrives (the other ranks
        of a data-parallel run stay quiet).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.uninstall()
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this update, "
                  "then stopping (send it again to stop at once without saving)",
                  file=sys.stderr)
