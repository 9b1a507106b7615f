"""refusal_jax: steering refusal in chat models with JAX.

``import refusal_jax as rj`` gives the common path (``refusal_jax.api``; a tutorial in
docs/steering_in_your_own_code.md): ``rj.load_model``, ``rj.capture``, ``rj.fit_dim`` /
``fit_inlp`` / ``fit_leace``, the intervention builders, ``rj.generate`` /
``generate_each``, ``rj.refusal_rate``, ``rj.fold`` and ``rj.export``.

Packages, each importing only those listed before it:
`text` (chat templates, prompt sets), `models` (configs, the forward pass, generation, loading,
`io` for model files), `interventions` (the steering algebra and weight folding), `runtime`
(meshes, sharding, multi-host placement, progress), `directions` (DiM, INLP, LEACE),
`evaluation` (metrics), `selection` (candidate scoring and ranking), `results` (the results
schema and report), `study` (config, artefacts, variants and the stages), `training` (the
refusal organism). `api` sits on top of them; `main` runs the study.
"""

import logging as _logging


def _drop_startup_notices() -> None:
    """Silences two notices that every command would print and that ask nothing of the user:
    transformers' "PyTorch was not found" (only its tokenizers are used here) and JAX's INFO
    line for the TPU backend it probes when no platform was asked for (JAX_PLATFORMS set: a
    backend that fails raises instead). Other messages of both loggers pass."""
    def keep(prefix: str):
        return lambda record: not record.getMessage().startswith(prefix)

    _logging.getLogger("transformers").addFilter(keep("PyTorch was not found"))
    _logging.getLogger("jax._src.xla_bridge").addFilter(
        keep("Unable to initialize backend 'tpu'"))


_drop_startup_notices()



def __getattr__(name: str):
    """``rj.<name>`` (and ``from refusal_jax import *``) read ``refusal_jax.api``, imported on
    first use, so importing one subpackage (``refusal_jax.text``) does not load them all."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # A subpackage not imported yet (`from refusal_jax import text`): the import system
        # imports it after this AttributeError; importing the api here could be circular.
        raise AttributeError(f"module 'refusal_jax' has no attribute {name!r}")
    api = importlib.import_module("refusal_jax.api")
    if name == "__all__":
        return list(api.__all__)
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'refusal_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__getattr__("__all__")))

__version__ = "0.1.0"
