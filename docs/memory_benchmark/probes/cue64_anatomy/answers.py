"""Per checkpoint of a CueRecall run: the answer step's P(correct answer) per cue and the
last layer's attention (per head) on the cue token, on 64 fresh episodes (32 per cue).

    python answers.py RUN/checkpoints [DELAY]      # prints one line per checkpoint

Train the run with the suite's options and ``--checkpoint_every 1`` (README.md here).
"""

from __future__ import annotations

import glob
import sys

import torch

from trxl_rl.checkpoint import load_agent
from trxl_rl.evaluate import AttentionRecorder

EPISODES = 64


def cue_episodes(agent, delay: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Play ``EPISODES`` CueRecall episodes (greedy; the actions before the query are ignored
    by the env, so the observations are known in advance).

    :return: ``(cues [B], P(correct answer) [B], attention on the cue [B, H])``.
    """
    cues = torch.arange(EPISODES) % 2
    state = agent.initial_state(EPISODES)
    start = torch.ones(EPISODES, dtype=torch.bool)
    with torch.no_grad(), AttentionRecorder(agent.memory.layers[-1]) as recorder:
        for t in range(delay + 1):
            obs = torch.zeros(EPISODES, 3)
            if t == 0:
                obs[torch.arange(EPISODES), cues] = 1.0
            if t == delay:
                obs[:, 2] = 1.0  # the query flag
            out = agent.act(obs, state, start, True)
            state, start = out.state, torch.zeros_like(start)
    p = out.log_prob.exp()  # of the greedy action; two actions
    p_correct = torch.where(out.action == cues, p, 1 - p)
    weights = recorder.weights[-1][:, :, 0]  # [B, H, M + 1]: oldest key first, itself last
    return cues, p_correct, weights[:, :, -1 - delay]


def main() -> None:
    folder, delay = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64
    for path in sorted(glob.glob(f"{folder}/update_*.pt")):
        agent = load_agent(path)
        cues, p_correct, on_cue = cue_episodes(agent, delay)
        line = [path.rsplit("_", 1)[-1].removesuffix(".pt")]
        for cue in (0, 1):
            rows = cues == cue
            line.append(f"cue {cue}: P(correct) {p_correct[rows].mean():.4f}, attention on "
                        f"the cue per head {[round(x, 3) for x in on_cue[rows].mean(0).tolist()]}")
        print("  ".join(line))


if __name__ == "__main__":
    main()
