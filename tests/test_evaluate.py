"""Specification of evaluation: the CLI's numbers, JSON, video, attention map and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from trxl_rl import TransformerXL, TrXLConfig
from trxl_rl.agents import build_agent
from trxl_rl.checkpoint import latest_checkpoint, save_checkpoint, space_to_dict
from trxl_rl.config import config_to_dict
from trxl_rl.envs import make_env
from trxl_rl.evaluate import AttentionRecorder, main
from trxl_rl.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import assert_one_line_error, bad_checkpoints, snapshot  # noqa: E402
from test_train import small_config  # noqa: E402

JSON_FIELDS = {"checkpoint", "update", "global_step", "env", "env_kwargs", "seed",
               "backbone", "deterministic", "memory_length", "episodes", "success_rate",
               "success_ci95", "return_mean", "return_median", "length_mean", "length_median"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Newest checkpoint of a tiny 2-update MiniGrid-Memory run (memory length 4)."""
    root = tmp_path_factory.mktemp("runs")
    train(small_config(log_dir=str(root), run_name="tiny"))
    return latest_checkpoint(root / "tiny")


def untrained_checkpoint(path: Path, noise: float = 0.0, **overrides) -> Path:
    """A checkpoint of a freshly initialised agent for ``small_config(**overrides)``, every
    weight moved by ``noise`` times standard normal noise (a policy far from uniform)."""
    cfg = small_config(**overrides)
    env = make_env(cfg.env.id, **cfg.env.kwargs)
    agent = build_agent(cfg, env.observation_space, env.action_space)
    if noise:
        with torch.no_grad():
            for p in agent.parameters():
                p.add_(noise * torch.randn_like(p))
    return save_checkpoint(path, {
        "model": agent.state_dict(), "config": config_to_dict(cfg),
        "spaces": {"observation": space_to_dict(env.observation_space),
                   "action": space_to_dict(env.action_space)},
        "counters": {"global_step": 0, "update": 0},
    })


# --- attention -------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding,norm,gating", [
    ("relative", "pre", False), ("none", "pre", False), ("learned", "post", False),
    ("absolute", "pre", True),
])
def test_recomputed_attention_weights_reproduce_the_layers_attention_output(encoding, norm,
                                                                            gating):
    torch.manual_seed(0)
    trxl = TransformerXL(TrXLConfig(input_dim=6, dim=16, num_layers=2, num_heads=4,
                                    memory_length=5, positional_encoding=encoding, norm=norm,
                                    gating=gating)).eval()
    for p in trxl.parameters():  # non-zero u, v biases and a less uniform attention
        p.data.add_(0.3 * torch.randn_like(p))
    for layer in trxl.layers:
        values, mixed = [], []
        hooks = [layer.register_forward_pre_hook(lambda m, args, seen=values:
                                                 seen.append(args[2])),
                 layer.out.register_forward_pre_hook(lambda m, args, seen=mixed:
                                                     seen.append(args[0]))]
        with AttentionRecorder(layer) as recorder, torch.no_grad():
            x = torch.randn(3, 9, 6)
            starts = torch.zeros(3, 9, dtype=torch.bool)
            starts[0, 0], starts[1, 4], starts[2, 7] = True, True, True
            state = trxl.initial_state(3)
            trxl(x, state, starts)  # segment mode
            for t in range(9):  # step mode, with the key/value cache
                _, state = trxl.step(x[:, t], state, starts[:, t])
        for hook in hooks:
            hook.remove()
        assert len(recorder.weights) == len(values) == len(mixed) == 10
        for weights, visible, v, out in zip(recorder.weights, recorder.visible, values, mixed,
                                            strict=True):
            assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
            assert torch.all(weights.masked_select(~visible.expand_as(weights)) == 0)
            recomputed = (weights @ v).transpose(1, 2).flatten(2)  # [B, N, D]
            assert torch.allclose(recomputed, out, atol=1e-5)


# --- the CLI ---------------------------------------------------------------------------------

def test_evaluate_writes_table_json_gif_and_attention_png(trained, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(trained), "--episodes", "6", "--num-envs", "3", "--seed", "5",
                 "--json", str(out / "eval.json"), "--video", str(out / "episodes.gif"),
                 "--video-episodes", "2", "--attention", str(out / "attention.png")])
    printed = capsys.readouterr().out
    assert code == 0
    for needle in ("episodes      6", "success rate", "95% CI", "return", "length"):
        assert needle in printed
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == JSON_FIELDS
    assert report["episodes"] == 6 and report["seed"] == 5 and report["update"] == 2
    assert report["env"] == "MiniGrid-MemoryS9-v0" and report["memory_length"] == 4
    assert 0.0 <= report["success_ci95"][0] <= report["success_rate"] <= report["success_ci95"][1]
    assert 1 <= report["length_mean"] <= 12
    frames = iio.imread(out / "episodes.gif", index=None)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and 2 * 2 <= len(frames) <= 2 * 13
    assert frames.std() > 0
    image = iio.imread(out / "attention.png")
    assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "episodes.gif",
                                                     "eval.json"]  # no temp files left


def test_evaluate_on_a_larger_env_with_a_longer_memory(trained, tmp_path, capsys):
    code = main([str(trained.parent.parent), "--env", "MiniGrid-MemoryS11-v0",
                 "--env-kwargs", "{max_steps: 20}", "--memory-length", "16", "--episodes", "4",
                 "--deterministic", "--json", str(tmp_path / "eval.json"),
                 "--attention", str(tmp_path / "attention.png")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["env"] == "MiniGrid-MemoryS11-v0" and report["memory_length"] == 16
    assert report["env_kwargs"] == {"max_steps": 20} and report["deterministic"] is True
    assert report["checkpoint"] == str(trained)


@pytest.mark.parametrize("backbone", ["gru", "lstm", "none"])
def test_evaluate_runs_every_backbone(tmp_path, backbone, capsys):
    path = untrained_checkpoint(tmp_path / "untrained.pt", **{"model.backbone": backbone})
    assert main([str(path), "--episodes", "3", "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["backbone"] == backbone and report["memory_length"] is None
    assert report["episodes"] == 3
    assert f"stochastic, {backbone}, seed" in capsys.readouterr().out


def test_same_seed_gives_the_same_evaluation(trained, tmp_path):
    reports = []
    for i in range(2):
        assert main([str(trained), "--episodes", "4", "--seed", "3",
                     "--json", str(tmp_path / f"{i}.json")]) == 0
        reports.append(json.loads((tmp_path / f"{i}.json").read_text()))
    assert reports[0] == reports[1]


def bad_cases(trained: Path, root: Path) -> dict:
    """name -> (argv, expected message part)."""
    cases = {name: ([str(path)], needle)
             for name, (path, needle) in bad_checkpoints(trained, root / "bad").items()}
    learned = untrained_checkpoint(root / "learned.pt",
                                   **{"model.trxl.positional_encoding": "learned"})
    gru = untrained_checkpoint(root / "gru.pt", **{"model.backbone": "gru"})
    cue = untrained_checkpoint(root / "cue.pt", **{"env.id": "trxl_rl/CueRecall-v0",
                                                   "env.kwargs": {}})
    cases.update({
        "spaces differ": ([str(trained), "--env", "CueRecall", "--env-kwargs",
                           "{max_steps: null}"],
                          "env 'CueRecall' does not fit the checkpoint: its observation space "
                          "is Box(shape=(3,), dtype=float32), the policy was trained on "
                          "Box(shape=(3, 3, 3), dtype=uint8)"),
        "unknown env": ([str(trained), "--env", "MiniGrid-MemoryS9-v1"],
                        "did you mean 'MiniGrid-MemoryS9-v0'"),
        "bad env kwargs": ([str(trained), "--env-kwargs", "{obs: pixels}"],
                           "cannot make env 'MiniGrid-MemoryS9-v0'"),
        "training kwargs unknown to the env": ([str(trained), "--env", "CueRecall"],
                                               "the training env's kwargs, changed by "
                                               "--env-kwargs"),
        "learned encoding, longer memory": ([str(learned), "--memory-length", "8"],
                                            "cannot run with memory_length 8"),
        "memory length of a GRU": ([str(gru), "--memory-length", "8"],
                                   "--memory-length applies to Transformer-XL backbones"),
        "attention of a GRU": ([str(gru), "--attention", str(root / "gru.png")],
                               "--attention applies to Transformer-XL backbones (trxl, gtrxl); "
                               "this agent's backbone is 'gru'"),
        "video format": ([str(trained), "--video", str(root / "out.avi")],
                         "--video must end in .gif or .mp4"),
        "env cannot render": ([str(cue), "--video", str(root / "out.gif")],
                              "cannot render rgb_array frames"),
        "attention format": ([str(trained), "--attention", str(root / "out.jpg")],
                             "--attention must end in .png, .pdf, .svg"),
    })
    if not torch.cuda.is_available():
        cases["no cuda"] = ([str(trained), "--device", "cuda"], "torch sees no CUDA device")
    return cases


CASES = ["missing", "empty run dir", "text file", "truncated", "unsafe pickle",
         "other torch file", "future format", "spaces differ", "unknown env", "bad env kwargs",
         "training kwargs unknown to the env",
         "learned encoding, longer memory", "video format", "env cannot render",
         "attention format", "no cuda"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_keeps_existing_output(trained, tmp_path, capsys,
                                                                 monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    cases = bad_cases(trained, tmp_path / "inputs")
    if case not in cases:
        pytest.skip("this machine has CUDA")
    argv, needle = cases[case]
    previous = tmp_path / "eval.json"
    previous.write_text('{"old": true}\n')
    before = snapshot(tmp_path)
    code = main([*argv, "--episodes", "2", "--json", str(previous)])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--env", "--env-kwargs", "--episodes", "--seed", "--deterministic",
                   "--memory-length", "--num-envs", "--device", "--json", "--video",
                   "--video-episodes", "--attention"):
        assert option in text


def test_bad_arguments_exit_2(trained):
    with pytest.raises(SystemExit) as exited:
        main([str(trained), "--episodes", "0"])
    assert exited.value.code == 2


def test_cli_entry_point_reports_a_missing_checkpoint_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trxl_rl.evaluate", "nope.pt"],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.strip() == "error: checkpoint 'nope.pt' does not exist; check the path"
    assert list(tmp_path.iterdir()) == []


def test_wilson_interval_brackets_the_rate():
    from trxl_rl.evaluate import wilson_interval

    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # nan without episodes
    low, high = wilson_interval(93, 100)
    assert 0.86 < low < 0.93 < high < 0.97
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert np.isclose(sum(wilson_interval(5, 10)), 1.0)
