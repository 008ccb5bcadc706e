"""Replay one update of a run exactly (resume from checkpoint K: the same rollout, the same
minibatches) with one change, and report the answer step's P(correct) per cue before and
after it (``answers.py``).

    python replay_update.py RUN K             # the variants of README.md here, one line each

A variant is either ``ppo`` overrides or another advantage normalisation
(``trxl_rl.ppo.normalize_advantages`` replaced for the replay).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from answers import cue_episodes

import trxl_rl.ppo as ppo
import trxl_rl.train as train
from trxl_rl.checkpoint import load_checkpoint
from trxl_rl.resume import resume_config

NORMALIZE = ppo.normalize_advantages


def _floor(floor: float):
    return lambda adv, ranks: (adv - adv.mean()) / adv.std().clamp_min(floor)


def _masked(answers: bool):
    """Normalised as usual, then only the answer steps (the last of each one-episode
    segment) or only the other steps keep their advantage."""
    def normalize(adv, ranks):
        keep = torch.zeros_like(adv)
        keep[:, -1] = 1.0
        return NORMALIZE(adv, ranks) * (keep if answers else 1 - keep)
    return normalize


def _clamped(bound: float):
    return lambda adv, ranks: NORMALIZE(adv, ranks).clamp(-bound, bound)


VARIANTS = {  # name: (ppo overrides, advantage normalisation)
    "none (the run)": ({}, NORMALIZE),
    "value_coef 0": ({"value_coef": 0.0}, NORMALIZE),
    "entropy_coef 0": ({"entropy_coef": 0.0}, NORMALIZE),
    "clip_coef 0.1": ({"clip_coef": 0.1}, NORMALIZE),
    "clip_value_loss": ({"clip_value_loss": True}, NORMALIZE),
    "learning_rate 1e-3": ({"learning_rate": 1e-3}, NORMALIZE),
    "epochs 1": ({"epochs": 1}, NORMALIZE),
    "epochs 2": ({"epochs": 2}, NORMALIZE),
    "norm_advantages false": ({"norm_advantages": False}, NORMALIZE),
    "centred, not scaled": ({}, lambda adv, ranks: adv - adv.mean()),
    "scaled, not centred": ({}, lambda adv, ranks: adv / (adv.std() + 1e-8)),
    "std floor 0.05": ({}, _floor(0.05)),
    "std floor 0.1": ({}, _floor(0.1)),
    "std floor 0.2": ({}, _floor(0.2)),
    "policy gradient of the answer steps only": ({}, _masked(answers=True)),
    "policy gradient of the other steps only": ({}, _masked(answers=False)),
    "normalised advantages clamped to +-5": ({}, _clamped(5.0)),
    "normalised advantages clamped to +-2": ({}, _clamped(2.0)),
}


class _Stop(Exception):
    pass


def replay(run: Path, k: int, overrides: dict, normalize) -> dict:
    copy = Path(tempfile.mkdtemp()) / run.name  # resuming writes into the run directory
    shutil.copytree(run, copy)
    checkpoint = load_checkpoint(copy / "checkpoints" / f"update_{k:07d}.pt", resume=True)
    cfg = resume_config(checkpoint, {})
    for key, value in overrides.items():
        setattr(cfg.ppo, key, value)
    iteration, result = train.iteration, {}

    def one_update(agent, *args, **kwargs):
        result["before"] = p_correct(agent)
        _, stats = iteration(agent, *args, **kwargs)
        result["after"] = p_correct(agent)
        result["approx_kl"] = stats["losses/approx_kl"]
        result["approx_kl_after_update"] = stats["diagnostics/approx_kl_after_update"]
        raise _Stop

    train.iteration, ppo.normalize_advantages = one_update, normalize
    try:
        train.train(cfg, resume=checkpoint)
    except _Stop:
        pass
    finally:
        train.iteration, ppo.normalize_advantages = iteration, NORMALIZE
        shutil.rmtree(copy.parent)
    return result


def p_correct(agent) -> list[float]:
    cues, p, _ = cue_episodes(agent, delay=64)
    return [round(p[cues == cue].mean().item(), 4) for cue in (0, 1)]


def main() -> None:
    run, k = Path(sys.argv[1]), int(sys.argv[2])
    for name, (overrides, normalize) in VARIANTS.items():
        print(f"{name}: {replay(run, k, overrides, normalize)}", flush=True)


if __name__ == "__main__":
    main()
