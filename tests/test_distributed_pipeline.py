"""Two processes of 4 CPU devices run the extract stage through `refusal_jax.main` and write the
artefacts of one process of 8 devices.

`python tests/test_distributed_pipeline.py RECORD_DIR [refusal_jax.main flags]` runs the study
command with those flags and records, per process, how many prompts each call of the chat
encoder received and which artefact files the process wrote. The test starts two such processes
joined by `--coordinator_address` (4 devices each) and one process of 8 devices, all on the
mesh data=2 x fsdp=2 x model=2 and the shrunk configs/tiny_random.py, and compares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refusal_jax.study import artifacts

REPOSITORY = Path(__file__).resolve().parents[1]
STUDY_FLAGS = [
    f"--config={REPOSITORY / 'configs' / 'tiny_random.py'}", "--stages=extract",
    "--config.data.n_train=8", "--config.data.n_val=4", "--config.data.n_eval=2",
    "--config.directions.inlp_max_directions=2",
    "--config.runtime.mesh=data=2,fsdp=2,model=2",
]
BATCH_ROWS = 8  # tiny_random.py's runtime.batch_size: every prompt set is one batch
TOLERANCE = 1e-5
TIMEOUT_S = 540


def _record_and_run(record_dir: Path, argv: list[str]) -> None:
    """Runs refusal_jax.main with `argv`, recording encoder calls and artefact writes."""
    from absl import app

    from refusal_jax import main as entry
    from refusal_jax.text import chat

    encoded: list[int] = []
    written: list[str] = []
    original_encode = chat.ChatFormat.encode

    def encode(self, instructions, **kwargs):
        encoded.append(len(instructions))
        return original_encode(self, instructions, **kwargs)

    chat.ChatFormat.encode = encode
    for name in ("write_bytes_atomically", "_write_npz"):
        original = getattr(artifacts, name)

        def writer(path, data, original=original):
            written.append(str(path))
            return original(path, data)

        setattr(artifacts, name, writer)

    def main(args):
        import jax

        entry.main(args)
        record = {"process": jax.process_index(), "processes": jax.process_count(),
                  "local_devices": jax.local_device_count(), "encoded": encoded,
                  "written": written}
        (record_dir / f"process_{jax.process_index()}.json").write_text(json.dumps(record))

    app.run(main, argv=[sys.argv[0], *argv])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(record_dir: Path, devices: int, flags: list[str]) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen([sys.executable, __file__, str(record_dir), *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two processes of 4 devices and one of 8, run at the same time."""
    two, one = tmp_path_factory.mktemp("two_processes"), tmp_path_factory.mktemp("one_process")
    address = f"127.0.0.1:{_free_port()}"
    launched = [_launch(two, 4, [*STUDY_FLAGS, f"--workdir={two / 'run'}",
                                 f"--coordinator_address={address}", "--num_processes=2",
                                 f"--process_id={index}"]) for index in range(2)]
    launched.append(_launch(one, 8, [*STUDY_FLAGS, f"--workdir={one / 'run'}"]))
    try:
        logs = [process.communicate(timeout=TIMEOUT_S)[0] for process in launched]
    finally:
        for process in launched:
            if process.poll() is None:
                process.kill()
    for process, log in zip(launched, logs, strict=True):
        if process.returncode:
            pytest.fail(f"a study process failed ({process.args[3:]}):\n{log[-4000:]}")
    return {"two": two, "one": one}


def _records(directory: Path, count: int) -> list[dict]:
    return [json.loads((directory / f"process_{index}.json").read_text())
            for index in range(count)]


def test_each_process_encodes_only_its_half_of_every_batch(runs):
    records = _records(runs["two"], 2)
    assert [(r["process"], r["processes"], r["local_devices"]) for r in records] == [
        (0, 2, 4), (1, 2, 4)]
    for record in records:  # four prompt sets of one batch each
        assert record["encoded"] == [BATCH_ROWS // 2] * 4
    (single,) = _records(runs["one"], 1)
    assert single["encoded"] == [BATCH_ROWS] * 4


def test_only_process_0_writes_the_artefacts(runs):
    first, second = _records(runs["two"], 2)
    assert second["written"] == []
    names = sorted(Path(path).name for path in first["written"])
    assert names == sorted(["config.json", "prompts.json", "baseline_scores.json",
                            "activations.npz", "directions.npz", "DONE.json"])


def test_two_processes_write_the_artefacts_of_one(runs):
    for name in ("activations.npz", "directions.npz"):
        two = artifacts.read_arrays(runs["two"] / "run/extract" / name)
        one = artifacts.read_arrays(runs["one"] / "run/extract" / name)
        assert sorted(two) == sorted(one)
        for key, expected in one.items():
            scale = max(1.0, float(np.nanmax(np.abs(expected))))
            difference = np.nanmax(np.abs(two[key].astype(np.float64) - expected))
            assert difference / scale <= TOLERANCE, (name, key)
    assert one["inlp_n_directions"].max() > 0  # INLP found directions to compare
    for name in ("prompts.json", "baseline_scores.json"):
        assert (artifacts.read_json(runs["two"] / "run/extract" / name)
                == artifacts.read_json(runs["one"] / "run/extract" / name))


if __name__ == "__main__":
    _record_and_run(Path(sys.argv[1]), sys.argv[2:])
