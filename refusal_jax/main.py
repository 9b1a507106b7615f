"""The study as one command.

    python -m refusal_jax.main --config=configs/default.py --workdir=runs/default \
        [--config.data.n_train=64 ...] [--stages=extract,select,infer,evaluate,report]

Stages write their artefacts in ``--workdir`` and are skipped when already done for the same
config, so rerunning an interrupted command resumes it. A work directory belongs to one config:
running another config there is refused (use a new ``--workdir``).

On several hosts (a TPU pod, GPU nodes), start the same command on every host with the
start-up flags (``--distributed_auto``, or ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I``; see ``refusal_jax.runtime.distributed``), a mesh
(``--config.runtime.mesh=data=-1,model=4``) and a ``--workdir`` that every host sees; see
WORKSPACE.md, "Launching a sweep on a TPU pod".
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from refusal_jax.runtime import distributed
from refusal_jax.study.config import STAGES
from refusal_jax.study.runner import run_study

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file with get_config()",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory for artefacts and the report")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"stages to run, from {list(STAGES)}")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for jax.distributed.initialize (all processes pass the same).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes).", lower_bound=0)
_DISTRIBUTED_AUTO = flags.DEFINE_boolean(
    "distributed_auto", False,
    "Call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, Open MPI).")


def _distributed_options() -> distributed.DistributedOptions:
    """How this process joins the others, from the start-up flags."""
    return distributed.DistributedOptions(
        coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, auto=_DISTRIBUTED_AUTO.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    distributed.initialize(_distributed_options())  # before anything touches a device
    run_study(_CONFIG.value, _WORKDIR.value, _STAGES.value)


if __name__ == "__main__":
    app.run(main)
