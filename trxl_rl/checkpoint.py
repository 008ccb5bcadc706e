"""Checkpoints: atomic writes, safe loads (``torch.load(weights_only=True)``), plain metadata.

A checkpoint is one ``.pt`` file holding a dict of tensors and plain data only:

- ``format_version`` (int), ``model`` and ``optimizer`` state dicts,
- ``config`` (the resolved :class:`trxl_rl.config.TrainConfig` as a dict),
- ``spaces`` (observation and action spaces as plain dicts, see :func:`space_to_dict`),
- ``counters`` (``global_step``, ``update``) and ``rng`` (torch / numpy / python states).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

FORMAT_VERSION = 1


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

    A process killed while saving leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


REQUIRED_KEYS = ("format_version", "model", "config", "spaces", "counters")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint; no code from the file is executed.

    :raises CheckpointError: missing, not a checkpoint, truncated/corrupt, or another format
        version. The message names the file and what to do.
    """
    path = Path(path)
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"no checkpoint (*.pt) found in {str(path)!r}")
        path = newest
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError,
            ValueError, KeyError, IndexError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a readable trxl_rl checkpoint (truncated or corrupt?): "
            f"{reason[:200]}"
        ) from None
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        raise CheckpointError(f"{str(path)!r} is not a trxl_rl checkpoint (keys missing)")
    if data["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {data['format_version']}, this trxl_rl reads "
            f"format {FORMAT_VERSION}; use the trxl_rl version that wrote it"
        )
    data["path"] = str(path)
    return data


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
    """Global RNG states as plain data / tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    import random

    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
