"""Greedy against sampled actions of a trained run with a Gaussian head: where does the mean
lose? (the probe of benchmarks/README.md, "Where TrXL loses": PositionOnlyPendulumEasy)

    python docs/memory_benchmark/probes/pendulum_gaussian/greedy_vs_sampled.py RUN [EPISODES]

Mean return over EPISODES (default 100) unseen episodes (the trainer's evaluation seeds) for
three policies: ``greedy`` (the Gaussian mean; the env wrapper clips it to the bounds),
``sampled``, and ``expected_clipped``, the expected clipped action E[clip(a)] (what sampling
sends to the env on average). Also the policy's standard deviation and, over the greedy
episodes, how often the mean lies outside the bounds and its quantiles. Prints JSON.
"""

import json
import math
import sys

import numpy as np
import torch

import trxl_rl
from trxl_rl.agents.distributions import GaussianDistribution
from trxl_rl.envs import make_env
from trxl_rl.evaluate import EVAL_SEED_OFFSET, run_episodes


def normal_pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def main(run: str, episodes: int) -> dict:
    agent = trxl_rl.load_agent(run)
    cfg = agent.train_config
    space = make_env(cfg.env.id, **cfg.env.kwargs).action_space
    low, high = float(space.low.min()), float(space.high.max())
    seen: dict[str, list[torch.Tensor]] = {"mean": [], "std": []}
    mode = GaussianDistribution.mode

    def recording_mode(self):
        seen["mean"].append(self.mean.flatten().clone())
        seen["std"].append(self.log_std.exp().flatten().clone())
        return mode(self)

    def expected_clipped(self):
        mu, sigma = self.mean, self.log_std.exp()
        a, b = (low - mu) / sigma, (high - mu) / sigma
        normal = torch.distributions.Normal(0.0, 1.0)
        pa, pb = normal.cdf(a), normal.cdf(b)
        return (low * pa + high * (1 - pb) + mu * (pb - pa)
                + sigma * (normal_pdf(a) - normal_pdf(b)))

    out: dict = {}
    policies = (("greedy", recording_mode, True), ("sampled", mode, False),
                ("expected_clipped", expected_clipped, True))
    try:
        for name, policy_mode, deterministic in policies:
            GaussianDistribution.mode = policy_mode
            torch.manual_seed(0)
            result = run_episodes(agent, cfg.env.id, cfg.env.kwargs, episodes,
                                  cfg.seed + EVAL_SEED_OFFSET, torch.device("cpu"),
                                  deterministic=deterministic)
            out[name] = float(np.mean(result["return"]))
    finally:
        GaussianDistribution.mode = mode
    means = torch.cat(seen["mean"])
    out["std"] = float(torch.cat(seen["std"]).mean())
    out["mean_outside_bounds"] = float(((means < low) | (means > high)).float().mean())
    out["mean_abs"] = float(means.abs().mean())
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    out["mean_quantiles_5_25_50_75_95"] = torch.quantile(means, quantiles).tolist()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100),
                     indent=1))
