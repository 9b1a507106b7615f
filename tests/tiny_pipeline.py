"""`configs/tiny_random.py` shrunk so that every stage takes seconds; shared by the pipeline
tests (in-process and the sharded ones run as scripts)."""

import importlib.util
from pathlib import Path

CONFIGS = Path(__file__).parents[1] / "configs"


def shrunk_tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_random", CONFIGS / "tiny_random.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.directions.inlp_max_directions = 2
    config.data.n_train = 8
    config.data.n_val = 4
    config.data.n_eval = 2
    config.infer.max_new_tokens = 2
    return config
