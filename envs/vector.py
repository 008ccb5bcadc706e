"""Vector envs in SAME_STEP autoreset mode, and readers for their step infos."""

from __future__ import annotations

import functools
import os
import signal
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv
from gymnasium.wrappers.vector import RecordEpisodeStatistics

from .make import make_env
from .replay import EpisodeReplay

VECTORIZATIONS = ("sync", "async")


def make_vector_env(
    env_id: str, num_envs: int, vectorization: str = "sync", replay: bool = False,
    **env_kwargs: Any
) -> VectorEnv:
    """``num_envs`` copies of ``make_env(env_id, **env_kwargs)`` in one vector env.

    :param vectorization: ``"sync"`` (one process) or ``"async"`` (one subprocess per env).
        Async workers ignore SIGINT and SIGTERM: the main process decides when to stop (a
        Ctrl+C reaches the whole process group) and closes them.
    :param replay: wrap every env in :class:`~trxl_rl.envs.replay.EpisodeReplay` (seeded
        episodes, recorded actions), so that :func:`~trxl_rl.envs.replay.vector_env_state`
        can save the envs as plain data and restore them exactly.
    :return: a ``SyncVectorEnv``/``AsyncVectorEnv`` with ``AutoresetMode.SAME_STEP`` inside
        gymnasium's vector ``RecordEpisodeStatistics``. On a step where env ``i`` ends its
        episode, ``obs[i]`` is already the first obs of its next episode and the finished
        episode's last obs is in ``infos["final_obs"][i]`` (see :func:`final_observations`);
        episode statistics are read with :func:`completed_episodes`.

    Seeding is the caller's job: ``envs.reset(seed=seed)`` seeds env ``i`` with ``seed + i``
    (later autoresets continue each env's own generator; with ``replay=True`` episode ``k``
    of env ``i`` is reset with ``episode_seed(seed + i, k)``); seed ``envs.action_space``
    separately if actions are sampled from it. Avoid ``reset(options={"reset_mask": ...})``:
    in gymnasium 1.4 the inner vector env pops ``reset_mask`` before
    ``RecordEpisodeStatistics`` sees it, so the statistics of *all* envs restart.
    """
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    if vectorization not in VECTORIZATIONS:
        raise ValueError(f"vectorization must be one of {VECTORIZATIONS}, got {vectorization!r}")
    make = _make_replayable if replay else make_env
    if vectorization == "async":
        make = functools.partial(_in_worker, os.getpid(), make)
    env_fns = [functools.partial(make, env_id, **env_kwargs) for _ in range(int(num_envs))]
    vector_cls = SyncVectorEnv if vectorization == "sync" else AsyncVectorEnv
    return RecordEpisodeStatistics(vector_cls(env_fns, autoreset_mode=AutoresetMode.SAME_STEP))


def _make_replayable(env_id: str, **env_kwargs: Any) -> EpisodeReplay:
    return EpisodeReplay(make_env(env_id, **env_kwargs))


def _in_worker(main_pid: int, make: Any, *args: Any, **kwargs: Any) -> gym.Env:
    """Build an env; inside an async worker (not in the main process, where AsyncVectorEnv
    also builds one to read the spaces) ignore SIGINT/SIGTERM first."""
    if os.getpid() != main_pid:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return make(*args, **kwargs)


# Layout of a vector step's infos, verified with gymnasium 1.4.0 for SyncVectorEnv and
# AsyncVectorEnv (identical) in SAME_STEP mode under vector RecordEpisodeStatistics, on a
# step where env 1 of 3 ended its episode:
#   infos["episode"]     = {"r": float64 [n], "l": int64 [n], "t": float64 [n]}, 0 where not done
#   infos["_episode"]    = bool [n], True for envs whose episode ended on this step
#   infos["final_obs"]   = object array [n]: the finished episode's last obs, None elsewhere
#   infos["_final_obs"]  = bool [n]
#   infos["final_info"]  = dict of the final step's info keys, each batched to [n] with its
#                          own mask, e.g. {"success": bool [n], "_success": bool [n]}, or {}
#   infos["_final_info"] = bool [n]
# None of these keys is present on a step where no episode ended. The reset info of the
# new episode is merged into infos itself (top level), not into final_info (read in the
# sources of both vector envs). An env whose final info has no "success" leaves
# final_info == {}.


def completed_episodes(infos: dict[str, Any]) -> dict[str, np.ndarray]:
    """Episodes that ended on this vector step (SAME_STEP infos of :func:`make_vector_env`).

    :return: ``{"env": int64 [k], "return": float64 [k], "length": int64 [k],
        "success": float64 [k]}`` for the ``k`` ended episodes ordered by env index;
        ``success`` is 1.0/0.0, or nan where the env defines no success; plus
        ``"metrics/<name>": float64 [k]`` (nan where an episode lacks it) for every episode
        metric an ended episode reports (:class:`~trxl_rl.envs.wrappers.RecordEpisodeMetrics`).
    """
    if "_episode" not in infos:
        empty = np.zeros(0)
        return {
            "env": empty.astype(np.int64),
            "return": empty,
            "length": empty.astype(np.int64),
            "success": empty,
        }
    env = np.flatnonzero(infos["_episode"])
    success = np.full(len(env), np.nan)
    final_info = infos.get("final_info", {})
    if "success" in final_info:
        has_success = final_info["_success"][env]
        success[has_success] = final_info["success"][env][has_success].astype(np.float64)
    out = {
        "env": env.astype(np.int64),
        "return": infos["episode"]["r"][env].astype(np.float64),
        "length": infos["episode"]["l"][env].astype(np.int64),
        "success": success,
    }
    metrics = final_info.get("metrics", {})  # name: [n] with its mask "_name", as success
    for name in metrics:
        if not name.startswith("_"):
            values = np.full(len(env), np.nan)
            has = metrics[f"_{name}"][env]
            values[has] = metrics[name][env][has].astype(np.float64)
            out[f"metrics/{name}"] = values
    return out


def final_observations(
    infos: dict[str, Any], done: np.ndarray, space: gym.Space | None = None
) -> np.ndarray | dict[str, Any]:
    """Last observations of the episodes that ended where ``done`` (bool ``[n]``) is True.

    :param infos: infos of one SAME_STEP vector step; ``infos["final_obs"]`` holds them.
    :param done: bool ``[n]``, e.g. ``terminated | truncated`` or ``truncated`` alone.
    :param space: the vector env's ``single_observation_space``. With it the batch is built
        exactly as the vector env batches observations (any space, also for ``k = 0``).
        Without it, arrays are stacked (nested dicts of arrays for Dict observations), and
        ``k = 0`` gives ``np.empty((0,))`` since the layout cannot be known.
    :return: the batch ``[k, ...]`` (or a dict of such arrays), ordered by env index.
    :raises ValueError: an env marked done has no final observation in ``infos``.
    """
    done = np.asarray(done, dtype=bool)
    env = np.flatnonzero(done)
    available = infos.get("_final_obs", np.zeros(len(done), dtype=bool))
    missing = env[~available[env]]
    if len(missing):
        raise ValueError(
            f"done marks envs {missing.tolist()} whose episode did not end on this step "
            "(no infos['final_obs'] for them)"
        )
    items = [infos["final_obs"][i] for i in env]
    if space is not None:
        from gymnasium.vector.utils import concatenate, create_empty_array

        batch = create_empty_array(space, n=len(items))
        return concatenate(space, items, batch) if items else batch
    if not items:
        return np.empty((0,))
    return _stack(items)


def _stack(items: list[Any]) -> np.ndarray | dict[str, Any]:
    """Stack per-env observations (arrays or nested dicts of arrays) into one batch."""
    if isinstance(items[0], dict):
        return {key: _stack([item[key] for item in items]) for key in items[0]}
    return np.stack([np.asarray(item) for item in items])
