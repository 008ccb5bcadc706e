"""Checkpoints: atomic writes, safe loads (``torch.load(weights_only=True)``), plain metadata.

A checkpoint is one ``.pt`` file holding a dict of tensors and plain data only, so loading
one never runs code from the file:

- ``format_version`` (int), ``model`` and ``optimizer`` state dicts,
- ``config`` (the resolved :class:`trxl_rl.config.TrainConfig` as a dict),
- ``spaces`` (observation and action spaces as plain dicts, see :func:`space_to_dict`),
- ``counters`` (``global_step``, ``update``),
- since format 2, the training state that makes ``--resume`` exact (see
  :mod:`trxl_rl.resume`): ``rng`` (torch / CUDA / numpy / python states), ``shuffle`` (the
  minibatch generator), ``carry`` (each env's current observation, episode-start flag and
  memory) and ``envs`` (each env as seed + actions, see :mod:`trxl_rl.envs.replay`).
- since format 3, the config names the memory backbone (``model.backbone``, with the
  Transformer-XL's fields in ``model.trxl``) and ``carry`` holds each env's memory as the
  backbone's history (records and valid slots, see :class:`trxl_rl.memory.MemoryBackbone`).
- since format 4, ``world_size``, the number of ranks of the run (1 for a single process,
  K for ``torchrun --nproc-per-node K``), and ``other_ranks``, the training state (``rng``,
  ``shuffle``, ``carry``, ``envs``) of ranks 1 .. K-1 in rank order; the top-level training
  state is rank 0's. Model and optimizer are shared by all ranks. Formats 2 and 3 are
  single-process runs.
- optionally (written since 2026-12-03, any format 4 file may lack it), ``timing``: the
  run's training seconds so far and its :class:`trxl_rl.metrics.Threshold` state, so that a
  resumed run counts time to threshold on. Wall-clock is not part of the exact training
  state: two runs that are equal bit for bit differ here.
- optionally (any format 4 file may lack them; read as their starting values),
  ``learning_rate``: the :class:`trxl_rl.ppo.LearningRate` factor, and (written since
  2026-12-04) ``stop_when_solved``: the :class:`trxl_rl.metrics.StopWhenSolved` state (the
  updates in a row at ``stop_at`` so far and, since 2026-12-08, its greedy checks: a file
  without them had none), so that a resumed run stops where it would have.

Format 1 files (written before the training state was added) load for evaluation and
:func:`load_agent`, but cannot be resumed. Formats 1 and 2 (Transformer-XL only, its fields
directly under ``model``) are read as ``model.backbone: trxl``.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from trxl_rl.agents import MemoryAgent, build_agent
from trxl_rl.config import (
    TRXL_FIELDS_BEFORE_SECTIONS,
    ConfigError,
    TrainConfig,
    build_config,
)

FORMAT_VERSION = 4
READABLE_FORMATS = (1, 2, 3, 4)
RESUMABLE_FORMATS = (2, 3, 4)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or incompatible; the message is one line."""


def space_to_dict(space: spaces.Space) -> dict:
    """A gymnasium space as plain data (lists, strings, numbers)."""
    if isinstance(space, spaces.Box):
        return {"type": "Box", "low": space.low.tolist(), "high": space.high.tolist(),
                "shape": list(space.shape), "dtype": str(space.dtype)}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(),
                "start": space.start.tolist()}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_dict(v) for k, v in space.spaces.items()}}
    raise ValueError(f"cannot store observation/action space {space} in a checkpoint")


def space_from_dict(data: dict) -> spaces.Space:
    """Inverse of :func:`space_to_dict`."""
    kind = data["type"]
    if kind == "Box":
        dtype = np.dtype(data["dtype"])
        return spaces.Box(np.array(data["low"], dtype=dtype), np.array(data["high"], dtype=dtype),
                          shape=tuple(data["shape"]), dtype=dtype)
    if kind == "Discrete":
        return spaces.Discrete(data["n"], start=data["start"])
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(data["nvec"], start=data["start"])
    if kind == "MultiBinary":
        return spaces.MultiBinary(data["n"])
    if kind == "Dict":
        return spaces.Dict({k: space_from_dict(v) for k, v in data["spaces"].items()})
    raise ValueError(f"unknown space type {kind!r}")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus ``format_version``) atomically: temp file, fsync, rename.

    A process killed while saving leaves the previous file at ``path`` untouched (and, after
    SIGKILL, a hidden ``.NAME.PID.tmp`` file, removed by the next save into that folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files of saves whose process no longer runs."""
    for tmp in directory.glob(".*.pt.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


REQUIRED_KEYS = ("format_version", "model", "config", "spaces", "counters")
TRAINING_STATE_KEYS = ("optimizer", "rng", "shuffle", "carry", "envs")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    resume: bool = False) -> dict:
    """Load and check a checkpoint; no code from the file is executed.

    :param path: a ``.pt`` file, or a run directory (its newest checkpoint is used).
    :param resume: also require the training state that ``--resume`` needs.
    :return: the checkpoint dict, plus ``path`` (the file read).
    :raises CheckpointError: missing, not a checkpoint, truncated/corrupt, another format
        version, or (with ``resume``) no training state. The message is one line that names
        the file and what to do.
    """
    path = Path(path)
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"no checkpoint (update_*.pt) found in {str(path)!r}")
        path = newest
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(ZIP_MAGIC))
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err.strerror}") from None
    if magic != ZIP_MAGIC:
        raise CheckpointError(
            f"{str(path)!r} is not a trxl_rl checkpoint (not a file written by torch.save)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(
                f"{str(path)!r} holds Python objects other than tensors and plain data; "
                "trxl_rl does not load such files (it would have to run code from them)"
            ) from None
        raise CheckpointError(_unreadable(path, err)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            IndexError, TypeError) as err:
        raise CheckpointError(_unreadable(path, err)) from None
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        raise CheckpointError(f"{str(path)!r} is not a trxl_rl checkpoint (keys missing)")
    version = data["format_version"]
    if version not in READABLE_FORMATS:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {version!r}, this trxl_rl reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}; use the trxl_rl version that wrote it"
        )
    if resume and (version not in RESUMABLE_FORMATS
                   or any(key not in data for key in TRAINING_STATE_KEYS)):
        raise CheckpointError(
            f"{str(path)!r} (format {version}) holds no training state to resume from; it can "
            "still be evaluated (python -m trxl_rl.evaluate)"
        )
    data["path"] = str(path)
    return data


def _unreadable(path: Path, err: BaseException) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{str(path)!r} is not a readable trxl_rl checkpoint (truncated or corrupt?): "
            f"{reason[:160]}")


def describe_space(data: dict) -> str:
    """One-line summary of a space in :func:`space_to_dict` form, for error messages."""
    kind = data["type"]
    if kind == "Box":
        return f"Box(shape={tuple(data['shape'])}, dtype={data['dtype']})"
    if kind == "Discrete":
        return f"Discrete({data['n']})" if not data["start"] else \
            f"Discrete({data['n']}, start={data['start']})"
    if kind == "MultiDiscrete":
        return f"MultiDiscrete({data['nvec']})"
    if kind == "MultiBinary":
        return f"MultiBinary({data['n']})"
    if kind == "Dict":
        inner = ", ".join(f"{k}: {describe_space(v)}" for k, v in data["spaces"].items())
        return f"Dict({inner})"
    return kind


def check_spaces(checkpoint: dict, observation_space: spaces.Space,
                 action_space: spaces.Space, env_id: str) -> None:
    """Raise :class:`CheckpointError` unless the env's spaces equal those the policy was
    trained on (shapes, dtypes and bounds)."""
    for name, space in (("observation", observation_space), ("action", action_space)):
        trained, found = checkpoint["spaces"][name], space_to_dict(space)
        if trained != found:
            what, other = describe_space(found), describe_space(trained)
            if what == other:
                what, other = f"{what} with other bounds", f"{other} with its own bounds"
            raise CheckpointError(
                f"env {env_id!r} does not fit the checkpoint: its {name} space is {what}, "
                f"the policy was trained on {other}"
            )


def config_from_checkpoint(checkpoint: dict) -> TrainConfig:
    """The :class:`trxl_rl.config.TrainConfig` a checkpoint was trained with."""
    config = checkpoint["config"]
    model = config.get("model")
    if checkpoint["format_version"] < 3 and isinstance(model, dict):
        model = dict(model)
        trxl = {key: model.pop(key) for key in TRXL_FIELDS_BEFORE_SECTIONS if key in model}
        # Before format 3 a missing encoder_dim meant the encoder's default.
        model.setdefault("encoder_dim", None)
        config = {**config, "model": {**model, "backbone": "trxl", "trxl": trxl}}
    elif isinstance(model, dict) and "gtrxl" in model:
        # Written before gtrxl read the trxl section (2026-11-29): its own section then.
        model = dict(model)
        gtrxl = model.pop("gtrxl")
        if model.get("backbone") == "gtrxl":
            model["trxl"] = gtrxl
        config = {**config, "model": model}
    try:
        return build_config(config)
    except (ConfigError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{checkpoint.get('path', 'checkpoint')!r} holds a config this trxl_rl cannot "
            f"read: {err}"
        ) from None


def agent_from_checkpoint(checkpoint: dict, device: str | torch.device = "cpu"
                          ) -> MemoryAgent:
    """Rebuild the trained agent (eval mode, on ``device``) from a loaded checkpoint."""
    cfg = config_from_checkpoint(checkpoint)
    obs_space = space_from_dict(checkpoint["spaces"]["observation"])
    act_space = space_from_dict(checkpoint["spaces"]["action"])
    try:
        agent = build_agent(cfg, obs_space, act_space)
    except ValueError as err:
        raise CheckpointError(f"{checkpoint.get('path', 'checkpoint')!r}: {err}") from None
    load_weights(agent, checkpoint)
    return agent.to(device).eval()


def load_weights(agent: torch.nn.Module, checkpoint: dict) -> None:
    """Load the checkpoint's model weights into ``agent``.

    :raises CheckpointError: they do not fit (naming the mismatching parameters).
    """
    try:
        agent.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()[1:] if line.strip()]
        raise CheckpointError(
            f"{checkpoint.get('path', 'checkpoint')!r}: weights do not fit the model its config "
            f"describes (saved by another version of trxl_rl?): {' '.join(lines)[:240]}"
        ) from None


def load_agent(path: str | Path, device: str | torch.device = "cpu") -> MemoryAgent:
    """A trained policy, ready to act: :class:`trxl_rl.agents.MemoryAgent` in eval mode.

    >>> agent = load_agent("runs/my_run")                # newest checkpoint of a run
    >>> state = agent.initial_state(num_envs)            # or memory_length=M2 (not "learned")
    >>> out = agent.act(obs, state, episode_start)       # out.action, out.value, out.state

    The agent has ``observation_space``, ``action_space`` (those it was trained on) and
    ``train_config`` (the :class:`trxl_rl.config.TrainConfig`) attributes.

    :param path: a checkpoint file, or a run directory (its newest checkpoint).
    :raises CheckpointError: see :func:`load_checkpoint`.
    """
    checkpoint = load_checkpoint(path, map_location="cpu")
    agent = agent_from_checkpoint(checkpoint, device)
    agent.observation_space = space_from_dict(checkpoint["spaces"]["observation"])
    agent.action_space = space_from_dict(checkpoint["spaces"]["action"])
    agent.train_config = config_from_checkpoint(checkpoint)
    return agent


def checkpoint_name(update: int) -> str:
    return f"update_{update:07d}.pt"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory`` (or its ``checkpoints/`` subfolder)."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    found = sorted(directory.glob("update_*.pt"))
    return found[-1] if found else None


def rng_state() -> dict:
    """Global RNG states as plain data / tensors (loadable with ``weights_only=True``):
    torch CPU, every CUDA device torch has initialised, numpy, python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output. CUDA states are restored where this machine has as
    many CUDA devices as the one that saved them."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
