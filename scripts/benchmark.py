"""Benchmark refusal_jax against the PyTorch stack the published refusal pipelines use.

Runs, for one model (default SmolLM2-135M-Instruct; `random:<preset>` for a random-initialised
Llama-shaped model), the sections named by --sections:

  load        load time of --load_source (a GGUF), each in a fresh process: cold (dequantised,
              adapter merged, written to a fresh weights cache) and warm (read back from it)
  capture     activations at the EOI positions of every layer (our jitted forward with
              capture_positions vs transformers with forward pre-hooks), and plain forward logits
  inlp        INLP over (position, layer) pairs: ours (one compiled loop) vs the per-pair loops
              of scripts/inlp_baselines.py (scikit-learn; the reference code's torch L-BFGS,
              without and with a line search), on real activations
              (by default 6 pairs spread over the grid and N=20; --inlp_pairs=0
              --inlp_max_directions=100 is the full comparison, long on a 2-core CPU)
  selection   DiM candidate selection as the pipeline runs it (refusal_jax.selection.scoring:
              cached val baselines, forwards resumed from the candidate's layer, vmapped
              candidate chunks; with every filter scored, and scored until one candidate
              survives) vs the published hooked loop (per candidate: ablation on harmful val,
              ablation on harmless val for KL, ActAdd per multiplier on harmless val), on
              --selection_candidates (position, layer) pairs spread over the grid (0: all);
              the model's chat template on both sides (random models: a tiny ChatML one)
  generation  greedy generation with and without all-layer directional ablation: ours vs
              transformers `generate` with hooks
  pipeline    the end-to-end pipeline's stage times (a hook around `python -m refusal_jax.main`;
              not run by default) against its PyTorch twin (scripts/bench_lib/torch_pipeline.py:
              the same config, prompts and work per stage with transformers hooks and
              scikit-learn INLP; --nopipeline_twin for our times alone)
  scaling     capture / candidate sweep / generation vs prompts, length, layers and width on
              random models (the sweep: bypass scores of all-layer ablations on token batches);
              a table and a PNG plot

Peak RSS is recorded for every step (the memory columns). Every time is the median of
--repeats runs after --warmup runs, with min and max; speed-ups are baseline / ours, run by
run, from interleaved runs. Our code is compiled before the timed runs (ahead of time; the
selection section by an untimed first call) and its compile time reported apart. torch runs
with one intra-op thread per available core; XLA uses its default pool (one thread per core),
so both use the same cores. Results: a Markdown table on stdout, everything
in --out (JSON) and the scaling plot beside it (.png).

  python scripts/benchmark.py --out=benchmark.json
  python scripts/benchmark.py --sections=inlp --inlp_pairs=0 --inlp_max_directions=100 \
      --inlp_baseline_pairs=6 --out=inlp_full.json
  python scripts/benchmark.py --sections=selection --selection_candidates=0 \
      --selection_baseline_candidates=8 --selection_filters=until_chosen --repeats=1 \
      --out=selection_full.json
  python scripts/benchmark.py --sections=pipeline --pipeline_timeout_s=5400 \
      --pipeline_flags="--config=configs/smollm2_reference.py --workdir={workdir}" \
      --pipeline_twin_select_candidates=16 --out=pipeline_reference.json
  python scripts/benchmark.py --platform=gpu --model=random:1b --dtype=bfloat16 --out=gpu.json
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("load", "capture", "inlp", "selection", "generation", "pipeline", "scaling")
# The reference-size pipeline takes longer than everything else together: ask for it by name.
DEFAULT_SECTIONS = ("load", "capture", "inlp", "selection", "generation", "scaling")

FLAGS = flags.FLAGS
_FLAGS_BEFORE = set(FLAGS)
flags.DEFINE_string("out", "benchmark.json", "Where to write the JSON results ('' for none).")
flags.DEFINE_string("plot", "", "PNG of the scaling section (default: --out with .png).")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "JAX platform; torch runs on the same one.")
flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "A refusal_jax.models.loading source, or random:<tiny|small|1b|8b>.")
flags.DEFINE_string("load_source", "default", "The GGUF model of the load section: a "
                    "refusal_jax.models.loading source.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations dtype.")
flags.DEFINE_list("sections", list(DEFAULT_SECTIONS), f"Sections to run, from {SECTIONS}.")
flags.DEFINE_integer("warmup", 1, "Untimed runs before the timed ones.")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure.")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: the number of available cores).")
flags.DEFINE_enum("torch_attention", "sdpa", ["sdpa", "eager"], "transformers attention.")
flags.DEFINE_string("prompts_dir", None, "Prompt splits folder (default ../shared/data/"
                    "refusal_prompts beside the repository; built-in sets if it is absent).")
flags.DEFINE_integer("random_prompt_length", 48, "Prompt length of random models.")
flags.DEFINE_integer("capture_batch", 32, "Prompts per capture / forward call.")
flags.DEFINE_integer("inlp_prompts", 128, "Harmful and harmless training prompts (each).")
flags.DEFINE_integer("extract_batch", 32, "Prompts per call when extracting INLP activations.")
flags.DEFINE_integer("inlp_max_directions", 20, "N, the most INLP classifiers per pair (the "
                     "reference uses 100; the default keeps the run short, for all three alike).")
flags.DEFINE_integer("inlp_pairs", 6, "(position, layer) pairs INLP runs on, spread over the "
                     "grid; 0: all of them (the full comparison; long on a 2-core CPU).")
flags.DEFINE_integer("inlp_baseline_pairs", 0, "Run the per-pair baselines on only this many "
                     "of those pairs and extrapolate their time (labelled); 0: all of them.")
flags.DEFINE_integer("inlp_repeats", 1, "Timed runs of the INLP comparisons (ours is compiled "
                     "ahead of time and not warmed up; baselines warm up on one pair).")
flags.DEFINE_integer("selection_candidates", 6, "DiM (position, layer) candidates, spread over "
                     "the grid; 0: every pair with a non-zero direction (the whole sweep).")
flags.DEFINE_integer("selection_baseline_candidates", 0, "Run the hooked baseline on only this "
                     "many of the candidates and extrapolate its time (labelled); 0: all.")
flags.DEFINE_integer("selection_prompts", 32, "harmful_val and harmless_val prompts (each; the "
                     "reference n_val is 32).")
flags.DEFINE_list("selection_filters", ["all", "until_chosen"], "Our selection rows: 'all' "
                  "(every filter of every candidate; like for like), 'until_chosen' (the "
                  "pipeline's default).")
flags.DEFINE_enum("selection_mode", None, ["local", "global"], "Ablation of a candidate: at its "
                  "layer or at every layer (default: the pipeline's select.mode, local).")
flags.DEFINE_integer("selection_chunk", 0, "Candidates per vmapped chunk (0: the pipeline's "
                     "runtime.candidate_chunk, 8).")
flags.DEFINE_integer("selection_batch", 0, "Val prompts per forward pass, both sides (0: the "
                     "pipeline's runtime.batch_size, 32).")
flags.DEFINE_integer("generation_batch", 16, "Prompts per generation call.")
flags.DEFINE_integer("generation_new_tokens", 64, "New tokens per prompt.")
flags.DEFINE_integer("generation_sweep", 8, "All-layer ablations of the sweep row (DiM directions "
                     "of layers spread over the model; ours: one generate_each call, "
                     "transformers: one hooked generate each); 0 skips the row.")
flags.DEFINE_list("scaling_axes", ["prompts", "length", "layers", "width"], "Scaling axes.")
flags.DEFINE_string("scaling_prompts", "2,8,32", "Prompt counts of the scaling section.")
flags.DEFINE_string("scaling_length", "16,64,256", "Sequence lengths of the scaling section.")
flags.DEFINE_string("scaling_layers", "1,4,16", "Layer counts of the scaling section.")
flags.DEFINE_string("scaling_width", "128,256,1024", "Widths of the scaling section.")
flags.DEFINE_integer("scaling_new_tokens", 8, "New tokens in the scaling section's generation.")
flags.DEFINE_integer("scaling_repeats", 2, "Timed runs per scaling figure.")
flags.DEFINE_string("pipeline_module", "refusal_jax.main", "The pipeline's entry module.")
flags.DEFINE_string("pipeline_flags", "--config=configs/default.py --workdir={workdir}",
                    "Its command line flags ({workdir}: a fresh temporary folder).")
flags.DEFINE_integer("pipeline_timeout_s", 3600, "Time limit of the pipeline run.")
flags.DEFINE_bool("pipeline_twin", True, "Run the pipeline's PyTorch twin on the same config "
                  "(the --config of --pipeline_flags) after it, as the stages' baseline.")
flags.DEFINE_integer("pipeline_twin_select_candidates", 0, "Score only this many of each "
                     "method's candidates in the twin's select stage (evenly spread) and "
                     "extrapolate its time to all of them; 0 scores every candidate.",
                     lower_bound=0)
BENCHMARK_FLAGS = sorted(set(FLAGS) - _FLAGS_BEFORE)


def _check_flags() -> None:
    unknown = sorted(set(FLAGS.sections) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"unknown sections {unknown}; choose from {SECTIONS}")
    if not FLAGS.selection_filters or not set(FLAGS.selection_filters) <= {"all", "until_chosen"}:
        raise app.UsageError("--selection_filters takes 'all' and/or 'until_chosen', got "
                             f"{FLAGS.selection_filters}")
    for name in ("warmup", "inlp_pairs", "inlp_baseline_pairs", "selection_candidates",
                 "selection_baseline_candidates", "selection_chunk", "selection_batch",
                 "generation_sweep"):
        if getattr(FLAGS, name) < 0:
            raise app.UsageError(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
    for name in ("repeats", "capture_batch", "inlp_prompts", "extract_batch",
                 "inlp_max_directions", "inlp_repeats",
                 "selection_prompts", "generation_batch", "generation_new_tokens",
                 "scaling_new_tokens", "scaling_repeats", "random_prompt_length"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")


def main(argv: list[str]) -> None:
    del argv
    _check_flags()
    if FLAGS.platform == "gpu":  # torch shares the GPU: JAX must not take 75% of it up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_platforms", "cuda" if FLAGS.platform == "gpu" else "cpu")
    import torch
    from bench_lib import runner
    from bench_lib.measure import available_cores

    torch.set_num_threads(FLAGS.threads or available_cores())
    settings = {name: FLAGS[name].value for name in BENCHMARK_FLAGS}
    start = time.time()
    result = runner.run_all(FLAGS, settings)
    result["command"] = shlex.join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    result["started_at"] = datetime.datetime.fromtimestamp(start).isoformat(timespec="seconds")
    result["wall_s"] = round(time.time() - start, 1)
    print(runner.markdown(result))
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(runner.to_json(result), indent=1))
        print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
