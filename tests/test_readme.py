"""The README's code examples run as written."""

import re
from pathlib import Path

from trxl_rl.config import read_yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_use_the_memory_in_your_own_agent_example_runs():
    section = readme_section("Use the memory in your own agent")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the section must hold a python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    features = namespace["features"]
    assert features.shape == (8, 16, 64)
    assert namespace["policy"].weight.grad is not None


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in readme_section("Set-up")
    assert ci.strip().splitlines()[-1] == "python -m pytest -q"


def test_user_written_backbone_example_trains(tmp_path, monkeypatch):
    from trxl_rl.backbones import BACKBONES

    section = readme_section("Use the memory in your own agent")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, "the section must show a user-written backbone"
    monkeypatch.chdir(tmp_path)  # the example writes runs/ in the working directory
    namespace: dict = {}
    try:
        exec(compile(blocks[1], "README.md", "exec"), namespace)
    finally:
        BACKBONES.pop("decay", None)
    summary = namespace["summary"]
    assert summary["global_step"] == 2048 and summary["episodes"] == 100
    run = next((tmp_path / "runs").iterdir())
    assert read_yaml(run / "config.yaml")["model"]["backbone"] == "decay"
