r"""The study as one command.

    python -m refusal_jax.main --config=default --workdir=runs/default \
        [--config.data.n_train=64 ...] [--stages=extract,select,infer,evaluate,report]

``--config`` takes a config file (``configs/default.py``) or the name of one of the configs
shipped with the package (``default``, ``tiny_random``, ``smollm2_reference``, ...: the files of
``configs/``). ``--help`` lists every config key with its default and what it means.

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

import io
import re
import sys
import tokenize
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from refusal_jax.runtime import distributed
from refusal_jax.study import config as study_config
from refusal_jax.study.config import STAGES
from refusal_jax.study.runner import run_study

# The shipped configs: refusal_jax/configs in an installed package (setup.py maps the
# repository's configs/ there), the repository's configs/ in a checkout.
_CONFIG_DIRS = (Path(__file__).resolve().parent / "configs",
                Path(__file__).resolve().parents[1] / "configs")
# A key line of study.config's docstring table: the key, two spaces or more, its description.
_TABLE_ROW = re.compile(r"^([a-z_]+(?:\.[a-z_*]+)?)\s{2,}(\S.*)$")


def config_names() -> list[str]:
    """The names of the shipped configs, for ``--config=NAME``."""
    directory = next((d for d in _CONFIG_DIRS if d.is_dir()), None)
    return sorted(p.stem for p in directory.glob("*.py")) if directory else []


def config_path(value: str) -> str:
    """``value`` itself when it names a file, else the shipped config of that name."""
    if Path(value).is_file() or value.endswith(".py"):
        return value
    for directory in _CONFIG_DIRS:
        if (directory / f"{value}.py").is_file():
            return str(directory / f"{value}.py")
    raise app.UsageError(f"--config={value}: no such file, nor a shipped config; pass a config "
                         f"file or one of {config_names()}")


def _key_docs() -> dict[str, str]:
    """What study/config.py says of each key: its docstring table (rows for a key or a
    ``section.*``), else the comment lines just above the key's line in ``base_config``."""
    docs: dict[str, str] = {}
    key = None
    for line in (study_config.__doc__ or "").splitlines():
        row = _TABLE_ROW.match(line)
        if row:
            key = row.group(1)
            docs[key] = row.group(2)
        elif key and line.startswith(" " * 10) and line.strip():
            docs[key] += " " + line.strip()
        else:
            key = None
    comments: list[str] = []
    source = Path(study_config.__file__).read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.line.strip().startswith("#"):
            comments.append(token.string.lstrip("# "))
        elif token.type == tokenize.NAME and token.string == "config" and token.line.strip(
                ).startswith("config.") and "=" in token.line:
            assigned = token.line.split("=")[0].strip().removeprefix("config.")
            if comments and assigned.count(".") == 1:
                docs.setdefault(assigned, " ".join(comments))
            comments = []
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                tokenize.DEDENT):
            comments = [] if token.type != tokenize.COMMENT else comments
    return docs


def config_help() -> str:
    """Every config key with its default (``study.config.base_config``) and description."""
    docs = _key_docs()
    names = ", ".join(config_names())
    lines = [f"a config file with get_config(), or a shipped config's name ({names}). "
             "Each key below is set with --config.KEY=VALUE; the defaults are "
             "study.config.base_config's, which a config file changes in part:"]
    base = study_config.base_config()
    for section, value in base.items():
        if not hasattr(value, "items"):
            lines.append(f"  {section} = {value!r}: {docs.get(section, '')}")
            continue
        if f"{section}.*" in docs:
            lines.append(f"  {section}.*: {docs[section + '.*']}")
        for name, default in value.items():
            key = f"{section}.{name}"
            doc = docs.get(key)
            lines.append(f"    {key} = {default!r}" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, config_help(), lock_config=True)
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


def _with_config_paths(argv: list[str]) -> list[str]:
    """``argv`` with a config name after ``--config`` replaced by its file (see config_path)."""
    out, take_next = [], False
    for arg in argv:
        if take_next:
            arg, take_next = config_path(arg), False
        elif arg in ("--config", "-config"):
            take_next = True
        elif arg.startswith(("--config=", "-config=")):
            flag, value = arg.split("=", 1)
            arg = f"{flag}={config_path(value)}"
        out.append(arg)
    return out


def cli() -> None:
    """The ``refusal-jax`` command (the same as ``python -m refusal_jax.main``)."""
    app.run(main, argv=_with_config_paths(sys.argv))


if __name__ == "__main__":
    cli()
