"""Evaluate a policy: success rate (with a 95% confidence interval), return and length.

    python -m trxl_rl.evaluate runs/<run>                    # the run's newest checkpoint
    python -m trxl_rl.evaluate runs/<run>/checkpoints/update_0000100.pt --episodes 500 \\
        --env MiniGrid-MemoryS17Random-v0 --memory-length 128 --deterministic --json eval.json
    python -m trxl_rl.evaluate runs/<run> --video episodes.gif --attention attention.png

The policy runs with its memory, reset at every episode start. ``--env`` may differ from the
training env when the observation and action spaces are equal; ``--memory-length`` may exceed
the trained one for the "relative", "absolute" and "none" positional encodings.
``--attention`` draws, for one episode, the last layer's attention over its memory at every
step (recomputed from the layer's inputs, :class:`AttentionRecorder`).

:func:`run_episodes` is what the trainer uses for its final evaluation on seeds not used in
training; the CLI's default ``--seed`` (training seed + 1,000,000) picks the same seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trxl_rl.agents.observations import obs_to_tensor
from trxl_rl.envs import completed_episodes, episode_metric_names, make_vector_env

EVAL_SEED_OFFSET = 1_000_000  # evaluation seeds = training seed + this (unused in training)
STOP_SEED_OFFSET = 2_000_000  # the stop's greedy checks (neither training's nor evaluation's)
VIDEO_SUFFIXES = (".gif", ".mp4")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def run_episodes(agent, env_id: str, env_kwargs: dict, episodes: int, seed: int,
                 device: torch.device, deterministic: bool = False, num_envs: int = 16,
                 memory_length: int | None = None) -> dict[str, np.ndarray]:
    """Run exactly ``episodes`` episodes (split evenly over ``num_envs`` envs, so short
    episodes are not over-represented) with the agent's memory reset at every episode start.

    :return: per-episode arrays ``return``, ``length``, ``success`` (nan where undefined)
        and ``metrics/<name>`` for the env's episode metrics
        (:func:`trxl_rl.envs.episode_metric_names`).
    """
    num_envs = max(1, min(num_envs, episodes))
    quota = np.full(num_envs, episodes // num_envs)
    quota[: episodes % num_envs] += 1
    envs = make_vector_env(env_id, num_envs, **env_kwargs)
    try:
        obs, _ = envs.reset(seed=seed)
        state = agent.initial_state(num_envs, device=device, **_memory_option(memory_length))
        episode_start = torch.ones(num_envs, dtype=torch.bool, device=device)
        done_count = np.zeros(num_envs, dtype=int)
        results: dict[str, list] = {key: [] for key in (
            "return", "length", "success",
            *(f"metrics/{name}" for name in episode_metric_names(env_id)))}
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
                        results[key].append(finished[key][i] if key in finished else np.nan)
    finally:
        envs.close()
    return {key: np.asarray(values, dtype=np.float64) for key, values in results.items()}


def _memory_option(memory_length: int | None) -> dict[str, int]:
    """``initial_state`` keywords: a Transformer-XL memory length, or none (as trained)."""
    return {} if memory_length is None else {"memory_length": memory_length}


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
    """Plain-data summary of :func:`run_episodes` output: success rate with its 95% interval,
    return and length, and each episode metric's mean (``<name>_mean``, over the episodes
    that report it)."""
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
        **{f"{key.removeprefix('metrics/')}_mean": float(np.nanmean(values))
           if (~np.isnan(values)).any() else float("nan")
           for key, values in results.items() if key.startswith("metrics/")},
    }


# --- attention -------------------------------------------------------------------------------

class AttentionRecorder:
    """Record a layer's attention probabilities at every call (a forward pre-hook).

    >>> with AttentionRecorder(agent.memory.layers[-1]) as recorder:
    ...     out = agent.act(obs, state, episode_start)
    >>> recorder.weights[-1]  # [B, H, 1, M + 1]: this step's attention over memory + itself

    :attr weights: one ``[B, H, N, M + N]`` tensor per call; :attr visible: the matching
        ``[B, 1, N, M + N]`` masks.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.weights: list[Tensor] = []
        self.visible: list[Tensor] = []
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple) -> None:
        h, keys, _values, visible, pos_keys, distance = args  # TrXLLayer.forward's inputs
        with torch.no_grad():
            self.weights.append(module.attention_weights(h, keys, visible, pos_keys,
                                                         distance).cpu())
        self.visible.append(visible.cpu())

    def __enter__(self) -> AttentionRecorder:
        self._handle = self.layer.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def _batch1(obs: Any) -> Any:
    """One env's observation -> a batch of one (arrays or dicts of them)."""
    if isinstance(obs, dict):
        return {key: _batch1(value) for key, value in obs.items()}
    return np.asarray(obs)[None]


def play_episode(agent, env, seed: int, device: torch.device, deterministic: bool = False,
                 memory_length: int | None = None,
                 on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """One episode of a single (non-vector) env; ``on_step()`` runs after the reset and after
    every step (e.g. to grab ``env.render()``).

    :return: ``{"return": float, "length": int, "success": float (nan if undefined)}``.
    """
    obs, _ = env.reset(seed=seed)
    state = agent.initial_state(1, device=device, **_memory_option(memory_length))
    start = torch.ones(1, dtype=torch.bool, device=device)
    total, length, info = 0.0, 0, {}
    if on_step is not None:
        on_step()
    done = False
    while not done:
        out = agent.act(obs_to_tensor(_batch1(obs), device), state, start, deterministic)
        state, start = out.state, torch.zeros_like(start)
        obs, reward, terminated, truncated, info = env.step(out.action[0].cpu().numpy())
        total, length, done = total + float(reward), length + 1, terminated or truncated
        if on_step is not None:
            on_step()
    success = float(info["success"]) if "success" in info else float("nan")
    return {"return": total, "length": length, "success": success}


def attention_map(agent, env, seed: int, device: torch.device, deterministic: bool = False,
                  memory_length: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Play one episode and return the last layer's attention at every step by distance.

    :return: ``([T, M + 1] mean over heads of the attention of step t on the token d steps
        back, nan where that token is not visible), the episode's result``.
    """
    with AttentionRecorder(agent.memory.layers[-1]) as recorder:
        result = play_episode(agent, env, seed, device, deterministic, memory_length)
    rows = []
    for weights, visible in zip(recorder.weights, recorder.visible, strict=True):
        w = weights[0, :, 0].mean(0)  # [M + 1] over keys, oldest memory slot first
        w = torch.where(visible[0, 0, 0], w, torch.nan)
        rows.append(w.flip(0).numpy())  # index d = distance (0 = the step itself)
    return np.stack(rows), result


def plot_attention(heat: np.ndarray, path: Path, title: str) -> None:
    """Heat map of :func:`attention_map` output: x = step, y = distance into memory."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = heat.shape[0]
    heat = heat[:, :steps]  # distances beyond the episode's length are never visible
    span = heat.shape[1]
    fig = Figure(figsize=(min(16.0, 6.0 + 0.05 * steps), 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Grey: tokens not visible (before the episode, or beyond the memory).
    cmap = colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(heat.T), origin="lower", aspect="auto",
                      interpolation="nearest", cmap=cmap, vmin=0.0,
                      extent=(-0.5, steps - 0.5, -0.5, span - 0.5))
    first = np.arange(min(steps, span))
    ax.plot(first, first, color="tab:red", linestyle=":", linewidth=1.2,
            label="first step of the episode")
    ax.set_xlabel("step in episode")
    ax.set_ylabel("distance into memory (steps back)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.6)
    fig.colorbar(image, ax=ax, label="attention (mean over heads)")
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:]))


# --- output ----------------------------------------------------------------------------------

def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, so an existing ``path`` is either
    kept or replaced whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_video(frames: list[np.ndarray], path: Path, fps: int = 6) -> None:
    """GIF (Pillow) or MP4 (needs ``imageio-ffmpeg``) of ``[H, W, 3]`` uint8 frames."""
    import imageio.v3 as iio

    if path.suffix == ".gif":
        _write_atomic(path, lambda tmp: iio.imwrite(tmp, np.stack(frames), extension=".gif",
                                                    duration=1000 / fps, loop=0))
    else:
        _write_atomic(path, lambda tmp: iio.imwrite(tmp, np.stack(frames), extension=".mp4",
                                                    fps=fps, plugin="FFMPEG",
                                                    macro_block_size=1))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def format_table(report: dict[str, Any]) -> str:
    """The printed summary of :func:`main`."""
    def num(x: float | None, digits: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{digits}f}"

    low, high = report["success_ci95"]
    rate = "n/a (the env reports no success)" if report["success_rate"] is None else \
        f"{num(report['success_rate'])}  (95% CI {num(low)}-{num(high)})"
    policy = "deterministic" if report["deterministic"] else "stochastic"
    memory = "" if report["memory_length"] is None else \
        f", memory length {report['memory_length']}"
    rows = [
        ("checkpoint", f"{report['checkpoint']}  (update {report['update']}, "
                       f"{report['global_step']} steps)"),
        ("env", f"{report['env']}  {report['env_kwargs']}" if report["env_kwargs"]
         else report["env"]),
        ("policy", f"{policy}, {report['backbone']}{memory}, seed {report['seed']}"),
        ("episodes", str(report["episodes"])),
        ("success rate", rate),
        ("return", f"mean {num(report['return_mean'])}  median {num(report['return_median'])}"),
        ("length", f"mean {num(report['length_mean'], 1)}  "
                   f"median {num(report['length_median'], 1)}"),
    ]
    metrics = [f"{key.removesuffix('_mean')} {num(value)}" for key, value in report.items()
               if key.endswith("_mean") and key not in ("return_mean", "length_mean")]
    if metrics:
        rows.append(("episode means", ", ".join(metrics)))
    return "\n".join(f"{name:<14}{value}" for name, value in rows)


# --- CLI -------------------------------------------------------------------------------------

class UsageError(ValueError):
    """A command-line problem; the message is one line."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trxl_rl.evaluate",
        description="Evaluate a trained policy: success rate with a 95%% confidence interval, "
                    "return and episode length; optionally record videos and draw attention.",
    )
    parser.add_argument("checkpoint", help="checkpoint file, or run directory (its newest "
                                           "checkpoint)")
    parser.add_argument("--env", help="gymnasium id to evaluate on (default: the training env); "
                                      "its spaces must equal the training env's")
    parser.add_argument("--env-kwargs", default="{}", metavar="YAML",
                        help="make_env kwargs over the training ones, e.g. '{max_steps: 300}'; "
                             "a null value drops a training kwarg")
    parser.add_argument("--episodes", type=_positive, default=100)
    parser.add_argument("--seed", type=int, help="first env seed (default: training seed + "
                                                 f"{EVAL_SEED_OFFSET:,}, unseen in training)")
    parser.add_argument("--deterministic", action="store_true",
                        help="take the most likely action instead of sampling")
    parser.add_argument("--memory-length", type=_non_negative, metavar="M",
                        help="run with memory length M (default: as trained; larger works for "
                             "relative, absolute and none positional encodings)")
    parser.add_argument("--num-envs", type=_positive, default=16,
                        help="parallel envs for the evaluation episodes")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write the summary here")
    parser.add_argument("--video", type=Path, metavar="OUT.gif|OUT.mp4",
                        help="record episodes (env rendered as rgb_array; .mp4 needs "
                             "imageio-ffmpeg)")
    parser.add_argument("--video-episodes", type=_positive, default=3)
    parser.add_argument("--attention", type=Path, metavar="OUT.png",
                        help="heat map of the last layer's attention over the memory during "
                             "one episode (x = step, y = distance into memory)")
    return parser.parse_args(argv)


def _check_outputs(args: argparse.Namespace) -> None:
    if args.video is not None:
        if args.video.suffix not in VIDEO_SUFFIXES:
            raise UsageError(f"--video must end in {' or '.join(VIDEO_SUFFIXES)}, got "
                             f"{str(args.video)!r}")
        if args.video.suffix == ".mp4":
            import importlib.util

            if importlib.util.find_spec("imageio_ffmpeg") is None:
                raise UsageError("--video .mp4 needs the imageio-ffmpeg package "
                                 "(pip install imageio-ffmpeg); or write a .gif")
    if args.attention is not None and args.attention.suffix not in FIGURE_SUFFIXES:
        raise UsageError(f"--attention must end in {', '.join(FIGURE_SUFFIXES)}, got "
                         f"{str(args.attention)!r}")
    for option, path in (("--json", args.json), ("--video", args.video),
                         ("--attention", args.attention)):
        if path is not None and path.is_dir():
            raise UsageError(f"{option} {str(path)!r} is a directory; give a file name")


def main(argv: list[str] | None = None) -> int:
    import yaml

    from trxl_rl.checkpoint import (
        CheckpointError,
        agent_from_checkpoint,
        check_spaces,
        config_from_checkpoint,
        load_checkpoint,
    )
    from trxl_rl.config import ConfigError, resolve_device
    from trxl_rl.envs import UnknownEnvError, make_env
    from trxl_rl.memory import TransformerXL

    args = parse_args(argv)
    try:
        _check_outputs(args)
        try:
            extra_kwargs = yaml.safe_load(args.env_kwargs)
        except yaml.YAMLError:
            raise UsageError(f"cannot parse --env-kwargs {args.env_kwargs!r}") from None
        if not isinstance(extra_kwargs, dict):
            raise UsageError(f"--env-kwargs must be a YAML mapping, got {args.env_kwargs!r}")
        checkpoint = load_checkpoint(args.checkpoint, map_location="cpu")
        cfg = config_from_checkpoint(checkpoint)
        device = resolve_device(args.device)
        env_id = args.env or cfg.env.id
        env_kwargs = {key: value for key, value in {**cfg.env.kwargs, **extra_kwargs}.items()
                      if value is not None}
        try:
            env = make_env(env_id, **env_kwargs)
        except (ValueError, TypeError) as err:
            if isinstance(err, UnknownEnvError):
                raise
            reason = str(err).strip().splitlines()[0]
            raise UsageError(f"cannot make env {env_id!r} with {env_kwargs} (the training "
                             f"env's kwargs, changed by --env-kwargs): {reason}") from None
        env.close()
        check_spaces(checkpoint, env.observation_space, env.action_space, env_id)
        if args.video is not None and "rgb_array" not in env.metadata.get("render_modes", []):
            raise UsageError(f"env {env_id!r} cannot render rgb_array frames (render_modes "
                             f"{env.metadata.get('render_modes', [])}), so --video is impossible")
        agent = agent_from_checkpoint(checkpoint, device)
        is_trxl = isinstance(agent.memory, TransformerXL)
        for option, value in (("--memory-length", args.memory_length),
                              ("--attention", args.attention)):
            if value is not None and not is_trxl:
                raise UsageError(f"{option} applies to Transformer-XL backbones (trxl, gtrxl); "
                                 f"this agent's backbone is {cfg.model.backbone!r}")
        memory_length = None
        if is_trxl:
            memory_length = agent.memory.config.memory_length if args.memory_length is None \
                else args.memory_length
            try:
                agent.initial_state(1, memory_length=memory_length)
            except ValueError as err:
                raise UsageError(f"--memory-length {memory_length}: {err}") from None
    except (UsageError, CheckpointError, ConfigError, UnknownEnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    seed = cfg.seed + EVAL_SEED_OFFSET if args.seed is None else args.seed
    torch.manual_seed(seed)
    results = run_episodes(agent, env_id, env_kwargs, args.episodes, seed, device,
                           args.deterministic, args.num_envs, memory_length)
    report = _json_safe({
        "checkpoint": checkpoint["path"],
        "update": checkpoint["counters"]["update"],
        "global_step": checkpoint["counters"]["global_step"],
        "env": env_id, "env_kwargs": env_kwargs, "seed": seed,
        "backbone": cfg.model.backbone, "deterministic": args.deterministic,
        "memory_length": memory_length,
        **summarize(results),
    })
    print(format_table(report))
    if args.json is not None:
        _write_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
        print(f"{'json':<14}{args.json}")

    if args.video is not None:
        video_env = make_env(env_id, render_mode="rgb_array", **env_kwargs)
        frames: list[np.ndarray] = []
        for episode in range(args.video_episodes):
            play_episode(agent, video_env, seed + episode, device, args.deterministic,
                         memory_length, on_step=lambda: frames.append(video_env.render()))
        video_env.close()
        write_video(frames, args.video)
        episodes = f"{args.video_episodes} episode{'s' if args.video_episodes > 1 else ''}"
        print(f"{'video':<14}{args.video} ({episodes}, {len(frames)} frames)")

    if args.attention is not None:
        attention_env = make_env(env_id, **env_kwargs)
        heat, result = attention_map(agent, attention_env, seed, device, args.deterministic,
                                     memory_length)
        attention_env.close()
        outcome = "" if math.isnan(result["success"]) else \
            (", success" if result["success"] else ", failure")
        title = (f"last-layer attention over memory, memory length {memory_length}\n"
                 f"{env_id}, seed {seed}: return {result['return']:.2f}{outcome}")
        plot_attention(heat, args.attention, title)
        print(f"{'attention':<14}{args.attention} ({result['length']} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
