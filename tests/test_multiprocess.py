"""Two processes joined by jax.distributed produce the artefacts of one process.

`python tests/test_multiprocess.py --out=DIR [--coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=I]` runs a small study: extraction (captures at the EOI positions
of 24 prompts on a tiny random model) and INLP over the (position, layer) pairs, on a
data=2 x model=4 mesh. With the coordinator flags it is one of two processes of 4 CPU devices
each, which read only their own prompts, gather the captures and the INLP results, and let
process 0 write the artefacts; without them it is a single process of 8 CPU devices. The test
starts both set-ups at once and compares what they wrote. CPU collectives between processes
go through gloo, jax's default CPU collectives implementation.
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

from refusal_jax.runtime import distributed, placement

N_PROMPTS = 24
MESH = {"data": 2, "model": 4}
EOI_TOKENS = 2  # captured positions: the last two tokens of every (left-padded) prompt
HARMFUL_MARKER, HARMLESS_MARKER = 7, 8
TIMEOUT_S = 600


def _prompts() -> tuple[list[list[int]], np.ndarray]:
    """Prompts of 3-10 random tokens whose second-to-last token marks the class (1 = harmful).

    At layer 0 the capture at the marker separates the classes and the one after it does not;
    attention carries the marker into later layers.
    """
    rng = np.random.default_rng(0)
    labels = np.tile([1, 0], N_PROMPTS // 2)
    prompts = []
    for label in labels:
        body = rng.integers(10, 60, rng.integers(1, 9)).tolist()
        marker = HARMFUL_MARKER if label else HARMLESS_MARKER
        prompts.append(body + [marker, int(rng.integers(10, 60))])
    return prompts, labels


def _left_pad(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(prompts), length), np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        valid[row, length - len(prompt):] = True
    return tokens, valid


def _study(out: Path) -> None:
    """Extraction and INLP on the mesh; process 0 writes the artefacts."""
    import jax

    from refusal_jax.directions import fit_inlp, pair_major
    from refusal_jax.models.config import ModelConfig
    from refusal_jax.models.core import forward
    from refusal_jax.runtime import sharding

    config = ModelConfig(family="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=4,
                         n_kv_heads=4, head_dim=4, d_ff=32, max_context=32)
    mesh = sharding.make_mesh(MESH)
    # Weights of std 0.3 give captures of order 1, so atol=1e-5 below is a strict tolerance.
    params = sharding.init_sharded_params(config, jax.random.key(0), mesh, scale=0.3)
    prompts, labels = _prompts()
    rows = placement.process_rows(mesh, N_PROMPTS)
    own = prompts[rows]
    length = distributed.agree_on_max(max(len(p) for p in own))
    tokens, valid = placement.global_batch(_left_pad(own, length), mesh, N_PROMPTS)
    eoi = np.arange(length - EOI_TOKENS, length, dtype=np.int32)
    positions = placement.global_batch(np.tile(eoi, (len(own), 1)), mesh, N_PROMPTS)
    run = jax.jit(forward, static_argnames=("config", "logits"))
    captures = run(params, tokens, valid, config=config, capture_positions=positions,
                   logits="none").captures
    captures = distributed.gather(captures)  # [n, P, L, D] on every process

    features = np.asarray(pair_major(captures)).reshape(-1, N_PROMPTS, config.d_model)
    padded, n_pairs = sharding.pad_leading_axis(features, sharding.axis_size(mesh, "pairs"))
    result = fit_inlp(sharding.shard_leading_axis(padded, mesh, "pairs"), labels,
                      max_directions=3)
    spans_processes = not result.basis.is_fully_addressable
    result = jax.tree.map(lambda leaf: leaf[:n_pairs], distributed.gather(result))

    # Devices ordered p0, p1, p0, p1, ...: each process would own every other block of rows.
    by_process = [[d for d in jax.devices() if d.process_index == p]
                  for p in range(jax.process_count())]
    interleaved = [device for group in zip(*by_process, strict=True) for device in group]
    try:
        placement.process_rows(sharding.make_mesh({"data": -1}, interleaved), N_PROMPTS)
        interleaved_error = None
    except ValueError as error:
        interleaved_error = str(error)

    (out / f"process_{jax.process_index()}.json").write_text(json.dumps({
        "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
        "devices": jax.device_count(), "rows": [rows.start, rows.stop],
        "inlp_spans_processes": spans_processes, "interleaved_error": interleaved_error}))

    def write_artefacts():
        with open(out / "writers.txt", "a") as log:
            log.write(f"{jax.process_index()}\n")
        np.savez(out / "artefacts.npz", captures=captures, basis=result.basis,
                 n_directions=result.n_directions, dev_accuracies=result.dev_accuracies)

    distributed.write_once("artefacts", write_artefacts)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(out: Path, devices: int, flags: list[str]) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, __file__, f"--out={out}", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two processes of 4 devices, and one process of 8 devices, run at the same time."""
    two, one = tmp_path_factory.mktemp("two_processes"), tmp_path_factory.mktemp("one_process")
    address = f"127.0.0.1:{_free_port()}"
    launched = [_launch(two, 4, [f"--coordinator_address={address}", "--num_processes=2",
                                 f"--process_id={index}"]) for index in range(2)]
    launched.append(_launch(one, 8, []))
    try:
        logs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in launched]
    finally:
        for proc in launched:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(launched, logs, strict=True):
        if proc.returncode:
            pytest.fail(f"a study process failed ({proc.args[2:]}):\n{log[-4000:]}")
    return {"two": two, "one": one}


def test_two_processes_each_see_four_devices_and_read_their_own_prompts(runs):
    infos = [json.loads((runs["two"] / f"process_{i}.json").read_text()) for i in range(2)]
    counts = [(i["process_count"], i["local_devices"], i["devices"]) for i in infos]
    assert counts == [(2, 4, 8), (2, 4, 8)]
    assert [i["rows"] for i in infos] == [[0, 12], [12, 24]]
    assert all(i["inlp_spans_processes"] for i in infos)  # the pairs were split over both
    assert all("not contiguous" in i["interleaved_error"] for i in infos)
    single = json.loads((runs["one"] / "process_0.json").read_text())
    assert (single["process_count"], single["devices"], single["rows"]) == (1, 8, [0, 24])
    assert single["interleaved_error"] is None


def test_artefacts_are_written_once(runs):
    assert (runs["two"] / "writers.txt").read_text() == "0\n"


def test_two_processes_produce_the_artefacts_of_one(runs):
    two = np.load(runs["two"] / "artefacts.npz")
    one = np.load(runs["one"] / "artefacts.npz")
    assert two["captures"].shape == (N_PROMPTS, EOI_TOKENS, 2, 16)
    assert np.abs(one["captures"]).max() > 0.5
    np.testing.assert_allclose(two["captures"], one["captures"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(two["n_directions"], one["n_directions"])
    assert one["n_directions"].max() > 0  # INLP found directions to compare
    np.testing.assert_allclose(two["basis"], one["basis"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two["dev_accuracies"], one["dev_accuracies"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Start-up options (no processes needed).


def test_distributed_options_validation():
    assert not distributed.DistributedOptions().explicit
    assert distributed.DistributedOptions("10.0.0.1:1234", 4, 3).explicit
    with pytest.raises(ValueError, match="together"):
        distributed.DistributedOptions(coordinator_address="10.0.0.1:1234")
    with pytest.raises(ValueError, match="must lie in"):
        distributed.DistributedOptions("10.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="host:port"):
        distributed.DistributedOptions("10.0.0.1", 2, 0)
    with pytest.raises(ValueError, match="do not combine"):
        distributed.DistributedOptions("10.0.0.1:1234", 2, 0, auto=True)


def test_single_process_owns_every_row_and_writes():
    from refusal_jax.runtime import sharding

    mesh = sharding.make_mesh({"data": 1})
    assert placement.process_rows(mesh, 6) == slice(0, 6)
    assert distributed.is_primary()
    written = []
    distributed.write_once("single", written.append, "artefact")
    assert written == ["artefact"]


if __name__ == "__main__":
    from absl import app, flags

    OUT = flags.DEFINE_string("out", None, "Directory for the artefacts.", required=True)
    COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
    NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
    PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

    def main(argv):
        del argv
        distributed.initialize(distributed.DistributedOptions(
            COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value))
        _study(Path(OUT.value))

    app.run(main)
