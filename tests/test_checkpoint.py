"""Specification of checkpoints: safe atomic files, load_agent, exact resume, clean stops."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import trxl_rl
from trxl_rl.agents.observations import obs_to_tensor
from trxl_rl.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from trxl_rl.envs import make_env
from trxl_rl.resume import TrainingInterrupted, resume_config
from trxl_rl.train import main, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import small_config  # noqa: E402

ENV = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def interrupt_after(update_to_stop: int, signum: int = signal.SIGINT):
    """An ``on_update`` callback that sends this process ``signum`` during an update."""
    def on_update(update, stats):
        if update == update_to_stop:
            os.kill(os.getpid(), signum)
    return on_update


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """An uninterrupted 2-update run with a checkpoint after each update, and its stats."""
    root = tmp_path_factory.mktemp("runs")
    stats = []
    train(small_config(log_dir=str(root), run_name="a", checkpoint_every=1),
          on_update=lambda update, s: stats.append(s))
    return root / "a", stats


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["counters"] == b["counters"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for param in state_a:
        for name in state_a[param]:
            assert torch.equal(state_a[param][name], state_b[param][name]), (param, name)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["shuffle"], b["shuffle"])
    memory_a, memory_b = a["carry"]["memory"], b["carry"]["memory"]
    assert memory_a["records"].keys() == memory_b["records"].keys()
    for name in memory_a["records"]:
        assert torch.equal(memory_a["records"][name], memory_b["records"][name]), name
    assert torch.equal(memory_a["valid"], memory_b["valid"])
    assert torch.equal(a["carry"]["obs"], b["carry"]["obs"])


# --- save / load -----------------------------------------------------------------------------

def test_loaded_agent_acts_and_values_exactly_like_the_saved_one(run_a, tmp_path):
    path = latest_checkpoint(run_a[0])
    checkpoint = load_checkpoint(path)
    agent = trxl_rl.load_agent(path)
    assert not agent.training
    assert agent.train_config.model.backbone == "trxl"
    assert agent.train_config.model.trxl["memory_length"] == 4
    saved = {k: v for k, v in agent.state_dict().items()}
    for key, value in checkpoint["model"].items():
        assert torch.equal(saved[key], value)
    # A second, independently built copy fed the same observations and memory.
    other = trxl_rl.load_agent(run_a[0])
    env = make_env("MiniGrid-MemoryS9-v0", max_steps=12)
    obs, _ = env.reset(seed=7)
    state_a, state_b = agent.initial_state(1), other.initial_state(1)
    for t in range(20):
        x = obs_to_tensor(obs[None], torch.device("cpu"))
        start = torch.tensor([t in (0, 12)])
        torch.manual_seed(t)
        out_a = agent.act(x, state_a, start)
        torch.manual_seed(t)
        out_b = other.act(x, state_b, start)
        assert torch.equal(out_a.action, out_b.action)
        assert torch.equal(out_a.value, out_b.value)
        assert torch.equal(out_a.log_prob, out_b.log_prob)
        assert torch.equal(agent.value(x, state_a, start), out_a.value)
        assert torch.equal(agent.act(x, state_a, start, deterministic=True).action,
                           other.act(x, state_b, start, deterministic=True).action)
        state_a, state_b = out_a.state, out_b.state
        obs, *_ = env.step(int(out_a.action))
    assert torch.equal(state_a.hidden, state_b.hidden)
    # Saving the loaded agent again and loading it gives the same weights.
    copy = save_checkpoint(tmp_path / "copy.pt", {**checkpoint, "model": agent.state_dict()})
    again = trxl_rl.load_agent(copy)
    for key, value in agent.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_load_agent_runs_with_a_longer_memory_than_trained(run_a):
    agent = trxl_rl.load_agent(run_a[0])
    state = agent.initial_state(2, memory_length=16)
    obs = torch.zeros(2, 3, 3, 3, dtype=torch.uint8)
    out = agent.act(obs, state, torch.ones(2, dtype=torch.bool))
    assert out.state.hidden.shape[2] == 16


def test_import_trxl_rl_stays_light_and_offers_load_agent():
    code = ("import sys, trxl_rl; assert callable(trxl_rl.load_agent); "
            "heavy = {'gymnasium', 'minigrid', 'tensorboard'} & set(sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_load_agent_imports_no_training_module(run_a):
    code = (f"import sys, trxl_rl; agent = trxl_rl.load_agent({str(run_a[0])!r}); "
            "training = {'trxl_rl.train', 'trxl_rl.ppo', 'trxl_rl.rollout', 'trxl_rl.resume', "
            "'trxl_rl.distributed'} & set(sys.modules); assert not training, training")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_checkpoints_hold_everything_the_issue_lists(run_a):
    checkpoint = load_checkpoint(run_a[0])
    assert checkpoint["format_version"] == FORMAT_VERSION
    for key in ("model", "optimizer", "config", "spaces", "counters", "rng", "shuffle",
                "carry", "envs"):
        assert key in checkpoint
    assert set(checkpoint["rng"]) >= {"torch", "numpy", "python"}
    assert checkpoint["counters"] == {"global_step": 64, "update": 2}
    assert checkpoint["spaces"]["action"] == {"type": "Discrete", "n": 3, "start": 0}
    assert checkpoint["config"]["env"]["id"] == "MiniGrid-MemoryS9-v0"
    assert checkpoint["config"]["model"]["backbone"] == "trxl"
    records = checkpoint["carry"]["memory"]["records"]
    assert records["hidden"].shape == (2, 4, 2, 32)  # [B, M, L, D]
    assert records["position"].shape == checkpoint["carry"]["memory"]["valid"].shape == (2, 4)


# --- atomic writes ---------------------------------------------------------------------------

def test_failure_while_writing_leaves_the_previous_checkpoint_loadable(run_a, tmp_path,
                                                                       monkeypatch):
    good = load_checkpoint(run_a[0])
    target = tmp_path / "checkpoints" / "update_0000002.pt"
    save_checkpoint(target, good)
    before = target.read_bytes()

    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)
        f.flush()
        raise KeyboardInterrupt  # killed while the bytes are being written

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, good)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target.with_name("update_0000003.pt"), good)
    monkeypatch.setattr(torch, "save", real_save)

    def dies_before_rename(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", dies_before_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, {**good, "counters": {"global_step": 0, "update": 0}})
    monkeypatch.undo()

    assert target.read_bytes() == before
    assert latest_checkpoint(tmp_path) == target  # no half-written update_0000003.pt
    assert load_checkpoint(tmp_path)["counters"] == good["counters"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["update_0000002.pt"]


KILL_SCRIPT = """
import sys, torch
from trxl_rl.checkpoint import save_checkpoint
payload = {"model": {"w": torch.randn(4_000_000)}, "config": {}, "spaces": {}}
for i in range(1000):
    save_checkpoint(sys.argv[1], {**payload, "counters": {"update": i}})
    print(i, flush=True)
"""


def test_sigkill_while_saving_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "update_0000001.pt"
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        assert child.stdout.readline().strip() == "0"
        while not list(tmp_path.glob(".*.tmp")):  # the next save has begun writing
            time.sleep(0.001)
    finally:
        child.kill()
        child.wait()
    checkpoint = load_checkpoint(path)
    assert checkpoint["model"]["w"].shape == (4_000_000,)
    assert latest_checkpoint(tmp_path) == path  # a leftover temp file is never picked
    save_checkpoint(tmp_path / "update_0000002.pt", checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["update_0000001.pt",
                                                          "update_0000002.pt"]


# --- exact resume ----------------------------------------------------------------------------

def test_episode_replay_seeds_every_episode_and_restores_an_env_mid_episode():
    from trxl_rl.envs import EpisodeReplay
    from trxl_rl.envs.replay import episode_seed

    def memory_env():
        return make_env("MiniGrid-MemoryS9-v0", max_steps=6)

    plain, env = memory_env(), EpisodeReplay(memory_env())
    assert np.array_equal(env.reset(seed=5)[0], plain.reset(seed=5)[0])  # episode 0: seed 5
    seeds = {episode_seed(5, k) for k in range(1000)} | {episode_seed(6, k) for k in range(1000)}
    assert len(seeds) == 2000
    for action in (0, 2, 2, 1, 2, 2):
        env.step(action)
    env.reset()
    for action in (2, 0, 2):
        env.step(action)
    saved = env.replay_state()
    assert saved["episode"] == 1 and saved["actions"].tolist() == [2, 0, 2]
    copy = EpisodeReplay(memory_env())
    copy.reset(seed=0)
    copy.restore(saved)
    for action in (1, 2, 2):  # the rest of the episode, then the next ones
        a, b = env.step(action), copy.step(action)
        assert np.array_equal(a[0], b[0]) and a[1:4] == b[1:4]
    for _ in range(3):
        assert np.array_equal(env.reset()[0], copy.reset()[0])


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(run_a, tmp_path, vectorization):
    """2 updates == 1 update + SIGINT + resume + 1 update: weights, Adam moments, generators,
    memory and the logged losses are identical (envs are mid-episode at the cut)."""
    if vectorization == "async":
        reference_stats = []
        train(small_config(log_dir=str(tmp_path), run_name="a", checkpoint_every=1,
                           **{"env.vectorization": "async"}),
              on_update=lambda u, s: reference_stats.append(s))
        reference = load_checkpoint(tmp_path / "a")
    else:
        reference, reference_stats = load_checkpoint(run_a[0]), run_a[1]
    cfg = small_config(log_dir=str(tmp_path), run_name="b",
                       **{"env.vectorization": vectorization})
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, on_update=interrupt_after(1))
    assert stopped.value.exit_code == 130
    assert stopped.value.checkpoint == tmp_path / "b" / "checkpoints" / "update_0000001.pt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler removed

    checkpoint = load_checkpoint(tmp_path / "b", resume=True)
    assert any(len(env["actions"]) > 0 for env in checkpoint["envs"]["envs"])  # mid-episode
    resumed_stats = []
    train(resume_config(checkpoint, {}), on_update=lambda u, s: resumed_stats.append((u, s)),
          resume=checkpoint)
    assert [u for u, _ in resumed_stats] == [2]
    for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl",
                "charts/learning_rate"):
        assert resumed_stats[0][1][key] == reference_stats[1][key], key
    assert_same_training_state(reference, load_checkpoint(tmp_path / "b"))


@pytest.mark.parametrize("backbone", ["gru", "lstm", "none", "gtrxl"])
def test_every_backbone_resumes_bit_for_bit_and_loads_for_evaluation(tmp_path, backbone):
    """Checkpoints record the backbone and carry its memory: 2 updates == 1 + resume + 1."""
    reference_stats = []
    train(small_config(log_dir=str(tmp_path), run_name="a", checkpoint_every=1,
                       **{"model.backbone": backbone}),
          on_update=lambda u, s: reference_stats.append(s))
    with pytest.raises(TrainingInterrupted):
        train(small_config(log_dir=str(tmp_path), run_name="b", **{"model.backbone": backbone}),
              on_update=interrupt_after(1))
    checkpoint = load_checkpoint(tmp_path / "b", resume=True)
    assert checkpoint["config"]["model"]["backbone"] == backbone
    resumed = []
    train(resume_config(checkpoint, {}), on_update=lambda u, s: resumed.append(s),
          resume=checkpoint)
    assert resumed[0]["losses/policy_loss"] == reference_stats[1]["losses/policy_loss"]
    assert_same_training_state(load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b"))
    agent = trxl_rl.load_agent(tmp_path / "a")
    assert agent.train_config.model.backbone == backbone
    out = agent.act(torch.zeros(2, 3, 3, 3, dtype=torch.uint8), agent.initial_state(2),
                    torch.ones(2, dtype=torch.bool), deterministic=True)
    assert out.action.shape == (2,)


def format_2(data: dict) -> None:
    """Rewrite a Transformer-XL checkpoint of format 3 as format 2 wrote it: the TrXL fields
    directly under ``model`` and the carried memory as ``MemoryState`` fields."""
    model = data["config"]["model"]
    for key, value in model.pop("trxl").items():
        model[key] = value
    for key in ("backbone", "gru", "lstm", "custom"):
        del model[key]
    memory = data["carry"]["memory"]
    records, valid = memory["records"], memory["valid"]
    data["carry"]["memory"] = {"hidden": records["hidden"].transpose(1, 2), "valid": valid,
                               "position": torch.where(valid[:, -1], records["position"][:, -1]
                                                       + 1, 0)}
    data["format_version"] = 2


def test_format_2_checkpoints_evaluate_and_resume_as_trxl(run_a, tmp_path):
    old = write_variant(latest_checkpoint(run_a[0]).with_name("update_0000001.pt"),
                        tmp_path / "b" / "checkpoints" / "update_0000001.pt", format_2)
    agent = trxl_rl.load_agent(old)
    assert agent.train_config.model.backbone == "trxl"
    assert agent.train_config.model.trxl["memory_length"] == 4
    checkpoint = load_checkpoint(old, resume=True)
    train(resume_config(checkpoint, {}), resume=checkpoint)
    assert_same_training_state(load_checkpoint(run_a[0]), load_checkpoint(tmp_path / "b"))


def test_checkpoints_with_a_gtrxl_section_of_their_own_still_load(run_a, tmp_path):
    """Written before gtrxl read model.trxl (2026-11-29): the section is dropped, or becomes
    the trxl section of a gtrxl run."""
    from trxl_rl.checkpoint import config_from_checkpoint

    def with_section(data):
        data["config"]["model"]["gtrxl"] = {"dim": 48, "num_heads": 3, "memory_length": 9}

    path = write_variant(latest_checkpoint(run_a[0]), tmp_path / "old.pt", with_section)
    assert trxl_rl.load_agent(path).train_config.model.trxl["dim"] == 32
    checkpoint = load_checkpoint(path)
    checkpoint["config"]["model"]["backbone"] = "gtrxl"
    cfg = config_from_checkpoint(checkpoint)
    assert cfg.model.backbone == "gtrxl" and cfg.model.trxl["dim"] == 48


def test_cli_resume_continues_counters_schedules_and_tensorboard(run_a, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "a"
    shutil.copytree(run_a[0], run)
    # A crash after update 2 was logged but before its checkpoint was written.
    (run / "checkpoints" / "update_0000002.pt").unlink()
    assert main(["--resume", str(run)]) == 0
    assert_same_training_state(load_checkpoint(run_a[0]), load_checkpoint(run))
    events = EventAccumulator(str(run))
    events.Reload()
    steps = [e.step for e in events.Scalars("charts/learning_rate")]
    assert steps == [32, 64]  # update 2 logged once, by the resumed run
    assert (run / "summary.json").is_file()


def test_resume_of_a_finished_run_only_writes_its_summary(run_a, tmp_path):
    run = tmp_path / "a"
    shutil.copytree(run_a[0], run)
    checkpoints = snapshot(run / "checkpoints")
    assert main(["--resume", str(run)]) == 0
    assert snapshot(run / "checkpoints") == checkpoints


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_saves_a_checkpoint_then_exits(tmp_path, signum, code):
    args = ["--env", "MiniGrid-MemoryS9-v0", "--env.kwargs", "{max_steps: 12}",
            "--env.num_envs", "2", "--model.trxl.dim", "32", "--model.trxl.num_heads", "2",
            "--model.trxl.memory_length", "4", "--ppo.rollout_steps", "16",
            "--ppo.segment_length", "8", "--ppo.minibatches", "2", "--ppo.epochs", "1",
            "--total-steps", "10000000", "--checkpoint_every", "1", "--progress", "false",
            "--eval_episodes", "0", "--log_dir", str(tmp_path), "--run-name", "r"]
    child = subprocess.Popen([sys.executable, "-m", "trxl_rl.train", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **ENV})
    first = tmp_path / "r" / "checkpoints" / "update_0000001.pt"
    deadline = time.monotonic() + 60
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == code, stderr
    assert "Traceback" not in stderr
    assert f"--resume {tmp_path / 'r'}" in stderr
    saved = load_checkpoint(tmp_path / "r", resume=True)
    assert saved["counters"]["update"] >= 1
    assert saved["path"] == str(latest_checkpoint(tmp_path / "r"))


# --- bad input -------------------------------------------------------------------------------

def write_variant(source: Path, target: Path, change) -> Path:
    data = torch.load(source, weights_only=True)
    change(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, target)
    return target


class Boom:
    """A pickled object that would run code on load."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def bad_checkpoints(good: Path, root: Path) -> dict:
    """name -> (path, expected message part)."""
    root.mkdir(parents=True, exist_ok=True)
    text = root / "notes" / "update_0000001.pt"
    text.parent.mkdir()
    text.write_text("not a checkpoint\n")
    truncated = root / "truncated" / "update_0000001.pt"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    unsafe = root / "unsafe" / "update_0000001.pt"
    unsafe.parent.mkdir()
    torch.save({"format_version": 2, "model": Boom()}, unsafe)
    not_ours = root / "not_ours" / "update_0000001.pt"
    not_ours.parent.mkdir()
    torch.save({"weights": torch.zeros(3)}, not_ours)
    (root / "empty_run").mkdir()

    def future(data):
        data["format_version"] = 99

    def wrong_weights(data):  # e.g. saved by a version whose model had other parameters
        data["model"]["encoder.linear.weight"] = torch.zeros(1)

    return {
        "missing": (root / "nope.pt", "does not exist"),
        "empty run dir": (root / "empty_run", "no checkpoint (update_*.pt) found"),
        "text file": (text, "not a trxl_rl checkpoint (not a file written by torch.save)"),
        "truncated": (truncated, "truncated or corrupt"),
        "unsafe pickle": (unsafe, "holds Python objects other than tensors and plain data"),
        "other torch file": (not_ours, "not a trxl_rl checkpoint (keys missing)"),
        "future format": (write_variant(good, root / "future" / "update_0000001.pt", future),
                          "has checkpoint format 99, this trxl_rl reads formats 1, 2"),
        "wrong weights": (write_variant(good, root / "weights" / "update_0000001.pt",
                                        wrong_weights),
                          "weights do not fit the model its config describes"),
    }


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["missing", "empty run dir", "text file", "truncated",
                                  "unsafe pickle", "other torch file", "future format",
                                  "wrong weights"])
def test_resume_of_bad_checkpoint_is_one_line_exit_2_and_writes_nothing(run_a, tmp_path,
                                                                        capsys, case,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, needle = bad_checkpoints(latest_checkpoint(run_a[0]), tmp_path / "bad")[case]
    before = snapshot(tmp_path)
    code = main(["--resume", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_whose_optimizer_does_not_fit_is_evaluated_not_resumed(run_a, tmp_path,
                                                                         capsys):
    def drop_a_parameter(data):
        group = data["optimizer"]["param_groups"][0]
        group["params"] = group["params"][:-1]

    path = write_variant(latest_checkpoint(run_a[0]),
                         tmp_path / "run" / "checkpoints" / "update_0000001.pt", drop_a_parameter)
    trxl_rl.load_agent(path)
    before = snapshot(tmp_path)
    code = main(["--resume", str(path)])
    assert_one_line_error(code, capsys.readouterr().err,
                          "its optimizer state does not fit the model")
    assert snapshot(tmp_path) == before


def test_format_1_checkpoints_load_for_evaluation_but_cannot_be_resumed(run_a, tmp_path,
                                                                        capsys):
    def old(data):
        format_2(data)  # the same model layout
        data["format_version"] = 1
        for key in ("rng", "shuffle", "carry", "envs"):
            del data[key]

    path = write_variant(latest_checkpoint(run_a[0]), tmp_path / "old" / "update_0000002.pt",
                         old)
    assert trxl_rl.load_agent(path) is not None
    code = main(["--resume", str(tmp_path / "old")])
    assert_one_line_error(code, capsys.readouterr().err, "holds no training state to resume")


def test_resume_refuses_an_env_whose_spaces_do_not_match(run_a, tmp_path, capsys):
    def bigger_view(data):
        data["config"]["env"]["kwargs"]["view_size"] = 5

    path = write_variant(latest_checkpoint(run_a[0]), tmp_path / "r" / "update_0000002.pt",
                         bigger_view)
    before = snapshot(tmp_path)
    code = main(["--resume", str(path)])
    assert_one_line_error(
        code, capsys.readouterr().err,
        "env 'MiniGrid-MemoryS9-v0' does not fit the checkpoint: its observation space is "
        "Box(shape=(5, 5, 3), dtype=uint8), the policy was trained on "
        "Box(shape=(3, 3, 3), dtype=uint8)")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args,needle", [
    (["--seed", "3"], "cannot change seed"),
    (["--ppo.learning_rate", "1e-2"], "cannot change ppo.learning_rate"),
    (["--env", "CueRecall"], "drop --env/--config"),
])
def test_resume_refuses_config_changes_that_would_alter_the_run(run_a, capsys, args, needle):
    code = main(["--resume", str(run_a[0]), *args])
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_train_help_documents_resume_and_signal_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--resume RUN" in text and "exit with 130/143" in text


def test_load_agent_raises_checkpoint_error_for_bad_files(run_a, tmp_path):
    cases = bad_checkpoints(latest_checkpoint(run_a[0]), tmp_path)
    for path, needle in cases.values():
        with pytest.raises(CheckpointError, match=needle.split("(")[0].strip()):
            trxl_rl.load_agent(path)
