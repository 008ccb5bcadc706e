"""Train a PPO agent with a Transformer-XL memory.

    python -m trxl_rl.train --env MiniGrid-Memory
    python -m trxl_rl.train --env MiniGrid-MemoryS13Random-v0 --model.trxl.memory_length 128
    python -m trxl_rl.train --env MiniGrid-Memory --model.backbone gru
    python -m trxl_rl.train --config my.yaml --ppo.learning_rate 1e-3 --seed 3

One iteration: collect ``rollout_steps`` steps of every env (each env keeps its own memory
across rollouts, reset only at its episode boundaries), compute GAE, then run PPO epochs over
shuffled (env, segment) chunks that are recomputed from the stored memory.

Data-parallel on K processes (ranks), with torch.distributed (:mod:`trxl_rl.distributed`):

    torchrun --standalone --nproc-per-node K -m trxl_rl.train --env MiniGrid-Memory

Every rank runs ``env.num_envs`` envs of its own (env ``i`` of rank ``r`` is seeded with
``seed + r * num_envs + i``) and its own rollout; the gradients of every minibatch are averaged
over the ranks. ``total_steps`` counts the steps of all ranks. Rank 0 alone writes TensorBoard,
``config.yaml``, checkpoints (with every rank's training state) and ``summary.json``, shows the
progress bar and runs the final evaluation.

Every scalar goes through one :class:`trxl_rl.metrics.Metrics` object to TensorBoard, the
progress bar and, with ``--track`` (CleanRL's flag), a Weights & Biases run:

    python -m trxl_rl.train --env MiniGrid-Memory --track --wandb-project-name X --wandb-entity Y
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from torch import Tensor

from trxl_rl.agents.observations import obs_to_tensor
from trxl_rl.backbones import RecurrentConfig
from trxl_rl.checkpoint import (
    CheckpointError,
    check_spaces,
    checkpoint_name,
    describe_space,
    load_checkpoint,
    save_checkpoint,
    space_to_dict,
)
from trxl_rl.config import (
    ENV_PRESETS,
    PRESETS,
    ConfigError,
    EnvConfig,
    ModelConfig,
    PPOConfig,
    TrainConfig,
    build_config,
    config_to_dict,
    preset_path,
    read_yaml,
    resolve_device,
)
from trxl_rl.distributed import (
    RankLost,
    Ranks,
    launch_command,
    start_local_ranks,
    weights_digest,
)
from trxl_rl.memory import TrXLConfig
from trxl_rl.metrics import (
    Metrics,
    ProgressBar,
    StopWhenSolved,
    TensorBoard,
    Threshold,
    WandbRun,
    check_wandb,
)
from trxl_rl.ppo import LearningRate, linear_schedule, ppo_update
from trxl_rl.resume import (
    StopOnSignal,
    TrainingInterrupted,
    check_world_size,
    rank_view,
    restore_training,
    resume_config,
    run_dir_of,
    training_state,
)
from trxl_rl.rollout import Rollout


class EpisodeLog:
    """The episodes completed since the last :meth:`flush`: returns, lengths, successes and
    the env's episode ``metrics`` (:func:`trxl_rl.envs.episode_metric_names`), each of the
    last two over the episodes that define it."""

    def __init__(self, metrics: tuple[str, ...] = ()) -> None:
        self.metrics = metrics
        self._clear()

    def _clear(self) -> None:
        self.returns: list[float] = []
        self.lengths: list[float] = []
        self.defined: dict[str, list[float]] = {name: [] for name in ("success", *self.metrics)}

    def add(self, finished: dict[str, np.ndarray]) -> None:
        self.returns += finished["return"].tolist()
        self.lengths += finished["length"].tolist()
        for name, values in self.defined.items():
            column = finished.get("success" if name == "success" else f"metrics/{name}", ())
            values += [v for v in np.asarray(column, dtype=float).tolist() if not np.isnan(v)]

    def flush(self) -> dict[str, float]:
        """Sums and counts of the episodes (``episodes/*``; summed over ranks, they are those
        of all ranks' episodes), then forget them. :func:`episode_means` turns them into the
        logged means."""
        out = {"episodes/count": float(len(self.returns)),
               "episodes/return_sum": float(np.sum(self.returns)),
               "episodes/length_sum": float(np.sum(self.lengths))}
        for name, values in self.defined.items():
            out[f"episodes/{name}_count"] = float(len(values))
            out[f"episodes/{name}_sum"] = float(np.sum(values))
        self._clear()
        return out


def episode_means(totals: dict[str, float]) -> dict[str, float]:
    """``charts/episodic_return``, ``charts/episodic_length``, ``charts/success_rate`` and
    ``charts/<metric>`` for each episode metric (the means over the episodes counted in
    ``totals``; absent where there are none)."""
    out = {}
    if totals["episodes/count"]:
        out["charts/episodic_return"] = totals["episodes/return_sum"] / totals["episodes/count"]
        out["charts/episodic_length"] = totals["episodes/length_sum"] / totals["episodes/count"]
    names = sorted(key.removeprefix("episodes/").removesuffix("_count") for key in totals
                   if key.endswith("_count") and key != "episodes/count")
    for name in names:
        if totals[f"episodes/{name}_count"]:
            chart = "charts/success_rate" if name == "success" else f"charts/{name}"
            out[chart] = totals[f"episodes/{name}_sum"] / totals[f"episodes/{name}_count"]
    return out


def update_scalars(stats: dict[str, float], episodes: EpisodeLog, ranks: Ranks
                   ) -> dict[str, float]:
    """The scalars of an update as logged: this rank's ``stats`` and the episodes it finished
    since the last update, reduced over the ranks (:func:`reduction`), with the episode sums
    turned into means (:func:`episode_means`)."""
    stats = {**stats, **episodes.flush()}
    stats = ranks.reduce_scalars(stats, {key: reduction(key) for key in stats})
    stats.update(episode_means({key: stats.pop(key) for key in list(stats)
                                if key.startswith("episodes/")}))
    return stats


def reduction(key: str) -> str:
    """How a logged scalar combines over ranks: episode sums and counts add up (their means
    are then over all ranks' episodes), the first-minibatch checks take the worst rank; the
    rest (losses, seconds) is the mean over ranks."""
    if key.startswith("episodes/"):
        return "sum"
    if key.startswith("losses/first_minibatch_"):
        return "max"
    return "mean"


class Carry(NamedTuple):
    """What the rollout loop carries from one step (and rollout) to the next."""

    obs: Any  # batched observation of the vector env (numpy)
    state: Any  # each env's memory (the backbone's state, B rows)
    episode_start: Tensor  # [B] bool: the next step is the first of an episode


def schedules(ppo: PPOConfig, progress: float, continuous: bool) -> tuple[float, float]:
    """The learning rate and the entropy coefficient of an update, at ``progress`` (the
    fraction of the run's updates done before it) of their linear schedules; ``continuous``:
    the actions are (the entropy bonus's default depends on it)."""
    return (linear_schedule(ppo.learning_rate, ppo.learning_rate_final, progress),
            linear_schedule(ppo.initial_entropy_coef(continuous), ppo.entropy_coef_final,
                            progress))


def make_optimizer(cfg: TrainConfig, agent) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where torch has one for the parameters' device (CPU and
    CUDA): with ~30 small tensors a step costs ~0.5 ms instead of ~1.8 ms on CPU, and the
    update runs one step per minibatch. A fused step does not bump the parameters' version
    counters, so every step tells the agent its weights changed (inference caches built
    with the old weights, such as the Transformer-XL's keys and values, are rebuilt)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in agent.parameters())
    optimizer = torch.optim.AdamW(agent.parameters(), lr=cfg.ppo.learning_rate,
                                  eps=cfg.ppo.adam_eps, weight_decay=cfg.ppo.weight_decay,
                                  fused=fused or None)
    optimizer.register_step_post_hook(lambda *_: agent.weights_changed())
    return optimizer


def collect(agent, envs, rollout: Rollout, carry: Carry, device: torch.device,
            episodes: EpisodeLog) -> tuple[Carry, float]:
    """Fill ``rollout`` with one rollout; returns the new carry and the seconds spent in
    ``envs.step``.

    Truncated episodes store V(final obs | that episode's memory) for bootstrapping.
    """
    from trxl_rl.envs import completed_episodes, final_observations

    obs, state, episode_start = carry
    env_seconds = 0.0
    rollout.start(state)
    for t in range(rollout.num_steps):
        obs_t = obs_to_tensor(obs, device)
        out = agent.act(obs_t, state, episode_start)
        rollout.add(t, obs_t, out.action, out.log_prob, out.value, episode_start, out.state)
        state = out.state
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, infos = envs.step(out.action.cpu().numpy())
        env_seconds += time.perf_counter() - t0

        bootstrap = torch.zeros(rollout.num_envs, device=device)
        cut = truncated & ~terminated
        if cut.any():
            rows = torch.as_tensor(np.flatnonzero(cut), device=device)
            final = obs_to_tensor(
                final_observations(infos, cut, envs.single_observation_space), device)
            bootstrap[rows] = agent.value(final, state[rows],
                                          torch.zeros(len(rows), dtype=torch.bool, device=device))
        done = torch.as_tensor(terminated | truncated, device=device)
        rollout.add_outcome(t, torch.as_tensor(reward, dtype=torch.float32, device=device),
                            done.float(), bootstrap)
        episode_start = done
        episodes.add(completed_episodes(infos))
    return Carry(obs, state, episode_start), env_seconds


def iteration(agent, optimizer: torch.optim.Optimizer, envs, rollout: Rollout, carry: Carry,
              ppo: PPOConfig, entropy_coef: float, shuffle: torch.Generator,
              episodes: EpisodeLog, device: torch.device, ranks: Ranks | None = None,
              rate: LearningRate | None = None) -> tuple[Carry, dict[str, float]]:
    """One training iteration: a rollout, GAE, then the PPO update (gradients averaged over
    ``ranks``). Returns the new carry and the update's scalars (this rank's) plus
    ``charts/{env,rollout,update}_seconds``."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    agent.eval()
    t0 = now()
    carry, env_seconds = collect(agent, envs, rollout, carry, device, episodes)
    last_value = agent.value(obs_to_tensor(carry.obs, device), carry.state, carry.episode_start)
    rollout.compute_returns(last_value, ppo.gamma, ppo.gae_lambda)
    t1 = now()
    agent.train()
    stats = ppo_update(agent, optimizer, rollout, ppo, entropy_coef, shuffle, ranks, rate)
    t2 = now()
    stats["charts/env_seconds"] = env_seconds
    stats["charts/rollout_seconds"] = t1 - t0
    stats["charts/update_seconds"] = t2 - t1
    return carry, stats


def train(cfg: TrainConfig, on_update: Callable[[int, dict[str, float]], None] | None = None,
          resume: dict | None = None, ranks: Ranks | None = None) -> dict[str, Any]:
    """Run the training described by ``cfg``; returns the final evaluation summary.

    :param on_update: called after every update with (update number, logged scalars).
    :param resume: a checkpoint of this run (``load_checkpoint(path, resume=True)``, with
        ``cfg = resume_config(checkpoint, overrides)``) to continue from exactly.
    :param ranks: this process's rank in a data-parallel run (:meth:`Ranks.start` called);
        None: a single process. The scalars passed to ``on_update`` are reduced over ranks;
        only rank 0 writes files and evaluates (the others return the summary without the
        evaluation).
    :raises TrainingInterrupted: a SIGINT or SIGTERM arrived (at any rank); the update in
        progress was finished and a checkpoint written first.
    :raises RankLost: another rank died or stopped answering.
    """
    from trxl_rl.agents import action_dtype, action_shape, build_agent, continuous_actions
    from trxl_rl.envs import episode_metric_names, make_vector_env

    ranks = ranks or Ranks()
    device = ranks.device(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    b, t_steps = cfg.env.num_envs, cfg.ppo.rollout_steps
    # Rank r seeds like a single process with seed + r * num_envs: its envs get seeds no
    # other rank's env has, and rank 0 is the single process itself.
    seed = cfg.seed + ranks.rank * b
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    envs = make_vector_env(cfg.env.id, b, cfg.env.vectorization, replay=True, **cfg.env.kwargs)
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    continuous = continuous_actions(act_space)
    agent = build_agent(cfg, obs_space, act_space).to(device)
    optimizer = make_optimizer(cfg, agent)
    shuffle = torch.Generator().manual_seed(seed)
    obs, _ = envs.reset(seed=seed)
    envs.action_space.seed(seed)
    state = agent.initial_state(b, device=device)
    episode_start = torch.ones(b, dtype=torch.bool, device=device)
    first_update, global_step = 1, 0
    if resume is not None:  # before anything is written: a checkpoint that fails leaves no trace
        obs, state, episode_start = restore_training(rank_view(resume, ranks.rank), agent,
                                                     optimizer, shuffle, envs, device)
        first_update = resume["counters"]["update"] + 1
        global_step = resume["counters"]["global_step"]
    else:
        ranks.broadcast_parameters(agent)
    rate = LearningRate(cfg.ppo.lr_target_kl, **(resume or {}).get("learning_rate", {}))
    # Wall-clock is not part of the exact training state: it is kept apart (``timing``).
    timing = (resume or {}).get("timing", {})
    seconds_before = timing.get("train_seconds", 0.0)
    threshold = Threshold(cfg.threshold_metric, cfg.threshold, timing.get("threshold"))
    solved = StopWhenSolved(cfg.threshold_metric, cfg.stop_at, cfg.stop_updates,
                            (resume or {}).get("stop_when_solved"))

    def confirm() -> float:  # rank 0 plays the greedy episodes; every rank gets their score
        return ranks.broadcast_object(greedy_score(cfg, agent, device) if ranks.main else None)

    run_dir = start_run_dir(cfg, resume, ranks)
    rollout = Rollout(t_steps, b, obs_space, action_shape(act_space), action_dtype(act_space),
                      agent.memory, device)
    steps_per_update = ranks.world_size * b * t_steps  # all ranks' steps
    num_updates = max(1, cfg.total_steps // steps_per_update)  # whole rollouts within budget
    episodes = EpisodeLog(episode_metric_names(cfg.env.id))

    def checkpoint(update: int) -> None:
        mine = training_state(envs, obs, agent.memory, state, episode_start, shuffle)
        states = ranks.gather_object({**mine, "weights": weights_digest(agent)})
        if not ranks.main:
            return
        digests = [s.pop("weights") for s in states]
        if len(set(digests)) > 1:  # a bug, or hardware that computes differently per rank
            raise RuntimeError(f"the ranks' weights differ after update {update} (digests "
                               f"{digests}); the run cannot continue as one")
        save_checkpoint(run_dir / "checkpoints" / checkpoint_name(update), {
            "model": agent.state_dict(), "optimizer": optimizer.state_dict(),
            "config": config_to_dict(cfg),
            "spaces": {"observation": space_to_dict(obs_space),
                       "action": space_to_dict(act_space)},
            "counters": {"global_step": global_step, "update": update},
            "learning_rate": rate.state(), "stop_when_solved": solved.state(),
            "timing": {"train_seconds": train_seconds(), "threshold": threshold.state()},
            **states[0], "world_size": ranks.world_size, "other_ranks": states[1:],
        })

    with open_metrics(cfg, run_dir, resume, ranks, total=num_updates * steps_per_update,
                      initial=global_step) as metrics:
        # SPS and train_seconds leave out starting the sinks (W&B: seconds)
        start_step, start_time = global_step, time.perf_counter()

        def train_seconds() -> float:  # of every sitting of this run
            return seconds_before + time.perf_counter() - start_time

        stop = StopOnSignal(announce=ranks.main).install()
        try:
            for update in range(first_update, num_updates + 1):
                if solved.solved:  # a resumed run that had stopped, solved
                    break
                lr, entropy_coef = schedules(cfg.ppo, (update - 1) / num_updates, continuous)
                rate.start_update(optimizer, lr)
                carry, stats = iteration(agent, optimizer, envs, rollout,
                                         Carry(obs, state, episode_start), cfg.ppo,
                                         entropy_coef, shuffle, episodes, device, ranks, rate)
                obs, state, episode_start = carry
                global_step += steps_per_update

                stats = update_scalars(stats, episodes, ranks)
                stats["charts/SPS"] = ((global_step - start_step)
                                       / (time.perf_counter() - start_time))
                stats["charts/learning_rate"] = rate.value  # at the end of the update
                stats["charts/learning_rate_factor"] = rate.factor
                stats["charts/entropy_coef"] = entropy_coef
                stats.update(threshold.check(stats, global_step, train_seconds()))
                done = solved.check(stats, global_step,
                                    confirm if cfg.stop_greedy_episodes else None)
                stats.update(solved.scalars(global_step))
                metrics.record(stats, global_step)
                if on_update is not None:
                    on_update(update, stats)
                # A signal at any rank stops every rank after this update.
                signum = int(ranks.reduce_scalars({"signal": stop.signum or 0},
                                                  {"signal": "max"})["signal"])
                if (update % cfg.checkpoint_every == 0 or update == num_updates or signum
                        or done):
                    checkpoint(update)
                if signum:
                    raise TrainingInterrupted(signum,
                                              run_dir / "checkpoints" / checkpoint_name(update))
                if done:
                    break
        finally:
            stop.uninstall()
            envs.close()

        if ranks.main and solved.solved:
            print(f"solved: {solved}; stopped at step {global_step:,} of "
                  f"{num_updates * steps_per_update:,}", file=sys.stderr)
        summary: dict[str, Any] = {"global_step": global_step,
                                   "train_seconds": time.perf_counter() - start_time,
                                   "threshold": threshold.state(), "solved": solved.state()}
        if not ranks.main:
            return summary
        if cfg.eval_episodes > 0:
            summary.update(final_evaluation(cfg, agent, device))
            metrics.record({"eval/success_rate": summary["success_rate"],
                            "eval/episodic_return": summary["return_mean"]}, global_step)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def start_run_dir(cfg: TrainConfig, resume: dict | None, ranks: Ranks) -> Path:
    """The run directory, named the same on every rank; rank 0 creates it (or, resuming,
    finds it) and writes ``config.yaml`` there."""
    run_name = ranks.broadcast_object(
        cfg.run_name or (f"{Path(cfg.env.id).name}__seed{cfg.seed}__"
                         f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
    run_dir = Path(cfg.log_dir) / run_name
    if ranks.main:
        if resume is None:
            check_new_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg),
                                                            sort_keys=False))
    return run_dir


def open_metrics(cfg: TrainConfig, run_dir: Path, resume: dict | None, ranks: Ranks,
                 total: int, initial: int) -> Metrics:
    """Rank 0's sinks of the logged scalars: TensorBoard in ``run_dir``, the progress bar over
    ``total`` steps from ``initial`` (``cfg.progress``), and the W&B run (``cfg.track``).
    The other ranks log nothing."""
    if not ranks.main:
        return Metrics()
    sinks = []
    if cfg.track:  # first: the sink most likely to fail (login, network)
        sinks.append(WandbRun(run_dir, cfg.wandb_project_name, cfg.wandb_entity,
                              config_to_dict(cfg)))
    # A resumed run hides what the interrupted one logged after its checkpoint.
    sinks.append(TensorBoard(run_dir, purge_step=None if resume is None
                             else resume["counters"]["global_step"] + 1))
    if cfg.progress:
        sinks.append(ProgressBar(total, initial))
    return Metrics(sinks)


def final_evaluation(cfg: TrainConfig, agent, device: torch.device) -> dict[str, Any]:
    """``cfg.eval_episodes`` episodes on seeds that training did not use
    (:func:`trxl_rl.evaluate.summarize` of them, and ``eval_deterministic``)."""
    from trxl_rl.evaluate import EVAL_SEED_OFFSET, run_episodes, summarize

    agent.eval()
    results = run_episodes(agent, cfg.env.id, cfg.env.kwargs, cfg.eval_episodes,
                           seed=cfg.seed + EVAL_SEED_OFFSET, device=device,
                           deterministic=cfg.eval_deterministic)
    return {**summarize(results), "eval_deterministic": cfg.eval_deterministic}


def greedy_score(cfg: TrainConfig, agent, device: torch.device) -> float:
    """The greedy policy's ``threshold_metric`` (success rate or mean return) over
    ``cfg.stop_greedy_episodes`` episodes on seeds of their own (``STOP_SEED_OFFSET``), for
    ``stop_at``. Training's state is left as it was: its envs are not touched, and torch's
    random numbers are restored afterwards."""
    from trxl_rl.evaluate import STOP_SEED_OFFSET, run_episodes, summarize

    agent.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        results = run_episodes(agent, cfg.env.id, cfg.env.kwargs, cfg.stop_greedy_episodes,
                               seed=cfg.seed + STOP_SEED_OFFSET, device=device,
                               deterministic=True)
    return summarize(results)["success_rate" if cfg.threshold_metric == "success"
                              else "return_mean"]


OVERRIDE_HELP = "\n".join(
    f"  --{name} VALUE" for name in sorted(
        f"{prefix}{f.name}{'.FIELD' if prefix == 'model.' and f.type == 'dict' else ''}"
        for prefix, section in (("env.", EnvConfig), ("model.", ModelConfig),
                                ("ppo.", PPOConfig), ("", TrainConfig))
        for f in dataclasses.fields(section)
        if f.name not in ("env", "model", "ppo")
    )
) + ("\n  (model.trxl.FIELD, for trxl and gtrxl: "
     + ", ".join(f.name for f in dataclasses.fields(TrXLConfig) if f.name != "input_dim")
     + "; model.gru.FIELD, model.lstm.FIELD: "
     + ", ".join(f.name for f in dataclasses.fields(RecurrentConfig)
                 if f.name not in ("input_dim", "cell"))
     + "; only the section of model.backbone applies)")


def yaml_bool(raw: str) -> bool:
    """A boolean command-line value, spelled as in YAML (true/false, yes/no, on/off)."""
    value = yaml.safe_load(raw) if raw.strip() else None
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")
    return value


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m trxl_rl.train",
        description="Train PPO with a Transformer-XL memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be overridden with --KEY VALUE (dotted for nested "
               "fields, VALUE parsed as YAML):\n" + OVERRIDE_HELP
               + f"\n\nPresets (for --env): {', '.join(PRESETS)}; these env ids start from "
                 f"their preset: {', '.join(ENV_PRESETS)}"
               + "\n\nData-parallel on K processes (env.num_envs per process, total_steps over "
                 "all):\n  torchrun --standalone --nproc-per-node K -m trxl_rl.train ...",
    )
    parser.add_argument("--env", help="preset short name or any gymnasium env id "
                                      "(default: MiniGrid-Memory)")
    parser.add_argument("--config", help="YAML config file (fields as in configs/*.yaml)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--total-steps", type=int)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--run-name")
    parser.add_argument("--track", nargs="?", const=True, type=yaml_bool, metavar="BOOL",
                        help="also log to Weights & Biases (needs the wandb extra), as a run "
                             "named after the run directory (default: false; --track alone "
                             "is --track true)")
    parser.add_argument("--wandb-project-name", metavar="NAME",
                        help="W&B project (default: trxl_rl)")
    parser.add_argument("--wandb-entity", metavar="NAME",
                        help="W&B team or user (default: W&B's default entity)")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue the run in directory RUN (e.g. runs/<run>) from its "
                             "newest checkpoint, or from the checkpoint file RUN, with the "
                             "run's own config; only --total-steps, --stop_at, "
                             "--stop_updates, --stop_greedy_episodes, --device, --threads, "
                             "--progress, --checkpoint_every, --eval_episodes, "
                             "--eval_deterministic, "
                             "--track, --wandb-project-name and "
                             "--wandb-entity may change (a run of K torchrun ranks resumes "
                             "with K ranks; a tracked run continues its W&B run). "
                             "SIGINT/SIGTERM during training save a checkpoint after the "
                             "current update and exit with 130/143")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--") or i + 1 >= len(rest):
            raise ConfigError(f"cannot parse argument {key!r}; overrides are --KEY VALUE pairs "
                              "(see --help)")
        key = key[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            raw = rest[i + 1]
            i += 2
        try:
            overrides[key.replace("-", "_")] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"cannot parse the value {raw!r} of --{key}") from None
    for name, value in (("seed", args.seed), ("total_steps", args.total_steps),
                        ("device", args.device), ("run_name", args.run_name),
                        ("track", args.track), ("wandb_project_name", args.wandb_project_name),
                        ("wandb_entity", args.wandb_entity)):
        if value is not None:
            overrides[name] = value
    return args, overrides


def resolve_config(args: argparse.Namespace, overrides: dict[str, Any]) -> TrainConfig:
    """Preset or config file, then --env, then overrides."""
    base: dict[str, Any] = {}
    env = args.env
    if args.config:
        if env is not None and preset_path(env) is not None:
            raise ConfigError(f"--env {env} is a preset and --config {args.config} a config "
                              "file: give one of them (or --env with a gymnasium id)")
        base = read_yaml(args.config)
    else:
        preset = env or "MiniGrid-Memory"
        preset = ENV_PRESETS.get(preset, preset)
        if preset_path(preset) is not None:
            base = read_yaml(preset_path(preset))
    if env is not None and preset_path(env) is None:
        base.setdefault("env", {})
        base["env"] = {**base["env"], "id": env}
    return build_config(base, overrides)


def check_new_run_dir(cfg: TrainConfig) -> None:
    """:raises ConfigError: ``--run-name`` names a directory that already holds a run (a new
    run would overwrite its config and checkpoints and mix into its logs)."""
    run_dir = Path(cfg.log_dir) / cfg.run_name if cfg.run_name else None
    if run_dir is not None and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"{str(run_dir)!r} already holds a run: continue it with --resume "
                          f"{run_dir}, or choose another --run-name")


def main(argv: list[str] | None = None) -> int:
    """The CLI, in a single process or on every rank that ``torchrun`` starts; returns the
    exit code (2: a configuration or checkpoint error, found on any rank before anything is
    written; 130/143: stopped by SIGINT/SIGTERM; 1: another rank was lost)."""
    ranks = Ranks.from_environment()
    if not ranks.main:
        warnings.simplefilter("ignore")  # the other ranks print errors only
    ranks.start()
    try:
        return _main(argv, ranks)
    except RankLost as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        ranks.close()


def _main(argv: list[str] | None, ranks: Ranks) -> int:
    from trxl_rl.agents import build_agent
    from trxl_rl.agents.encoders import is_image_space
    from trxl_rl.envs import UnknownEnvError, make_env

    resume, error = None, None
    try:
        args, overrides = parse_args(argv)
        if args.resume is not None:
            if args.env is not None or args.config is not None:
                raise ConfigError("--resume takes env and config from the checkpoint; "
                                  "drop --env/--config")
            resume = load_checkpoint(args.resume, resume=True)
            cfg = resume_config(resume, overrides)
        else:
            cfg = resolve_config(args, overrides)
        if ranks.distributed:  # torchrun started the ranks: the config records how many
            cfg.ranks = ranks.world_size
        if resume is not None:
            check_world_size(resume, cfg.ranks)
        try:  # the ranks this run has, or those this process will start
            planned = ranks if ranks.distributed else Ranks(0, cfg.ranks, cfg.ranks - 1)
            planned.check_device(resolve_device(cfg.device))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            env = make_env(cfg.env.id, **cfg.env.kwargs)  # fail on a bad env before writing
        except UnknownEnvError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(f"bad env.kwargs for {cfg.env.id!r}: {err}") from None
        env.close()
        if cfg.ppo.reconstruction_coef > 0 and not is_image_space(env.observation_space):
            space = describe_space(space_to_dict(env.observation_space))
            raise ConfigError(
                f"ppo.reconstruction_coef needs image observations (uint8 (H, W, C) with high "
                f"255); {cfg.env.id} gives {space} (a symbolic grid has a smaller high): set "
                f"it to 0")
        if resume is not None:
            check_spaces(resume, env.observation_space, env.action_space, cfg.env.id)
        try:  # the backbone's fields and the spaces, before anything is written
            build_agent(cfg, env.observation_space, env.action_space)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if resume is None and ranks.main:
            check_new_run_dir(cfg)
        if cfg.track and ranks.main:  # rank 0 alone logs
            try:
                check_wandb()
            except ImportError as err:
                raise ConfigError(str(err)) from None
    except (ConfigError, UnknownEnvError, CheckpointError) as err:
        error = str(err)
    failed = ranks.first_error(error)  # every rank stops if any rank's check failed
    if failed is not None:
        rank, message = failed
        if ranks.main:
            print(f"error: {message}" if rank == 0 else f"error: rank {rank}: {message}",
                  file=sys.stderr)
        return 2
    if cfg.ranks > 1 and not ranks.distributed:  # everything checked: start the ranks
        return start_local_ranks(cfg.ranks, sys.argv[1:] if argv is None else list(argv))
    try:
        summary = train(cfg, resume=resume, ranks=ranks)
    except (CheckpointError, ConfigError) as err:  # found before the run writes anything
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        if ranks.main:
            print(f"{stop}; continue with: {resume_command(ranks)} --resume "
                  f"{run_dir_of(stop.checkpoint)}", file=sys.stderr)
        # No rank exits before rank 0 has saved and said so: torchrun stops every other rank
        # as soon as one exits with an error code.
        ranks.barrier()
        return stop.exit_code
    if ranks.main:
        print(json.dumps(summary))
    ranks.finish()
    return 0


def resume_command(ranks: Ranks) -> str:
    """The command that continues a run of ``ranks`` (before its ``--resume RUN``): on one
    machine the plain CLI, which starts as many ranks as the run's config records."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size)) == ranks.world_size:
        return launch_command(1)  # one machine
    return f"the same torchrun command ({ranks.world_size} ranks) with -m trxl_rl.train"


if __name__ == "__main__":
    sys.exit(main())
