"""What decides a RepeatFirstMedium episode: the policy's first action?

For each checkpoint, runs episodes with sampled actions (as in training) on seeds not used
in training and records, per episode, whether the first action named the first card (the
answer of every step), how many of the later actions did, and, at every step, whether the
greedy action of the same state was right. One line per checkpoint, and a JSON of them:

    python first_action.py OUT.json RUN_DIR/checkpoints/update_0000300.pt [...] [--episodes 64]

The run's training return at the checkpoint's update comes from ``--curve`` (a
``benchmarks.compare`` result JSON) when given.
"""

import argparse
import json

import numpy as np
import torch

from trxl_rl.agents.observations import obs_to_tensor
from trxl_rl.checkpoint import load_agent
from trxl_rl.envs import make_vector_env

ENV = "popgym/RepeatFirstMedium-v0"
NUM_ENVS = 16
SEED = 3_000_000  # not a training seed (training: seed + i) nor an evaluation one (+ 1e6)
WINDOW = 64       # the runs' memory_length: past it the first card is out of sight


def episodes_of(path: str, episodes: int) -> list[np.ndarray]:
    """Per episode ``[T, 4]``: step, first card, sampled action, greedy action."""
    agent = load_agent(path)
    agent.eval()
    envs = make_vector_env(ENV, NUM_ENVS)
    obs, _ = envs.reset(seed=SEED)
    state = agent.initial_state(NUM_ENVS)
    start = torch.ones(NUM_ENVS, dtype=torch.bool)
    first, t = obs["obs"].copy(), np.zeros(NUM_ENVS, dtype=int)
    done_episodes, current = [], [[] for _ in range(NUM_ENVS)]
    with torch.no_grad():
        while len(done_episodes) < episodes:
            x = obs_to_tensor(obs, "cpu")
            dist, _, state = agent.step(x, state, start)  # what act() samples from
            greedy, action = dist.mode().numpy(), dist.sample().numpy()
            for i in range(NUM_ENVS):
                current[i].append((t[i], first[i], action[i], greedy[i]))
            obs, _, terminated, truncated, _ = envs.step(action)
            done = terminated | truncated
            start, t = torch.as_tensor(done), t + 1
            for i in np.flatnonzero(done):
                done_episodes.append(np.array(current[i]))
                current[i], t[i], first[i] = [], 0, obs["obs"][i]
    envs.close()
    return done_episodes[:episodes]


def mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def summary(rows: list[np.ndarray]) -> dict:
    right = [e[:, 2] == e[:, 1] for e in rows]
    first_right = np.array([r[0] for r in right])
    rest = np.array([r[1:].mean() for r in right])
    steps = np.concatenate([e[:, 0] for e in rows])
    greedy_right = np.concatenate([e[:, 3] == e[:, 1] for e in rows])
    return {
        "episodes": len(rows),
        "sampled_return": float(np.mean([2 * r.mean() - 1 for r in right])),
        "first_action_right": float(first_right.mean()),
        "rest_right_after_right_first": mean_or_none(rest[first_right]),
        "rest_right_after_wrong_first": mean_or_none(rest[~first_right]),
        "greedy_right_in_window": float(greedy_right[steps < WINDOW].mean()),
        "greedy_right_past_window": float(greedy_right[steps >= WINDOW].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--curve", help="benchmarks.compare result JSON of the run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)  # the action samples (the JSONs of 2026-12-07 were drawn unseeded)
    curve = None
    if args.curve:
        with open(args.curve) as f:
            curve = json.load(f)["curve"]
    table = []
    for path in args.checkpoints:
        update = int(path.rsplit("update_", 1)[1].split(".")[0])
        row = {"checkpoint": path.rsplit("/", 1)[-1], "update": update,
               **summary(episodes_of(path, args.episodes))}
        if curve is not None:  # the curve's point of this update (steps = update x 4,096)
            near = min(range(len(curve["steps"])),
                       key=lambda i: abs(curve["steps"][i] - update * 4096))
            row["training_return"] = curve["return"][near]
        table.append(row)
        print(json.dumps(row))
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
