"""Faults a run must survive or report clearly: changed inputs, concurrent runs, killed runs,
damaged artefacts, crafted model files, NaN weights and bad settings.

The runner tests replace the stages by fakes that write small artefacts (each counts its
calls), so they check what the runner trusts on resume without running a model."""

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from tiny_pipeline import shrunk_tiny_config

from refusal_jax.study import artifacts, runner
from refusal_jax.study.config import STAGES
from refusal_jax.study.workdir_lock import WorkdirBusy, workdir_lock

# ----------------------------------------------------------------------------- runner fakes


@pytest.fixture
def fake_stages(monkeypatch):
    """Stages that write one JSON and one .npz artefact each (different on each call, as a
    rerun on new inputs would); returns the call counts."""
    calls = dict.fromkeys(STAGES, 0)
    serial = itertools.count()

    def stage(name):
        def run(study):
            calls[name] += 1
            out = study.stage_dir(name)
            artifacts.write_json(out / "table.json", {"stage": name, "call": next(serial)})
            artifacts.write_arrays(out / "arrays.npz", {"x": np.arange(64.0)})
            return ["table.json", "arrays.npz"]
        return run

    monkeypatch.setattr(runner, "_stage_functions", lambda: {name: stage(name) for name in STAGES})
    return calls


@pytest.fixture
def inputs(tmp_path):
    """A config whose model is a checkpoint directory and whose harmful_train set is a file."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"weights-1" * 1000)
    prompts = tmp_path / "harmful.json"
    prompts.write_text(json.dumps([{"instruction": f"do harm {i}"} for i in range(40)]))
    config = shrunk_tiny_config()
    config.model.source = str(model)
    config.data.harmful_train = str(prompts)
    return config, model, prompts, tmp_path / "run"


def reset(calls):
    calls.update(dict.fromkeys(calls, 0))


def test_unchanged_inputs_skip_every_stage_but_the_report(fake_stages, inputs):
    config, _, _, workdir = inputs
    runner.run_study(config, workdir)
    reset(fake_stages)
    runner.run_study(config, workdir)
    assert fake_stages == {**dict.fromkeys(STAGES, 0), "report": 1}


def test_new_weights_at_the_same_path_rerun_every_stage(fake_stages, inputs, caplog):
    config, model, _, workdir = inputs
    runner.run_study(config, workdir)
    reset(fake_stages)
    (model / "model.safetensors").write_bytes(b"weights-2" * 1000)  # same size, new bytes
    with caplog.at_level(logging.WARNING):
        runner.run_study(config, workdir)
    assert fake_stages == dict.fromkeys(STAGES, 1)
    assert "model.safetensors" in caplog.text


def test_edited_prompt_file_reruns_extract_and_every_later_stage(fake_stages, inputs, caplog):
    config, _, prompts, workdir = inputs
    runner.run_study(config, workdir, stages=("extract", "select"))
    reset(fake_stages)
    prompts.write_text(json.dumps([{"instruction": f"do other harm {i}"} for i in range(40)]))
    with caplog.at_level(logging.WARNING):
        runner.run_study(config, workdir, stages=("extract", "select"))
    assert fake_stages["extract"] == 1 and fake_stages["select"] == 1
    assert str(prompts) in caplog.text


def test_a_rerun_earlier_stage_reruns_the_later_ones(fake_stages, inputs):
    config, _, _, workdir = inputs
    runner.run_study(config, workdir)
    reset(fake_stages)
    (workdir / "extract" / artifacts.DONE_FILE).unlink()
    runner.run_study(config, workdir, stages=("extract",))
    runner.run_study(config, workdir, stages=("select",))
    assert fake_stages["extract"] == 1 and fake_stages["select"] == 1


def test_fingerprint_cache_avoids_hashing_an_unchanged_checkpoint_again(inputs, monkeypatch):
    config, model, _, workdir = inputs
    study = runner.Study(config, workdir)
    first = study.stage_inputs("extract")
    hashed = []
    monkeypatch.setattr(runner.fingerprints, "file_sha256", lambda path: hashed.append(path))
    assert runner.Study(config, workdir).stage_inputs("extract") == first
    assert hashed == []
    assert str(model / "model.safetensors") in first


@pytest.mark.parametrize("damage", ["truncate_json", "flip_npz", "truncate_npz", "truncate_done"])
def test_damaged_artefact_reruns_its_stage_with_a_warning_naming_the_file(
        fake_stages, inputs, caplog, damage):
    config, _, _, workdir = inputs
    runner.run_study(config, workdir, stages=("extract",))
    reset(fake_stages)
    name = {"truncate_json": "table.json", "flip_npz": "arrays.npz", "truncate_npz": "arrays.npz",
            "truncate_done": artifacts.DONE_FILE}[damage]
    path = workdir / "extract" / name
    data = bytearray(path.read_bytes())
    if damage == "flip_npz":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        runner.run_study(config, workdir, stages=("extract",))
    assert fake_stages["extract"] == 1
    assert str(path) in caplog.text


def test_damaged_artefacts_read_by_a_stage_name_their_file(tmp_path):
    table, arrays = tmp_path / "table.json", tmp_path / "arrays.npz"
    artifacts.write_json(table, {"a": [1, 2, 3]})
    artifacts.write_arrays(arrays, {"x": np.arange(1000.0)})
    table.write_bytes(table.read_bytes()[:5])
    with pytest.raises(artifacts.DamagedArtifact, match=str(table)):
        artifacts.read_json(table)
    for data in (arrays.read_bytes()[:100], _flip_member_byte(arrays)):
        arrays.write_bytes(data)
        with pytest.raises(artifacts.DamagedArtifact, match=str(arrays)):
            artifacts.read_arrays(arrays)


def _flip_member_byte(path):
    """The .npz's bytes with one byte of its first array's data flipped (a CRC error)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    return bytes(data)


def test_nan_in_a_json_artefact_is_an_error_naming_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"harmful_val\[2\] = nan"):
        artifacts.write_json(tmp_path / "scores.json",
                             {"harmful_train": [0.5], "harmful_val": [1.0, 2.0, float("nan")]})
    assert not (tmp_path / "scores.json").exists()


def test_artefacts_get_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        artifacts.write_json(tmp_path / "table.json", [1])
        artifacts.write_arrays(tmp_path / "arrays.npz", {"x": np.zeros(2)})
    finally:
        os.umask(previous)
    assert (tmp_path / "table.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "arrays.npz").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------- the work directory lock

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from refusal_jax.study.workdir_lock import workdir_lock
    with workdir_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_frees_it(
        fake_stages, inputs):
    config, _, _, workdir = inputs
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=rf"pid {holder.pid} on .*, started .*: -c {workdir}"):
            runner.run_study(config, workdir)
        assert not (workdir / artifacts.CONFIG_FILE).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    runner.run_study(config, workdir)  # the dead holder's lock file is taken over
    assert fake_stages["extract"] == 1


def test_the_lock_is_released_when_a_run_fails(fake_stages, inputs, monkeypatch):
    config, _, _, workdir = inputs

    def crash(study):
        raise RuntimeError("killed")

    functions = runner._stage_functions()
    monkeypatch.setattr(runner, "_stage_functions", lambda: {**functions, "select": crash})
    with pytest.raises(RuntimeError, match="killed"):
        runner.run_study(config, workdir)
    with workdir_lock(workdir):
        pass


# ------------------------------------------------------------- configs and read-only work dirs


def test_a_run_failing_on_a_missing_model_does_not_bind_the_directory(inputs):
    config, _, _, workdir = inputs
    missing = config.copy_and_resolve_references()
    missing.model.source = str(workdir.parent / "no_such_model")
    with pytest.raises(Exception, match="no_such_model"):
        runner.run_study(missing, workdir, stages=("extract",))
    runner.run_study(config, workdir, stages=())  # the corrected config is accepted
    assert artifacts.read_json(workdir / artifacts.CONFIG_FILE)["config"]["model"]["source"] \
        == config.model.source


def test_read_only_workdir_serves_a_written_report_or_says_why_not(fake_stages, inputs,
                                                                   monkeypatch):
    config, _, _, workdir = inputs
    runner.run_study(config, workdir, stages=("extract", "select", "infer", "evaluate"))
    monkeypatch.setattr(runner, "_writable", lambda path: False)
    with pytest.raises(PermissionError, match=r"read-only .*stage report"):
        runner.run_study(config, workdir, stages=("report",))
    for name in runner.REPORT_FILES:
        (workdir / name).write_text("written\n")
    reset(fake_stages)
    runner.run_study(config, workdir, stages=("report",))
    assert fake_stages["report"] == 0
