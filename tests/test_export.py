"""Specification of export: the exported step (ONNX through onnxruntime, TorchScript through
torch.jit) acts as ``load_agent`` does, step for step through whole episodes of real envs,
with trxl_rl not importable where it runs; bad input is one line and exit 2."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from trxl_rl import load_agent
from trxl_rl.agents.observations import obs_to_tensor
from trxl_rl.envs import make_env
from trxl_rl.export import export_policy, main, read_spec

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import assert_one_line_error  # noqa: E402
from test_evaluate import untrained_checkpoint  # noqa: E402

EXAMPLE = Path(__file__).parents[1] / "examples" / "run_exported_policy.py"
HAS_ONNX = all(importlib.util.find_spec(name) is not None
               for name in ("onnx", "onnxscript", "onnxruntime"))
HAS_POPGYM = importlib.util.find_spec("popgym") is not None
ROWS, STEPS, TOLERANCE = 3, 30, 1e-5
MINIGRID = {"env.kwargs": {"max_steps": 40}}

# case: (training config overrides, export memory length, formats)
BOTH = ("onnx", "torchscript")
CASES = {
    # every backbone on symbolic grids (uint8 [7, 7, 3]), Discrete(3) actions
    **{backbone: ({**MINIGRID, "model.backbone": backbone}, None, BOTH)
       for backbone in ("trxl", "gtrxl", "gru", "lstm", "none")},
    # a Transformer-XL trained with M = 4, exported to run with M = 9
    "trxl-longer-memory": (MINIGRID, 9, BOTH),
    # absolute positions: the step's index in its episode is part of the memory
    "trxl-absolute": ({**MINIGRID, "model.trxl.positional_encoding": "absolute"}, None,
                      ("onnx",)),
    # images (uint8 84x84x3, the Nature CNN)
    "image": ({"env.kwargs": {"max_steps": 40, "obs": "rgb"}}, None, ("torchscript",)),
    # the same with the max over positions (model.encoder_max_pool)
    "image-max-pool": ({"env.kwargs": {"max_steps": 40, "obs": "rgb"},
                        "model.encoder_max_pool": True}, None, BOTH),
    # vectors (Box(3,) float32)
    "vector": ({"env.id": "trxl_rl/CueRecall-v0", "env.kwargs": {"delay": 6}}, None,
               ("torchscript",)),
    # Dict of MultiDiscrete (from a Tuple) and Discrete; Discrete(4) actions
    "dict-tuple": ({"env.id": "popgym/AutoencodeEasy-v0", "env.kwargs": {}}, None, BOTH),
    # Dict with Discrete observations; MultiDiscrete([8, 8]) actions
    "multidiscrete": ({"env.id": "popgym/BattleshipEasy-v0", "env.kwargs": {},
                       "model.backbone": "gru"}, None, ("torchscript",)),
    # Dict of Box; Box(1,) actions (a Gaussian)
    "box": ({"env.id": "popgym/PositionOnlyPendulumEasy-v0", "env.kwargs": {}}, None, BOTH),
}
POPGYM_CASES = ("dict-tuple", "multidiscrete", "box")
RUNS = [(case, fmt) for case, (_, _, formats) in CASES.items() for fmt in formats]


def example():
    """``examples/run_exported_policy.py`` as a module (it does not import trxl_rl)."""
    spec = importlib.util.spec_from_file_location("run_exported_policy", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stack(observations: list):
    """Single-env observations -> one batch (dicts key by key)."""
    if isinstance(observations[0], dict):
        return {key: stack([o[key] for o in observations]) for key in observations[0]}
    return np.stack([np.asarray(o) for o in observations])


def record_episodes(checkpoint: Path, spec: dict, memory_length: int | None) -> dict:
    """Step ``load_agent``'s policy through :data:`STEPS` steps of :data:`ROWS` envs whose
    episodes end at different steps (time limits 5, 8, 11), taking sampled actions; record
    what the exported step is fed (observations, episode starts) and what the agent did."""
    agent = load_agent(checkpoint)
    cfg = agent.train_config
    ex = example()
    envs = [gym.wrappers.TimeLimit(make_env(cfg.env.id, **cfg.env.kwargs), 5 + 3 * i)
            for i in range(ROWS)]
    observations = [env.reset(seed=i)[0] for i, env in enumerate(envs)]
    options = {} if memory_length is None else {"memory_length": memory_length}
    state = agent.initial_state(ROWS, **options)
    starts = np.ones(ROWS, dtype=bool)
    torch.manual_seed(0)
    record = {"inputs": [], "starts": [], "action": [], "log_prob": [], "value": [],
              "greedy": []}
    for _ in range(STEPS):
        batch = stack(observations)
        obs_t, starts_t = obs_to_tensor(batch, torch.device("cpu")), torch.as_tensor(starts)
        greedy = agent.act(obs_t, state, starts_t, deterministic=True)
        out = agent.act(obs_t, state, starts_t)
        state = out.state
        record["inputs"].append(ex.observation_inputs(spec, batch))
        record["starts"].append(starts.copy())
        for key, value in (("action", out.action), ("log_prob", out.log_prob),
                           ("value", out.value), ("greedy", greedy.action)):
            record[key].append(value.numpy())
        for i, env in enumerate(envs):
            observations[i], _, terminated, truncated, _ = env.step(out.action[i].numpy())
            starts[i] = terminated or truncated
            if starts[i]:
                observations[i] = env.reset()[0]
    assert np.stack(record["starts"])[1:].any(0).all(), "every row starts an episode mid-run"
    assert not np.stack(record["starts"])[1:].all(1).any(), "rows start at different steps"
    return record


REPLAY = """
import sys
sys.modules["trxl_rl"] = None  # importing trxl_rl from here on fails
import importlib.util, json
import numpy as np
spec = importlib.util.spec_from_file_location("ex", sys.argv[1])
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)
for job in json.load(open(sys.argv[2])):
    policy, spec = ex.load_policy(job["policy"])
    data = np.load(job["record"])
    memory, out = ex.initial_memory(spec, len(data["starts"][0])), {}
    for t in range(len(data["starts"])):
        obs = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{t}/")}
        outputs, memory = ex.step(policy, spec, obs, memory, data["starts"][t])
        out.update({f"{t}/{name}": value for name, value in outputs.items()})
    np.savez(job["out"], **out)
print("trxl_rl" in sys.modules and sys.modules["trxl_rl"] is not None)
"""


@pytest.fixture(scope="module")
def replays(tmp_path_factory):
    """For every case and format: the agent's record and the exported step's outputs
    (replayed in one subprocess in which trxl_rl cannot be imported)."""
    root = tmp_path_factory.mktemp("export")
    records, jobs, skipped = {}, [], {}
    for case, (overrides, memory_length, formats) in CASES.items():
        if case in POPGYM_CASES and not HAS_POPGYM:
            skipped[case] = "needs popgym (pip install -e '.[popgym]')"
            continue
        checkpoint = untrained_checkpoint(root / f"{case}.pt", noise=0.1, **overrides)
        for fmt in formats:
            if fmt == "onnx" and not HAS_ONNX:
                skipped[case, fmt] = "needs the export extra (pip install -e '.[export]')"
                continue
            path = root / f"{case}.{'onnx' if fmt == 'onnx' else 'ts.pt'}"
            if case == "trxl":  # the CLI once per format
                extra = ["--format", fmt]
                assert main([str(checkpoint), "--out", str(path), *extra]) == 0
            else:
                export_policy(checkpoint, path, fmt, memory_length)
            spec = read_spec(path)
            record = record_episodes(checkpoint, spec, memory_length)
            flat = {"starts": np.stack(record["starts"])}
            for t, inputs in enumerate(record["inputs"]):
                flat.update({f"{t}/{name}": value for name, value in inputs.items()})
            np.savez(root / f"{case}-{fmt}-record.npz", **flat)
            jobs.append({"policy": str(path), "record": str(root / f"{case}-{fmt}-record.npz"),
                         "out": str(root / f"{case}-{fmt}-out.npz")})
            records[case, fmt] = (record, spec)
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-c", REPLAY, str(EXAMPLE), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False", "trxl_rl was imported by the replay"
    return {key: (record, spec, np.load(root / f"{key[0]}-{key[1]}-out.npz"))
            for key, (record, spec) in records.items()}, skipped


@pytest.mark.parametrize("case,fmt", RUNS)
def test_exported_step_acts_like_load_agent_through_whole_episodes(replays, case, fmt):
    results, skipped = replays
    if (case, fmt) not in results:
        pytest.skip(skipped.get(case) or skipped.get((case, fmt)))
    record, spec, out = results[case, fmt]
    ex = example()
    worst = {"log_prob": 0.0, "value": 0.0, "greedy": 0.0}
    for t in range(STEPS):
        outputs = {name.split("/", 1)[1]: out[name] for name in out.files
                   if name.startswith(f"{t}/")}
        log_prob = ex.log_prob(spec, outputs, record["action"][t])
        greedy = ex.greedy_action(spec, outputs)
        worst["log_prob"] = max(worst["log_prob"],
                                float(np.abs(log_prob - record["log_prob"][t]).max()))
        worst["value"] = max(worst["value"],
                             float(np.abs(outputs["value"] - record["value"][t]).max()))
        worst["greedy"] = max(worst["greedy"],
                              float(np.abs(greedy - record["greedy"][t]).max()))
    assert max(worst.values()) <= TOLERANCE, worst


def test_exported_memory_has_the_documented_layout(replays):
    results, _ = replays
    fmt = "onnx" if ("trxl", "onnx") in results else "torchscript"

    def memory(case):
        spec = results[case, fmt][1]
        return {i["name"]: (i["shape"], i["dtype"]) for i in spec["inputs"]
                if i["name"].startswith("memory.")}

    # small_config: trxl 2 layers x 32, M = 4; gru and lstm 2 layers x 32
    assert memory("trxl") == {"memory.valid": (["B", 4], "bool"),
                              "memory.hidden": (["B", 4, 2, 32], "float32"),
                              "memory.position": (["B", 4], "int64")}
    assert memory("trxl-longer-memory")["memory.hidden"] == (["B", 9, 2, 32], "float32")
    assert memory("gru") == {"memory.valid": (["B", 1], "bool"),
                             "memory.state": (["B", 1, 2, 32], "float32")}
    assert memory("lstm")["memory.state"] == (["B", 1, 2, 64], "float32")
    assert memory("none") == {}
    spec = results["trxl", fmt][1]
    assert [i["name"] for i in spec["inputs"]] == ["obs", "memory.valid", "memory.hidden",
                                                  "memory.position", "episode_start"]
    assert [o["name"] for o in spec["outputs"]] == [
        "logits", "value", "new_memory.valid", "new_memory.hidden", "new_memory.position"]


def test_example_script_runs_exported_policies_in_an_env_loop_without_trxl_rl(tmp_path):
    runs = [("CartPole-v1", "trxl", "onnx" if HAS_ONNX else "torchscript"),
            ("Pendulum-v1", "lstm", "torchscript")]
    for env_id, backbone, fmt in runs:
        checkpoint = untrained_checkpoint(tmp_path / f"{env_id}.pt", noise=0.1, **{
            "env.id": env_id, "env.kwargs": {}, "model.backbone": backbone})
        path = tmp_path / f"{env_id}.{'onnx' if fmt == 'onnx' else 'pt'}"
        export_policy(checkpoint, path)
        code = ("import runpy, sys; sys.modules['trxl_rl'] = None; "
                f"sys.argv = ['run', {str(path)!r}, '--episodes', '2']; "
                f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["episodes"] == 2 and len(result["returns"]) == 2


def test_example_script_builds_trxl_rl_envs_on_request_and_says_when_an_env_does_not_fit(
        tmp_path):
    checkpoint = untrained_checkpoint(tmp_path / "grid.pt", noise=0.1)  # MiniGrid-MemoryS9
    path = tmp_path / "grid.pt.ts"
    export_policy(checkpoint, path, "torchscript")

    def run(*args):
        return subprocess.run([sys.executable, str(EXAMPLE), str(path), "--episodes", "2",
                               *args], capture_output=True, text=True, timeout=300)

    done = run("--env-from", "trxl_rl")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["episodes"] == 2
    refused = run("--env", "MiniGrid-MemoryS9-v0")  # gymnasium's: minigrid's own observations
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    message = refused.stderr.strip().splitlines()
    assert len(message) == 1 and "--env-from trxl_rl" in message[0], refused.stderr


@pytest.fixture(scope="module")
def gru_checkpoint(tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("bad") / "gru.pt",
                                **{"model.backbone": "gru"})


@pytest.mark.parametrize("case,args,needle", [
    ("missing run", ["runs/nothing-here", "--out", "p.pt"], "does not exist"),
    ("unknown format", ["{ckpt}", "--out", "p.pt", "--format", "tflite"], "unknown format"),
    ("unknown suffix", ["{ckpt}", "--out", "p.bin"], "cannot tell the format"),
    ("out is a directory", ["{ckpt}", "--out", "."], "is a directory"),
    ("memory length of a gru", ["{ckpt}", "--out", "p.pt", "--memory-length", "8"],
     "applies to Transformer-XL backbones"),
    ("negative memory length", ["{ckpt}", "--out", "p.pt", "--memory-length", "-1"],
     "must be >= 0"),
    ("no --out", ["{ckpt}"], "--out"),
])
def test_bad_export_input_is_one_line_exit_2_and_writes_nothing(gru_checkpoint, tmp_path,
                                                                monkeypatch, capsys, case,
                                                                args, needle):
    monkeypatch.chdir(tmp_path)
    Path("p.pt").write_bytes(b"an earlier export")
    args = [a.replace("{ckpt}", str(gru_checkpoint)) for a in args]
    try:
        code = main(args)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    assert_one_line_error(code, capsys.readouterr().err, needle)
    assert Path("p.pt").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt"]


def test_learned_encoding_cannot_export_another_memory_length(tmp_path, capsys):
    checkpoint = untrained_checkpoint(tmp_path / "learned.pt", **{
        "model.trxl.positional_encoding": "learned"})
    code = main([str(checkpoint), "--out", str(tmp_path / "p.pt"), "--memory-length", "8"])
    assert_one_line_error(code, capsys.readouterr().err, "--memory-length 8")


def test_onnx_export_without_its_packages_names_the_extra(gru_checkpoint, tmp_path,
                                                          monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    code = main([str(gru_checkpoint), "--out", str(tmp_path / "p.onnx")])
    assert_one_line_error(code, capsys.readouterr().err, 'pip install -e ".[export]"')
    assert not (tmp_path / "p.onnx").exists()
