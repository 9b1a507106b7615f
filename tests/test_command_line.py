"""The command line: configs by name, --help listing every config key, quiet start-up."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from absl import app

import refusal_jax  # noqa: F401  (installs the start-up filters)
from refusal_jax import main
from refusal_jax.study.config import base_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_config_name_is_the_shipped_file_and_a_path_stays_a_path(tmp_path):
    assert Path(main.config_path("default")) == CONFIGS / "default.py"
    assert main.config_path("configs/default.py") == "configs/default.py"
    assert set(main.config_names()) == {path.stem for path in CONFIGS.glob("*.py")}
    with pytest.raises(app.UsageError, match="tiny_random"):
        main.config_path("no_such_config")
    assert main._with_config_paths(["main", "--config=tiny_random", "--workdir=w"]) == [
        "main", f"--config={CONFIGS / 'tiny_random.py'}", "--workdir=w"]
    assert main._with_config_paths(["main", "--config", "default"])[2] == str(
        CONFIGS / "default.py")


def test_help_lists_every_config_key_with_its_default():
    text = main.config_help()
    config = base_config()
    for section, values in config.items():
        if not hasattr(values, "items"):
            assert f"{section} = {values!r}" in text
            continue
        for name, default in values.items():
            assert f"{section}.{name} = {default!r}" in text
    assert "model.source = 'default': ``\"default\"``" in text  # with its description


@pytest.mark.parametrize("logger,message", [
    ("transformers", "PyTorch was not found. Models won't be available and only tokenizers"),
    ("jax._src.xla_bridge", "Unable to initialize backend 'tpu': INTERNAL: Failed to open"),
])
def test_start_up_notices_are_dropped_and_other_messages_pass(logger, message):
    def record(text):
        return logging.LogRecord(logger, logging.WARNING, __file__, 1, text, None, None)

    assert not logging.getLogger(logger).filter(record(message))
    assert logging.getLogger(logger).filter(record("Unable to initialize backend 'cuda': x"))
