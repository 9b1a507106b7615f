"""Running on devices: meshes and sharding, placement of a run's arrays, multi-host start-up,
precision, atomic files, progress, and loading a model for a study onto a placement."""
