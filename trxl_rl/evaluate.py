"""Evaluate a policy: success rate (with a 95% confidence interval), return and length.

``python -m trxl_rl.evaluate CHECKPOINT`` runs a saved policy; :func:`run_episodes` is what
the trainer uses for its final evaluation on seeds not used in training.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from trxl_rl.envs import completed_episodes, make_vector_env
from trxl_rl.rollout import obs_to_tensor


def run_episodes(agent, env_id: str, env_kwargs: dict, episodes: int, seed: int,
                 device: torch.device, deterministic: bool = False, num_envs: int = 16,
                 memory_length: int | None = None) -> dict[str, np.ndarray]:
    """Run exactly ``episodes`` episodes (split evenly over ``num_envs`` envs, so short
    episodes are not over-represented) with the agent's memory reset at every episode start.

    :return: per-episode arrays ``return``, ``length``, ``success`` (nan where undefined).
    """
    num_envs = max(1, min(num_envs, episodes))
    quota = np.full(num_envs, episodes // num_envs)
    quota[: episodes % num_envs] += 1
    envs = make_vector_env(env_id, num_envs, **env_kwargs)
    try:
        obs, _ = envs.reset(seed=seed)
        state = agent.initial_state(num_envs, memory_length=memory_length)
        episode_start = torch.ones(num_envs, dtype=torch.bool, device=device)
        done_count = np.zeros(num_envs, dtype=int)
        results: dict[str, list] = {"return": [], "length": [], "success": []}
        while (done_count < quota).any():
            out = agent.act(obs_to_tensor(obs, device), state, episode_start, deterministic)
            state = out.state
            obs, _, terminated, truncated, infos = envs.step(out.action.cpu().numpy())
            episode_start = torch.as_tensor(terminated | truncated, device=device)
            finished = completed_episodes(infos)
            for i, env in enumerate(finished["env"]):
                if done_count[env] < quota[env]:
                    done_count[env] += 1
                    for key in results:
                        results[key].append(finished[key][i])
    finally:
        envs.close()
    return {key: np.asarray(values, dtype=np.float64) for key, values in results.items()}


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(results: dict[str, np.ndarray]) -> dict[str, Any]:
    """Plain-data summary of :func:`run_episodes` output."""
    n = len(results["return"])
    success = results["success"]
    defined = success[~np.isnan(success)]
    rate = float(defined.mean()) if len(defined) else float("nan")
    low, high = wilson_interval(float(defined.sum()), len(defined)) if len(defined) \
        else (float("nan"), float("nan"))
    return {
        "episodes": n,
        "success_rate": rate,
        "success_ci95": [low, high],
        "return_mean": float(results["return"].mean()) if n else float("nan"),
        "return_median": float(np.median(results["return"])) if n else float("nan"),
        "length_mean": float(results["length"].mean()) if n else float("nan"),
        "length_median": float(np.median(results["length"])) if n else float("nan"),
    }
