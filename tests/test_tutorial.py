"""docs/steering_in_your_own_code.md runs as written, on the tiny random model in place of the
default one (same API): its layer 21 becomes layer 2 of the tiny model's 4."""

from __future__ import annotations

import re
from pathlib import Path

import refusal_jax as rj
from refusal_jax.runtime.random_models import random_model

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "steering_in_your_own_code.md"
MAX_LINES = 40


def tutorial_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the tutorial holds one Python block"
    return blocks[0]


def test_tutorial_is_short():
    assert len(tutorial_code().splitlines()) <= MAX_LINES


def test_tutorial_runs(monkeypatch, capsys):
    model = random_model("llama-tiny")
    monkeypatch.setattr(rj, "load_model", lambda: model)
    code = tutorial_code()
    assert "[-1, 21]" in code and "layers=21" in code
    exec(compile(code.replace("21", "2"), str(TUTORIAL), "exec"), {})

    lines = capsys.readouterr().out.splitlines()
    for name in ("none", "DiM ablation", "INLP projection"):
        assert re.fullmatch(rf"{name}: harmful refusal rate [01]\.\d\d", lines.pop(0))
    assert re.fullmatch(r"ActAdd: harmless refusal rate [01]\.\d\d", lines.pop(0))
    assert " -> " in lines.pop(0)
