"""The study as one command.

    python -m refusal_jax.main --config=configs/default.py --workdir=runs/default \
        [--config.data.n_train=64 ...] [--stages=extract,select,infer,evaluate,report]

Stages write their artefacts in ``--workdir`` and are skipped when already done for the same
config, so rerunning an interrupted command resumes it. A work directory belongs to one config:
running another config there is refused (use a new ``--workdir``).

On several hosts (a TPU pod, GPU nodes), start the same command on every host with the
start-up flags of ``refusal_jax.runtime.distributed`` (``--distributed_auto``, or
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``), a mesh
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    distributed.initialize_from_flags()  # before anything touches a device
    run_study(_CONFIG.value, _WORKDIR.value, _STAGES.value)


if __name__ == "__main__":
    app.run(main)
