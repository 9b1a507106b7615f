"""Load time of a GGUF model, each load in a fresh process with its own weights cache: cold (the
GGUF dequantised, the adapter merged, the cache entry written) and warm (read from that entry).
The Python imports are timed apart; the rows time `load_model` until its weights are ready, and
record its CPU time (on a busy machine the wall time also counts waits for the disk and the
cores, so the CPU time is the closer estimate of an idle machine's wall time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_lib.measure import Stats
from bench_lib.report import Row

SECTION = "0 load"
_CHILD = """
import json, sys, time
start = time.perf_counter()
import jax
from refusal_jax.models.loading import load_model
imported, cpu = time.perf_counter(), time.process_time()
model = load_model(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(model.params)
print(json.dumps({"import_s": imported - start, "load_s": time.perf_counter() - imported,
                  "load_cpu_s": time.process_time() - cpu}))
"""


def _load_in_child(source: str, dtype: str, cache: str, platform: str) -> dict[str, float]:
    env = dict(os.environ, REFUSAL_JAX_CACHE_DIR=cache,
               JAX_PLATFORMS="cuda" if platform == "gpu" else "cpu")
    child = subprocess.run([sys.executable, "-c", _CHILD, source, dtype], env=env,
                           capture_output=True, text=True, check=False)
    if child.returncode:
        raise RuntimeError(f"loading {source} failed:\n{child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run(source: str, *, dtype: str, platform: str, repeats: int
        ) -> tuple[list[Row], dict[str, Any]]:
    """A cold load, then ``repeats`` warm loads from the cache it wrote."""
    with tempfile.TemporaryDirectory(prefix="refusal_jax_cache_") as cache:
        cold = _load_in_child(source, dtype, cache, platform)
        warm = [_load_in_child(source, dtype, cache, platform) for _ in range(repeats)]
        entry_bytes = sum(path.stat().st_size for path in Path(cache, "weights").rglob("*")
                          if path.is_file())
    rows = [
        Row(section=SECTION, step=f"load_model({source!r}) cold: dequantise the GGUF, merge "
            "the adapter, write the weights cache (one run)", ours=Stats.of([cold["load_s"]]),
            details={"import_s": round(cold["import_s"], 2),
                     "load_cpu_s": round(cold["load_cpu_s"], 2)}),
        Row(section=SECTION, step=f"load_model({source!r}) warm: from the weights cache",
            ours=Stats.of([run["load_s"] for run in warm]),
            details={"import_s": [round(run["import_s"], 2) for run in warm],
                     "load_cpu_s": [round(run["load_cpu_s"], 2) for run in warm]}),
    ]
    return rows, {"source": source, "cache_entry_bytes": entry_bytes}
