"""refusal_jax: steering refusal in chat models with JAX.

Packages, each importing only those listed before it:
`text` (chat templates, prompt sets), `models` (configs, the forward pass, generation, loading,
`io` for model files), `interventions` (the steering algebra and weight folding), `runtime`
(meshes, sharding, multi-host placement, progress), `directions` (DiM, INLP, LEACE),
`evaluation` (metrics), `selection` (candidate scoring and ranking), `results` (the results
schema and report), `study` (config, artefacts, variants and the stages), `training` (the
refusal organism). `main` runs the study.
"""

__version__ = "0.1.0"
