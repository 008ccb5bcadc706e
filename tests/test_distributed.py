"""Specification of data-parallel training with torch.distributed: the ranks' collectives,
reduced statistics, checkpoints of every rank, exact resume, faults.

The end-to-end tests start 2 ranks with torchrun (gloo on CPU, one thread each) on a tiny run,
through ``rank_recorder.py``, which records what each rank saw, or with ``python -m
trxl_rl.train --ranks 2``. Two such runs (~10 s each) are part of the default test run; those
marked ``distributed`` (resume, signals, lost ranks: ~10-20 s each) run with ``pytest -m
distributed``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trxl_rl.checkpoint import CheckpointError, latest_checkpoint, load_agent, load_checkpoint
from trxl_rl.distributed import Ranks, reduce_rows
from trxl_rl.resume import check_world_size
from trxl_rl.train import EpisodeLog, episode_means, main, reduction, train

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from test_train import small_config  # noqa: E402

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
# small_config of test_train.py as command-line options: 2 envs x 16 steps per rank.
TINY = ["--env", "MiniGrid-MemoryS9-v0", "--env.kwargs", "{max_steps: 12}",
        "--env.num_envs", "2", "--model.trxl",
        "{dim: 32, num_layers: 2, num_heads: 2, memory_length: 4}",
        "--ppo.rollout_steps", "16", "--ppo.segment_length", "8", "--ppo.minibatches", "2",
        "--ppo.epochs", "2", "--progress", "false", "--eval_episodes", "0"]
STEPS_PER_UPDATE = 2 * 2 * 16  # ranks x envs x rollout steps
TIME_LIMIT = 120


def torchrun_command(*args: str, record: Path | None = None, stop_after: int = 0) -> list[str]:
    """2 ranks of the trainer's CLI (through rank_recorder.py when ``record`` is given)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2"]
    if record is None:
        return [*run, "-m", "trxl_rl.train", *args]
    record.mkdir(parents=True, exist_ok=True)
    return [*run, str(TESTS / "rank_recorder.py"), str(record), str(stop_after), *args]


def torchrun(*args: str, cwd: Path, record: Path | None = None, stop_after: int = 0
             ) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args, record=record, stop_after=stop_after),
                          capture_output=True, text=True, cwd=cwd, env=ENV, timeout=TIME_LIMIT)


def records(directory: Path) -> list[dict]:
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in (0, 1)]


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A 2-rank run of 3 updates with a checkpoint after each and a final evaluation, started
    in an empty directory; with each rank's records."""
    root = tmp_path_factory.mktemp("two_ranks")
    work = root / "work"
    work.mkdir()
    result = torchrun(*TINY, "--total-steps", str(3 * STEPS_PER_UPDATE), "--checkpoint_every",
                      "1", "--eval_episodes", "2", "--log_dir", "runs", "--run-name", "a",
                      cwd=work, record=root / "records")
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(work=work, run=work / "runs" / "a", result=result,
                           records=records(root / "records"))


def checkpoint_keys_equal(a, b, path=""):
    """Every tensor and value of two checkpoint trees is equal (bit for bit)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            checkpoint_keys_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            checkpoint_keys_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


# --- the reductions, with known numbers ------------------------------------------------------

def test_reduce_rows_takes_the_mean_sum_max_or_min_of_each_column():
    rows = np.array([[1.0, 2.0, -3.0, 5.0], [3.0, 6.0, 1.0, -5.0]])
    assert reduce_rows(rows, ["mean", "sum", "max", "min"]).tolist() == [2.0, 8.0, 1.0, -5.0]
    with pytest.raises(ValueError, match="unknown reductions"):
        reduce_rows(rows, ["mean", "sum", "max", "median"])


def test_episode_means_over_ranks_equal_the_means_of_all_episodes_together():
    def log(returns, lengths, successes):
        episodes = EpisodeLog()
        episodes.add({"return": np.array(returns), "length": np.array(lengths),
                      "success": np.array(successes)})
        return episodes.flush()

    ranks = [log([1.0, 0.5], [10, 20], [1.0, np.nan]), log([0.25], [7], [0.0]),
             log([], [], [])]  # a rank that finished no episode
    keys = list(ranks[0])
    rows = np.array([[totals[key] for key in keys] for totals in ranks])
    summed = dict(zip(keys, reduce_rows(rows, [reduction(k) for k in keys]), strict=True))
    assert episode_means(summed) == {"charts/episodic_return": np.mean([1.0, 0.5, 0.25]),
                                     "charts/episodic_length": np.mean([10, 20, 7]),
                                     "charts/success_rate": np.mean([1.0, 0.0])}
    assert episode_means(ranks[2]) == {}


def test_losses_are_averaged_and_first_minibatch_checks_take_the_worst_rank():
    assert reduction("losses/policy_loss") == "mean"
    assert reduction("charts/update_seconds") == "mean"
    assert reduction("losses/first_minibatch_approx_kl") == "max"
    assert reduction("losses/first_minibatch_max_value_error") == "max"
    assert all(reduction(key) == "sum" for key in EpisodeLog().flush())


def test_a_single_process_has_no_collectives():
    ranks = Ranks.from_environment({})
    assert (ranks.rank, ranks.world_size, ranks.main, ranks.distributed) == (0, 1, True, False)
    layer = torch.nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    grad = layer.weight.grad.clone()
    kl = torch.tensor(0.5)
    assert ranks.average_gradients(layer.parameters(), kl) == [kl]
    assert torch.equal(layer.weight.grad, grad)
    assert ranks.reduce_scalars({"a": 1.5}, {"a": "sum"}) == {"a": 1.5}
    assert ranks.gather_object("x") == ["x"] and ranks.broadcast_object("y") == "y"
    assert ranks.first_error(None) is None and ranks.first_error("bad") == (0, "bad")
    assert ranks.device(torch.device("cpu")) == torch.device("cpu")


def test_ranks_are_read_from_the_variables_torchrun_sets():
    ranks = Ranks.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.main) == (3, 4, 1, False)
    assert Ranks.from_environment({"RANK": "0"}).world_size == 1  # not all of them: single


def test_a_checkpoint_resumes_only_with_the_number_of_ranks_that_wrote_it():
    check_world_size({"world_size": 2}, 2)
    check_world_size({}, 1)  # formats 2 and 3: a single process
    with pytest.raises(CheckpointError, match="written by 2 ranks and this run has a single "
                                              "process: resume it with 2 ranks"):
        check_world_size({"world_size": 2, "path": "x.pt"}, 1)
    with pytest.raises(CheckpointError, match="written by a single process and this run has 4 "
                                              "ranks: resume it with a single process"):
        check_world_size({"path": "x.pt"}, 4)


# --- two ranks, end to end -------------------------------------------------------------------

def test_two_ranks_have_identical_weights_after_every_update(two_ranks):
    rank0, rank1 = (r["updates"] for r in two_ranks.records)
    assert [u["update"] for u in rank0] == [u["update"] for u in rank1] == [1, 2, 3]
    assert [u["weights"] for u in rank0] == [u["weights"] for u in rank1]
    assert len({u["weights"] for u in rank0}) == 3  # and they did change


def test_global_step_counts_the_steps_of_both_ranks(two_ranks):
    summary = json.loads((two_ranks.run / "summary.json").read_text())
    assert summary["global_step"] == 3 * STEPS_PER_UPDATE
    steps = [load_checkpoint(two_ranks.run / "checkpoints" / f"update_000000{u}.pt")
             ["counters"]["global_step"] for u in (1, 2, 3)]
    assert steps == [STEPS_PER_UPDATE, 2 * STEPS_PER_UPDATE, 3 * STEPS_PER_UPDATE]


def test_only_rank_0_writes_files_and_prints(two_ranks):
    files = files_under(two_ranks.work)
    events = [f for f in files if "events.out.tfevents" in f]
    assert len(events) == 1
    assert set(files) - set(events) == {
        "runs/a/config.yaml", "runs/a/summary.json", "runs/a/checkpoints/update_0000001.pt",
        "runs/a/checkpoints/update_0000002.pt", "runs/a/checkpoints/update_0000003.pt"}
    lines = two_ranks.result.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["episodes"] == 2  # rank 0's summary


def test_no_rank_tears_down_before_rank_0_has_evaluated(two_ranks):
    # Rank 1, done training first, waits for rank 0's final evaluation before it closes its
    # process group (one that left early was seen to abort in gloo's teardown).
    rank0, rank1 = (r["times"] for r in two_ranks.records)
    assert rank0["trained"] <= rank1["returned"]
    assert all(r["exit_code"] == 0 for r in two_ranks.records)


def test_logged_statistics_are_those_of_both_ranks_data_together(two_ranks):
    rank0, rank1 = two_ranks.records
    for u, logged in enumerate(rank0["updates"]):
        mine0, mine1 = rank0["reductions"][u]["mine"], rank1["reductions"][u]["mine"]
        reduced = rank0["reductions"][u]["reduced"]
        assert reduced == rank1["reductions"][u]["reduced"]
        for key in mine0:
            pair = [mine0[key], mine1[key]]
            expected = {"mean": np.mean, "sum": np.sum, "max": np.max}[reduction(key)](pair)
            assert reduced[key] == pytest.approx(expected, rel=1e-12, abs=1e-15), key
        stats = logged["stats"]
        assert stats == rank1["updates"][u]["stats"] | {"charts/SPS": stats["charts/SPS"]}
        returns = rank0["episodes"][u]["returns"] + rank1["episodes"][u]["returns"]
        lengths = rank0["episodes"][u]["lengths"] + rank1["episodes"][u]["lengths"]
        if returns:
            assert stats["charts/episodic_return"] == pytest.approx(np.mean(returns), rel=1e-12)
            assert stats["charts/episodic_length"] == pytest.approx(np.mean(lengths), rel=1e-12)
        # Explained variance is computed once on both ranks' rollouts: equal before reducing.
        assert mine0["losses/explained_variance"] == mine1["losses/explained_variance"]
        assert stats["losses/first_minibatch_approx_kl"] == max(
            mine0["losses/first_minibatch_approx_kl"], mine1["losses/first_minibatch_approx_kl"])
        assert abs(stats["losses/first_minibatch_approx_kl"]) < 1e-6
    assert sum(len(r["episodes"][u]["returns"]) for r in (rank0, rank1)
               for u in range(3)) > 0  # 12-step episodes end inside the 16-step rollouts


def test_checkpoints_hold_every_ranks_training_state_with_distinct_env_seeds(two_ranks):
    checkpoint = load_checkpoint(two_ranks.run, resume=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["other_ranks"]) == 1
    other = checkpoint["other_ranks"][0]
    assert [env["base_seed"] for env in checkpoint["envs"]["envs"]] == [1, 2]  # seed 1
    assert [env["base_seed"] for env in other["envs"]["envs"]] == [3, 4]  # seed 1 + 1 * 2
    assert not torch.equal(checkpoint["rng"]["torch"], other["rng"]["torch"])
    assert not torch.equal(checkpoint["carry"]["obs"], other["carry"]["obs"])
    assert load_agent(two_ranks.run) is not None  # evaluated like any checkpoint


def test_a_run_records_the_ranks_torchrun_started(two_ranks):
    assert load_checkpoint(two_ranks.run, resume=True)["config"]["ranks"] == 2


def test_resuming_with_another_number_of_ranks_is_one_line_exit_2_and_writes_nothing(
        two_ranks, tmp_path, capsys):
    """A 2-rank checkpoint whose config says 1 rank (those written under torchrun before the
    config recorded ``ranks``), resumed by one process."""
    checkpoint = torch.load(latest_checkpoint(two_ranks.run), weights_only=False)
    checkpoint["config"].pop("ranks")
    old = tmp_path / "old.pt"
    torch.save(checkpoint, old)
    before = {f: (tmp_path / f).stat().st_mtime_ns for f in files_under(tmp_path)}
    assert main(["--resume", str(old)]) == 2
    err = capsys.readouterr().err
    assert "was written by 2 ranks and this run has a single process" in err
    assert len(err.strip().splitlines()) == 1
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in files_under(tmp_path)} == before


def test_ranks_2_starts_two_ranks_that_train_exactly_as_torchrun_does(two_ranks, tmp_path):
    """``python -m trxl_rl.train --ranks 2``: the same run as the torchrun fixture's, bit for
    bit, with nothing on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "trxl_rl.train", *TINY, "--ranks", "2", "--total-steps",
         str(3 * STEPS_PER_UPDATE), "--checkpoint_every", "1", "--eval_episodes", "2",
         "--log_dir", "runs", "--run-name", "a"],
        capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=TIME_LIMIT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    a = load_checkpoint(two_ranks.run, resume=True)
    b = load_checkpoint(tmp_path / "runs" / "a", resume=True)
    assert b["world_size"] == 2 and b["config"]["ranks"] == 2
    for key in a.keys() - {"config", "path", "timing"}:  # timing: wall-clock seconds
        checkpoint_keys_equal(a[key], b[key], key)
    summary = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())
    assert summary["global_step"] == 3 * STEPS_PER_UPDATE


@pytest.mark.parametrize("value", ["0", "-1", "1.5"])
def test_a_bad_ranks_value_is_one_line_exit_2(tmp_path, capsys, value):
    assert main([*TINY, "--ranks", value, "--log_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "ranks" in err and len(err.splitlines()) == 1
    assert files_under(tmp_path) == []


# --- resume, signals and lost ranks (pytest -m distributed) ---------------------------------

@pytest.mark.distributed
def test_resumed_two_rank_run_equals_the_uninterrupted_run_bit_for_bit(two_ranks, tmp_path):
    """3 updates == 1 update + SIGINT (at rank 0) + resume with 2 ranks + 2 updates: weights,
    Adam moments, and every rank's generators, memory, observations and envs."""
    stopped = torchrun(*TINY, "--total-steps", str(3 * STEPS_PER_UPDATE), "--log_dir", "runs",
                       "--run-name", "b", cwd=tmp_path, record=tmp_path / "stop", stop_after=1)
    assert stopped.returncode != 0
    assert "stopped by SIGINT after saving runs/b/checkpoints/update_0000001.pt" \
        in stopped.stderr
    assert [r["exit_code"] for r in records(tmp_path / "stop")] == [130, 130]
    assert latest_checkpoint(tmp_path / "runs" / "b").name == "update_0000001.pt"

    resumed = torchrun("--resume", "runs/b", cwd=tmp_path, record=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    reference, again = two_ranks.records, records(tmp_path / "resumed")
    for rank in (0, 1):
        assert [u["update"] for u in again[rank]["updates"]] == [2, 3]
        assert [u["weights"] for u in again[rank]["updates"]] == \
            [u["weights"] for u in reference[rank]["updates"][1:]]
        assert [u["stats"]["losses/policy_loss"] for u in again[rank]["updates"]] == \
            [u["stats"]["losses/policy_loss"] for u in reference[rank]["updates"][1:]]
    a = load_checkpoint(two_ranks.run, resume=True)
    b = load_checkpoint(tmp_path / "runs" / "b", resume=True)
    for key in a.keys() - {"config", "path", "timing"}:  # timing: wall-clock seconds
        checkpoint_keys_equal(a[key], b[key], key)
    assert a["timing"]["threshold"]["steps"] == b["timing"]["threshold"]["steps"]


@pytest.mark.distributed
def test_ctrl_c_reaches_the_ranks_that_ranks_2_started_once_and_the_run_resumes(tmp_path):
    """Ctrl+C in the terminal of ``python -m trxl_rl.train --ranks 2`` (SIGINT to it; its ranks
    have their own session) stops both ranks after one update and one checkpoint, exit 130;
    ``python -m trxl_rl.train --resume`` starts 2 ranks again and continues."""
    launcher = subprocess.Popen([sys.executable, "-m", "trxl_rl.train", *LONG_RUN, "--ranks",
                                 "2"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "runs" / "r" / "checkpoints" / "update_0000001.pt", launcher)
    launcher.send_signal(signal.SIGINT)
    _, stderr = launcher.communicate(timeout=TIME_LIMIT)
    assert launcher.returncode == 130, stderr
    assert stderr.count("SIGINT: saving a checkpoint after this update") == 1
    [line] = [line for line in stderr.splitlines() if line.startswith("stopped by SIGINT")]
    assert line.endswith("continue with: python -m trxl_rl.train --resume runs/r")
    assert "Traceback" not in stderr
    saved = load_checkpoint(tmp_path / "runs" / "r", resume=True)
    assert saved["world_size"] == 2
    steps = saved["counters"]["global_step"] + STEPS_PER_UPDATE
    resumed = subprocess.run([sys.executable, "-m", "trxl_rl.train", "--resume", "runs/r",
                              "--total-steps", str(steps)], capture_output=True, text=True,
                             cwd=tmp_path, env=ENV, timeout=TIME_LIMIT)
    assert resumed.returncode == 0, resumed.stderr
    final = load_checkpoint(tmp_path / "runs" / "r", resume=True)
    assert final["world_size"] == 2 and final["counters"]["global_step"] == steps


@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_that_ranks_2_started_stop_when_their_launcher_is_killed(tmp_path):
    """SIGKILL to ``python -m trxl_rl.train --ranks 2`` (no chance to pass anything on): its
    ranks get SIGTERM from the kernel, save a checkpoint after their update and exit."""
    launcher = subprocess.Popen([sys.executable, "-m", "trxl_rl.train", *LONG_RUN, "--ranks",
                                 "2"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "runs" / "r" / "checkpoints" / "update_0000001.pt", launcher)
    pids = [rank_pid(launcher, rank) for rank in (0, 1)]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, "the ranks went on training"
        time.sleep(0.1)
    assert load_checkpoint(tmp_path / "runs" / "r", resume=True)["world_size"] == 2


@pytest.mark.distributed
@pytest.mark.parametrize("guard,changed", [("target_kl", "losses/minibatch_updates"),
                                           ("rollback_kl", "losses/rolled_back"),
                                           ("lr_target_kl", "charts/learning_rate_factor")])
def test_kl_guards_act_alike_on_every_rank(tmp_path, guard, changed):
    """The early stop, the rollback and the rate's factor are decided on the ranks' mean KL,
    so no rank waits for a minibatch that another skipped and the weights stay the same."""
    result = torchrun(*TINY, f"--ppo.{guard}", "1.0e-7", "--ppo.learning_rate", "0.01",
                      "--total-steps", str(2 * STEPS_PER_UPDATE), "--log_dir", "runs",
                      cwd=tmp_path, record=tmp_path / "records")
    assert result.returncode == 0, result.stderr
    rank0, rank1 = records(tmp_path / "records")
    unguarded = {"losses/minibatch_updates": 2 * 2, "losses/rolled_back": 0.0,
                 "charts/learning_rate_factor": 1.0}[changed]
    for u in range(2):
        # each rank's own scalar where the reduction over ranks sees it (the rate is logged
        # after it: equal weights show that both ranks stepped at the same rate)
        seen = [r["reductions"][u]["mine"].get(changed, r["updates"][u]["stats"][changed])
                for r in (rank0, rank1)]
        assert seen[0] == seen[1] != unguarded  # the guard acted, alike on both ranks
        assert rank0["updates"][u]["weights"] == rank1["updates"][u]["weights"]


@pytest.mark.distributed
def test_every_rank_stops_solved_after_the_same_update(tmp_path):
    """``stop_at`` reads the scalars reduced over the ranks: both ranks end after update 2 of
    5 (a MiniGrid return is never below 0, greedy or sampled), and nothing waits for a rank
    that stopped."""
    result = torchrun(*TINY, "--threshold_metric", "return", "--stop_at", "0.0",
                      "--stop_updates", "2", "--total-steps", str(5 * STEPS_PER_UPDATE),
                      "--log_dir", "runs", "--run-name", "a", cwd=tmp_path,
                      record=tmp_path / "records")
    assert result.returncode == 0, result.stderr
    assert [len(r["updates"]) for r in records(tmp_path / "records")] == [2, 2]
    summary = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())
    assert summary["solved"]["steps"] == summary["global_step"] == 2 * STEPS_PER_UPDATE
    # rank 0 played the greedy check's episodes, and both ranks read its verdict
    assert [check["steps"] for check in summary["solved"]["checks"]] == [2 * STEPS_PER_UPDATE]
    assert load_checkpoint(tmp_path / "runs" / "a")["counters"]["update"] == 2


@pytest.mark.distributed
def test_two_ranks_refuse_a_single_process_checkpoint_in_one_line(tmp_path):
    train(small_config(log_dir=str(tmp_path), run_name="single"))
    before = files_under(tmp_path)
    result = torchrun("--resume", "single", cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    newest = latest_checkpoint(tmp_path / "single").relative_to(tmp_path)
    assert errors == [f"error: {str(newest)!r} was written by a "
                      "single process and this run has 2 ranks: resume it with a single "
                      "process (python -m trxl_rl.train --resume RUN)"]
    assert files_under(tmp_path) == before


LONG_RUN = [*TINY, "--ppo.epochs", "1", "--total-steps", "100000000", "--checkpoint_every",
            "1", "--log_dir", "runs", "--run-name", "r"]


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's child process that runs ``rank``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"torchrun ({launcher.pid}) runs no rank {rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_torchrun_saves_once_and_every_rank_exits(tmp_path, signum, code):
    """Ctrl+C reaches torchrun, which passes it to every rank: they stop after the same update
    and rank 0 saves one checkpoint with both ranks' state."""
    launcher = subprocess.Popen(torchrun_command(*LONG_RUN), cwd=tmp_path, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "runs" / "r" / "checkpoints" / "update_0000001.pt", launcher)
    pids = [rank_pid(launcher, rank) for rank in (0, 1)]
    launcher.send_signal(signum)
    start = time.monotonic()
    _, stderr = launcher.communicate(timeout=TIME_LIMIT)
    assert time.monotonic() - start < 30  # torchrun's own limit before it kills the ranks
    assert launcher.returncode != 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    name = signal.Signals(signum).name
    assert stderr.count(f"{name}: saving a checkpoint after this update") == 1  # rank 0 only
    [line] = [line for line in stderr.splitlines() if line.startswith(f"stopped by {name}")]
    assert line.endswith("continue with: python -m trxl_rl.train --resume runs/r")
    saved = load_checkpoint(tmp_path / "runs" / "r", resume=True)
    assert f"saving {Path(saved['path']).relative_to(tmp_path)};" in line
    assert saved["world_size"] == 2 and len(saved["other_ranks"]) == 1
    assert "trxl_rl/" not in stderr  # no traceback from the ranks (torchrun prints its own)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_hand(tmp_path: Path, **env: str) -> list[subprocess.Popen]:
    """The 2 ranks started without torchrun (as a cluster scheduler would): nothing watches
    them but each other."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "trxl_rl.train", *LONG_RUN], cwd=tmp_path,
                             env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                  "RANK": str(rank), "LOCAL_RANK": str(rank),
                                  "WORLD_SIZE": "2", **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["torchrun", "by hand"])
def test_a_killed_rank_ends_the_run_with_an_error_within_seconds(tmp_path, launcher):
    if launcher == "torchrun":
        survivor = subprocess.Popen(torchrun_command(*LONG_RUN), cwd=tmp_path, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(tmp_path / "runs" / "r" / "checkpoints" / "update_0000001.pt", survivor)
        victim = rank_pid(survivor, 1)
    else:
        survivor, other = by_hand(tmp_path)
        wait_for(tmp_path / "runs" / "r" / "checkpoints" / "update_0000001.pt", survivor)
        victim = other.pid
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    _, stderr = survivor.communicate(timeout=TIME_LIMIT)
    assert time.monotonic() - start < 30
    assert survivor.returncode != 0
    if launcher == "torchrun":  # it names the rank that failed and stops the others
        assert "Signal 9 (SIGKILL) received by PID" in stderr
    else:  # rank 0 finds out by itself: its next collective fails
        assert "error: rank 0 of 2:" in stderr
        assert "another rank died or stopped answering" in stderr
        other.communicate()
    assert load_checkpoint(tmp_path / "runs" / "r", resume=True)["world_size"] == 2


@pytest.mark.distributed
def test_a_rank_that_stops_answering_ends_the_run_after_the_timeout(tmp_path):
    rank0, rank1 = by_hand(tmp_path, TRXL_RL_COLLECTIVE_TIMEOUT="5")
    try:
        wait_for(tmp_path / "runs" / "r" / "checkpoints" / "update_0000001.pt", rank0)
        os.kill(rank1.pid, signal.SIGSTOP)
        start = time.monotonic()
        _, stderr = rank0.communicate(timeout=TIME_LIMIT)
        assert 4 < time.monotonic() - start < 60
        assert rank0.returncode == 1
        assert "error: rank 0 of 2:" in stderr
    finally:
        rank1.kill()
        rank1.communicate()



# --- CUDA (benchmarks/gpu_check.sh runs these) -----------------------------------------------

@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_cuda_ranks_train_one_gpu_each_with_identical_weights(tmp_path):
    result = torchrun(*TINY, "--device", "cuda", "--total-steps", str(2 * STEPS_PER_UPDATE),
                      "--log_dir", "runs", "--run-name", "c", cwd=tmp_path,
                      record=tmp_path / "records")
    assert result.returncode == 0, result.stderr
    rank0, rank1 = (r["updates"] for r in records(tmp_path / "records"))
    assert [u["weights"] for u in rank0] == [u["weights"] for u in rank1]
    assert all(abs(u["stats"]["losses/first_minibatch_approx_kl"]) < 1e-6 for u in rank0)


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs exactly one CUDA device")
def test_more_cuda_ranks_than_gpus_are_refused_in_one_line(tmp_path):
    result = torchrun(*TINY, "--device", "cuda", "--log_dir", "runs", cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1: local rank 1 has no GPU of its own (1 visible): start at "
                      "most 1 ranks per machine (--ranks, or torchrun's --nproc-per-node) or "
                      "train with --device cpu"]
    assert files_under(tmp_path) == []


def test_advantages_are_normalised_over_every_ranks_share_of_the_minibatch():
    from trxl_rl.ppo import normalize_advantages

    class TwoRanks:  # rank 1 holds the shares of rank 0 plus 1
        distributed = True

        def sum(self, tensor):
            return tensor + other_moments

    torch.manual_seed(0)
    mine, theirs = torch.randn(4, 8) * 3 + 1, torch.randn(4, 8) - 2
    other_moments = torch.stack([torch.tensor(32.0), theirs.sum(), theirs.square().sum()])
    together = torch.cat([mine, theirs])
    expected = (together - together.mean()) / (together.std() + 1e-8)
    assert torch.allclose(normalize_advantages(mine, TwoRanks()), expected[:4], atol=1e-5)
    single = normalize_advantages(mine, Ranks())
    assert torch.equal(single, (mine - mine.mean()) / (mine.std() + 1e-8))
