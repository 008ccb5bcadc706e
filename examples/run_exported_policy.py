"""Run a policy exported by ``python -m trxl_rl.export`` in a gymnasium env loop, without
trxl_rl: numpy, gymnasium and either onnxruntime (``.onnx``) or torch (``.pt``, TorchScript).

    python -m trxl_rl.export runs/<run> --out policy.onnx
    python examples/run_exported_policy.py policy.onnx --episodes 5          # sampled actions
    python examples/run_exported_policy.py policy.pt --greedy --env CartPole-v1

The env (default: the id the policy was trained on) must give the observations the policy
was trained on, i.e. those of ``trxl_rl.envs.make_env``: for a plain gymnasium env
(CartPole, Pendulum, ...) that is ``gymnasium.make``; trxl_rl's own envs (MiniGrid-Memory,
CueRecall, POPGym with the previous action) wrap theirs, so build those with
``--env-from trxl_rl`` (trxl_rl then makes the env; the policy still runs without it). An env
whose observations do not fit the policy stops with one line saying so.

    python examples/run_exported_policy.py policy.onnx --env-from trxl_rl   # a MiniGrid run

The functions below are what any caller of an exported step does (the layout is documented
in ``trxl_rl/export.py``): keep the memory, feed it back after every step, start each episode
with ``episode_start`` True, and choose actions from the distribution parameters.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Callable

import gymnasium as gym
import numpy as np

Arrays = dict[str, np.ndarray]


def load_policy(path: str, threads: int | None = None
                ) -> tuple[Callable[[Arrays], Arrays], dict]:
    """``(step, spec)``: ``step(inputs) -> outputs`` maps input names to arrays and output
    names to arrays; ``spec`` is the JSON the exporter wrote into the file. ``threads``:
    onnxruntime's threads (None: its default; torch's are ``torch.set_num_threads``)."""
    if path.endswith(".onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        spec = json.loads(session.get_modelmeta().custom_metadata_map["trxl_rl"])
        names = [o["name"] for o in spec["outputs"]]
        return lambda inputs: dict(zip(names, session.run(names, inputs), strict=True)), spec
    import torch

    extra = {"trxl_rl.json": ""}
    with open(path, "rb") as f:
        module = torch.jit.load(io.BytesIO(f.read()), _extra_files=extra)
    spec = json.loads(extra["trxl_rl.json"])

    def step(inputs: Arrays) -> Arrays:
        with torch.no_grad():
            out = module(*(torch.from_numpy(inputs[i["name"]]) for i in spec["inputs"]))
        return {o["name"]: t.numpy() for o, t in zip(spec["outputs"], out, strict=True)}
    return step, spec


def initial_memory(spec: dict, batch: int) -> Arrays:
    """The memory of ``batch`` rows before any step: zeros (``valid`` False)."""
    shapes = {i["name"]: i for i in spec["inputs"]}
    return {m["input"]: np.zeros((batch, *shapes[m["input"]]["shape"][1:]),
                                 dtype=shapes[m["input"]]["dtype"]) for m in spec["memory"]}


def observation_entries(spec: dict) -> list[tuple[dict, list[str]]]:
    """The ``obs`` inputs of the step with their key paths (``[]`` for a single tensor,
    ``["a", "b"]`` for ``obs.a.b`` of a nested Dict observation)."""
    return [(entry, entry["name"].split(".")[1:]) for entry in spec["inputs"]
            if entry["name"].split(".")[0] == "obs"]


def observation_inputs(spec: dict, obs) -> Arrays:
    """A batch of observations (an array, or a dict of them as a vector env returns) ->
    the ``obs`` inputs, each in its dtype."""
    out = {}
    for entry, keys in observation_entries(spec):
        value = obs
        for key in keys:
            value = value[key]
        out[entry["name"]] = np.ascontiguousarray(value, dtype=entry["dtype"])
    return out


def step(policy: Callable[[Arrays], Arrays], spec: dict, obs: Arrays, memory: Arrays,
         episode_start: np.ndarray) -> tuple[Arrays, Arrays]:
    """One step: ``(outputs, new memory)``; ``episode_start`` ``[B]`` bool."""
    outputs = policy({**obs, **memory, "episode_start": episode_start.astype(np.bool_)})
    return outputs, {m["input"]: outputs[m["output"]] for m in spec["memory"]}


def greedy_action(spec: dict, outputs: Arrays) -> np.ndarray:
    """The most likely action of every row (``Box``: the mean, before clipping)."""
    if spec["action"]["distribution"] == "gaussian":
        return outputs["mean"]
    return outputs["logits"].argmax(-1) + np.asarray(spec["action"]["start"])


def sample_action(spec: dict, outputs: Arrays, rng: np.random.Generator) -> np.ndarray:
    """A random action of every row, drawn as the trainer draws it."""
    if spec["action"]["distribution"] == "gaussian":
        mean, log_std = outputs["mean"], outputs["log_std"]
        return (mean + np.exp(log_std) * rng.standard_normal(mean.shape)).astype(np.float32)
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
    logits = outputs["logits"]
    return (logits - np.log(-np.log(rng.uniform(size=logits.shape)))).argmax(-1) \
        + np.asarray(spec["action"]["start"])


def log_prob(spec: dict, outputs: Arrays, action: np.ndarray) -> np.ndarray:
    """Log-probability ``[B]`` of ``action`` (as sampled, unclipped) under the outputs."""
    if spec["action"]["distribution"] == "gaussian":
        mean, log_std = outputs["mean"], outputs["log_std"]
        z = (action - mean) * np.exp(-log_std)
        per_dim = -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)
        return per_dim.reshape(len(action), -1).sum(-1)
    index = (action - np.asarray(spec["action"]["start"]))[..., None]
    per_dim = np.take_along_axis(outputs["logits"], index, -1)[..., 0]
    return per_dim.reshape(len(action), -1).sum(-1)


def env_action(spec: dict, action: np.ndarray) -> np.ndarray:
    """The action as the env takes it: ``Box`` actions clipped to the space's bounds."""
    space = spec["action_space"]
    if space["type"] == "Box":
        return np.clip(action, np.asarray(space["low"]), np.asarray(space["high"]))
    return action


def run_episodes(policy: Callable[[Arrays], Arrays], spec: dict, env: gym.Env,
                 episodes: int, greedy: bool, seed: int) -> list[float]:
    """The returns of ``episodes`` episodes of one env (a batch of one row)."""
    rng = np.random.default_rng(seed)
    memory, returns = initial_memory(spec, 1), []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        episode_start, total, done = np.ones(1, dtype=bool), 0.0, False
        while not done:
            batch = obs[None] if not isinstance(obs, dict) else \
                {key: np.asarray(value)[None] for key, value in obs.items()}
            outputs, memory = step(policy, spec, observation_inputs(spec, batch), memory,
                                   episode_start)
            action = greedy_action(spec, outputs) if greedy else \
                sample_action(spec, outputs, rng)
            obs, reward, terminated, truncated, _ = env.step(env_action(spec, action)[0])
            total += float(reward)
            done = terminated or truncated
            episode_start = np.zeros(1, dtype=bool)
        returns.append(total)
    return returns


def check_env(spec: dict, space: gym.Space) -> str | None:
    """Why observations of ``space`` (an env's) do not fit the policy, or None: every
    ``obs`` input needs a (sub)space of its shape and dtype."""
    for entry, keys in observation_entries(spec):
        sub = space
        for key in keys:
            if not isinstance(sub, gym.spaces.Dict) or key not in sub.spaces:
                return f"it has no observation key {'.'.join(keys)!r}"
            sub = sub.spaces[key]
        if isinstance(sub, gym.spaces.Dict) or list(sub.shape) != entry["shape"][1:] \
                or np.dtype(sub.dtype) != np.dtype(entry["dtype"]):
            return (f"its observations {entry['name']} are {sub}, the policy takes "
                    f"{entry['dtype']} {entry['shape'][1:]}")
    return None


def make_env(spec: dict, env_id: str | None, env_from: str) -> gym.Env:
    """The env to run: ``gymnasium.make`` (with the training kwargs for the training env), or
    with ``env_from="trxl_rl"`` ``trxl_rl.envs.make_env``, which wraps trxl_rl's own envs as
    in training (then trxl_rl builds the env; the policy still runs without it)."""
    kwargs = {} if env_id else spec["env_kwargs"]
    env_id = env_id or spec["env_id"]
    if env_from == "trxl_rl":
        from trxl_rl.envs import make_env as trxl_rl_make_env

        return trxl_rl_make_env(env_id, **kwargs)
    hint = "; build it as in training with --env-from trxl_rl"
    try:
        env = gym.make(env_id, **kwargs)
    except Exception as err:  # an id or kwargs of trxl_rl's own envs
        raise SystemExit(f"error: gymnasium cannot make {env_id!r} with {kwargs}: "
                         f"{str(err).splitlines()[0]}{hint}") from None
    problem = check_env(spec, env.observation_space)
    if problem:
        raise SystemExit(f"error: {env_id!r} from gymnasium does not fit the policy: "
                         f"{problem}{hint}")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policy", help="an exported .onnx or .pt (TorchScript) file")
    parser.add_argument("--env", help="gymnasium id (default: the id trained on)")
    parser.add_argument("--env-from", choices=["gymnasium", "trxl_rl"], default="gymnasium",
                        help="who builds the env: gymnasium.make (default), or trxl_rl's "
                             "make_env for its own envs (MiniGrid-Memory, CueRecall, ...)")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--greedy", action="store_true", help="most likely actions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    policy, spec = load_policy(args.policy)
    env = make_env(spec, args.env, args.env_from)
    returns = run_episodes(policy, spec, env, args.episodes, args.greedy, args.seed)
    env.close()
    print(json.dumps({"episodes": len(returns), "returns": returns,
                      "return_mean": float(np.mean(returns))}))


if __name__ == "__main__":
    main()
