"""Running on devices: meshes and sharding, multi-host start-up and placement, progress, model
loading onto a placement."""
