"""Specification of the metrics path: one record goes to every sink (TensorBoard, Weights &
Biases, the progress bar); W&B is optional and tested offline."""

import json
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

from trxl_rl.config import build_config
from trxl_rl.metrics import WANDB_RUN_ID_FILE, Metrics, ProgressBar, TensorBoard, WandbRun
from trxl_rl.resume import resume_config
from trxl_rl.train import main, open_metrics, parse_args

TINY = ["--env", "MiniGrid-MemoryS9-v0", "--env.kwargs", "{max_steps: 12}", "--env.num_envs",
        "2", "--model.trxl", "{dim: 32, num_layers: 1, num_heads: 2, memory_length: 4}",
        "--ppo.rollout_steps", "16", "--ppo.segment_length", "8", "--ppo.minibatches", "2",
        "--ppo.epochs", "1", "--total-steps", "64", "--progress", "false", "--threads", "1"]


def offline_wandb_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a trainer process whose W&B runs stay on this machine: offline, its
    settings and caches under ``tmp_path``, and a server address that refuses connections
    (should anything try one)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    wandb_home = tmp_path / "wandb_home"
    return {**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true", "WANDB_BASE_URL": "http://127.0.0.1:9",
            "WANDB_DIR": str(wandb_home), "WANDB_CONFIG_DIR": str(wandb_home / "config"),
            "WANDB_CACHE_DIR": str(wandb_home / "cache"),
            "WANDB_DATA_DIR": str(wandb_home / "data")}


def train_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trxl_rl.train", *args],
                            capture_output=True, text=True, cwd=tmp_path,
                            env=offline_wandb_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``), as the protobuf messages of
    ``wandb.proto.wandb_internal_pb2.Record`` (the schema shipped with wandb; wandb >= 0.2x
    has no Python reader of its own). The file is a LevelDB-style log: a 7-byte header
    (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last); a block's last < 7 bytes are
    padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:  # zeros: the end of what was written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list) -> list[dict]:
    """The rows that ``run.log`` sent, name -> value."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


def by_name(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """name -> [(global_step, value)] of W&B history rows, without W&B's own (``_step``...)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and key != "global_step":
                out.setdefault(key, []).append((row["global_step"], value))
    return out


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 2-update CLI run with ``--track`` (W&B offline) and a final evaluation."""
    pytest.importorskip("wandb", reason="needs the wandb extra (pip install -e '.[wandb]')")
    root = tmp_path_factory.mktemp("tracked")
    train_cli(root, *TINY, "--eval_episodes", "2", "--checkpoint_every", "1",
              "--log_dir", str(root / "runs"), "--run-name", "tracked", "--track",
              "--wandb-project-name", "trxl-test", "--wandb-entity", "someone")
    return root, root / "runs" / "tracked"


def test_wandb_logs_the_tensorboard_scalars_at_the_same_steps(tracked_run):
    _, run = tracked_run
    (offline,) = offline_runs(run)
    history = by_name(wandb_history(wandb_records(next(offline.glob("run-*.wandb")))))
    tensorboard = tensorboard_scalars(run)
    assert {"charts/SPS", "charts/learning_rate", "losses/approx_kl", "losses/clipfrac",
            "losses/explained_variance", "eval/success_rate",
            "eval/episodic_return"} <= set(tensorboard)
    assert set(history) == set(tensorboard)
    for name, points in tensorboard.items():
        assert [step for step, _ in history[name]] == [step for step, _ in points], name
        assert [value for _, value in history[name]] == pytest.approx(
            [value for _, value in points], rel=1e-6), name  # TensorBoard stores float32
    assert [step for step, _ in tensorboard["charts/SPS"]] == [32, 64]
    assert [step for step, _ in tensorboard["eval/success_rate"]] == [64]


def test_the_wandb_run_is_named_after_the_run_and_holds_its_config(tracked_run):
    _, run = tracked_run
    (offline,) = offline_runs(run)
    records = wandb_records(next(offline.glob("run-*.wandb")))
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.run_id == (run / WANDB_RUN_ID_FILE).read_text().strip()
    assert offline.name.endswith(start.run_id)
    assert (start.project, start.entity, start.display_name) == ("trxl-test", "someone",
                                                                 "tracked")
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config["env"]["id"] == "MiniGrid-MemoryS9-v0" and config["total_steps"] == 64
    assert config["track"] is True and config["model"]["trxl"]["dim"] == 32


def test_resume_continues_the_same_wandb_run(tracked_run):
    root, run = tracked_run
    resumed = root / "resumed"
    shutil.copytree(run, resumed)
    run_id = (resumed / WANDB_RUN_ID_FILE).read_text()
    train_cli(root, "--resume", str(resumed), "--total-steps", "96", "--eval_episodes", "0")
    assert (resumed / WANDB_RUN_ID_FILE).read_text() == run_id
    first, second = offline_runs(resumed)  # offline, each process writes a log of its own
    assert second.name.endswith(run_id.strip())
    records = wandb_records(next(second.glob("run-*.wandb")))
    assert {row["global_step"] for row in wandb_history(records)} == {96}
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.run_id == run_id.strip() and start.project == "trxl-test"
    assert [step for step, _ in tensorboard_scalars(resumed)["charts/SPS"]] == [32, 64, 96]


@pytest.mark.parametrize("resuming", [False, True])
def test_track_without_wandb_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys,
                                                                   monkeypatch, resuming):
    if resuming:  # a tracked run (to a stand-in for W&B), resumed where wandb is absent
        monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
        assert main([*TINY, "--track", "--eval_episodes", "0", "--log_dir", str(tmp_path),
                     "--run-name", "run"]) == 0
        capsys.readouterr()
        before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails as if absent
    if resuming:
        code = main(["--resume", str(tmp_path / "run"), "--total-steps", "96"])
    else:
        code = main([*TINY, "--track", "--log_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: --track needs the wandb package")
    assert 'pip install "trxl_rl[wandb]"' in err and 'pip install -e ".[wandb]"' in err
    if resuming:
        assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before
    else:
        assert list(tmp_path.iterdir()) == []


class FakeSink:
    def __init__(self, fail_on_close: bool = False):
        self.records: list[tuple[dict, int]] = []
        self.closed = False
        self.fail_on_close = fail_on_close

    def write(self, scalars, step):
        self.records.append((dict(scalars), step))

    def close(self):
        self.closed = True
        if self.fail_on_close:
            raise OSError("disk full")


def test_every_sink_receives_the_same_scalars_at_the_same_steps():
    sinks = [FakeSink(), FakeSink()]
    metrics = Metrics(sinks)
    metrics.record({"charts/SPS": 100.0, "losses/approx_kl": 0.01}, 32)
    metrics.record({"charts/SPS": 110.0, "charts/episodic_return": 0.5}, 64)
    metrics.record({"eval/success_rate": 1.0, "eval/episodic_return": 0.9}, 64)
    assert sinks[0].records == sinks[1].records == [
        ({"charts/SPS": 100.0, "losses/approx_kl": 0.01}, 32),
        ({"charts/SPS": 110.0, "charts/episodic_return": 0.5}, 64),
        ({"eval/success_rate": 1.0, "eval/episodic_return": 0.9}, 64)]
    Metrics().record({"charts/SPS": 1.0}, 1)  # no sinks (ranks other than 0): nothing


def test_closing_metrics_closes_every_sink_even_if_one_fails():
    sinks = [FakeSink(), FakeSink(fail_on_close=True), FakeSink()]
    with pytest.raises(OSError, match="disk full"), Metrics(sinks):
        pass
    assert all(sink.closed for sink in sinks)


def test_progress_bar_shows_the_latest_return_success_and_sps():
    bar = ProgressBar(total=128, initial=32)
    bar.write({"charts/SPS": 123.7, "charts/episodic_return": 0.12345,
               "charts/success_rate": 0.5}, 64)
    bar.write({"charts/SPS": 130.2}, 96)  # no episode ended: return and success stay
    bar.write({"eval/success_rate": 1.0}, 96)
    assert bar.bar.n == 96
    assert bar.shown == {"ret": 0.123, "success": 0.5, "SPS": 130}
    bar.close()


class FakeWandb(types.ModuleType):
    """The few calls of ``wandb`` that :class:`WandbRun` makes; ``held``: the summary of the
    run on the server (what a run being resumed has logged)."""

    def __init__(self, held: dict | None = None):
        super().__init__("wandb")
        self.held = held or {}
        self.inits: list[dict] = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = types.SimpleNamespace(id=kwargs["id"] or "newid123", logged=[],
                                    summary=dict(self.held), finished=False)
        run.define_metric = lambda *args, **kw: None
        run.log = run.logged.append
        run.finish = lambda: setattr(run, "finished", True)
        return run


def test_wandb_run_stores_its_id_and_a_resumed_run_sends_nothing_twice(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = WandbRun(tmp_path, "proj", None, {"seed": 1})
    assert fake.inits[0]["id"] is None and fake.inits[0]["resume"] is None
    assert fake.inits[0]["name"] == tmp_path.name and fake.inits[0]["dir"] == str(tmp_path)
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text() == "newid123\n"
    sink.write({"charts/SPS": 1.0}, 32)
    assert sink.run.logged == [{"charts/SPS": 1.0, "global_step": 32}]

    # Interrupted after logging step 64, resumed from its checkpoint of step 32.
    fake = FakeWandb(held={"global_step": 64, "charts/SPS": 2.0, "losses/approx_kl": 0.1})
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = WandbRun(tmp_path, "proj", None, {"seed": 1})
    assert fake.inits[0]["id"] == "newid123" and fake.inits[0]["resume"] == "allow"
    sink.write({"charts/SPS": 2.1, "losses/approx_kl": 0.1}, 64)  # sent before
    sink.write({"eval/success_rate": 1.0}, 64)  # not sent yet at that step
    sink.write({"charts/SPS": 3.0, "losses/approx_kl": 0.2}, 96)
    sink.close()
    assert sink.run.logged == [{"eval/success_rate": 1.0, "global_step": 64},
                               {"charts/SPS": 3.0, "losses/approx_kl": 0.2, "global_step": 96}]
    assert sink.run.finished


def test_only_rank_0_opens_sinks(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = build_config({}, {"track": True, "log_dir": str(tmp_path)})
    other = open_metrics(cfg, tmp_path, None, types.SimpleNamespace(main=False), 64, 0)
    assert other.sinks == [] and fake.inits == [] and list(tmp_path.iterdir()) == []
    with open_metrics(cfg, tmp_path, None, types.SimpleNamespace(main=True), 64, 0) as first:
        assert [type(sink) for sink in first.sinks] == [WandbRun, TensorBoard, ProgressBar]
    assert len(fake.inits) == 1


def test_track_flags_are_cleanrl_s_and_may_change_on_resume():
    _, overrides = parse_args(["--track", "--wandb-project-name", "X", "--wandb-entity", "Y"])
    assert overrides == {"track": True, "wandb_project_name": "X", "wandb_entity": "Y"}
    assert parse_args(["--track", "false"])[1] == {"track": False}
    assert parse_args(["--seed", "2"])[1] == {"seed": 2}  # not tracked unless asked
    cfg = build_config({}, overrides)
    assert (cfg.track, cfg.wandb_project_name, cfg.wandb_entity) == (True, "X", "Y")
    assert not build_config().track
    checkpoint = {"config": {}, "format_version": 4, "path": "runs/r/checkpoints/u.pt"}
    resumed = resume_config(checkpoint, {"track": False, "wandb_entity": "Z"})
    assert not resumed.track and resumed.wandb_entity == "Z"
