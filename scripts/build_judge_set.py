"""Builds the completions of the judge's labelled set (tests/data/judge_labels.jsonl).

Two steps, from a study work directory whose extract, select and infer stages ran (the default
config with more evaluation prompts and longer completions: docs/judge_guideline.md):

  python -m refusal_jax.main --config=configs/default.py --workdir=/tmp/w23/run \\
      --config.data.n_eval=24 --config.infer.max_new_tokens=48 --stages=extract,select,infer
  python scripts/build_judge_set.py layers --workdir=/tmp/w23/run --out=/tmp/w23/layers
  python scripts/build_judge_set.py sample --workdir=/tmp/w23/run --layers_dir=/tmp/w23/layers \\
      --out=/tmp/w23/unlabelled.jsonl

`layers` generates every steering variant of the study (but the folded model) with its
components moved to other layers (`--layers`), on the first `--n_prompts` evaluation prompts of
each class; `sample` draws a stratified sample of the study's and these completions, one JSON
object per line: id, variant, prompt_set, prompt, completion, split. Labels are then added by
reading each completion under docs/judge_guideline.md; the fitting script
(`scripts/fit_judge_thresholds.py --measure`) adds the measures.
"""

import copy
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from configs.default import get_config  # noqa: E402
from refusal_jax.models.loading import load_model  # noqa: E402
from refusal_jax.study import artifacts  # noqa: E402
from refusal_jax.study.completions import complete_each  # noqa: E402
from refusal_jax.study.variants import build_variants  # noqa: E402

LAYER_VARIANTS = ["dim_ablation", "dim_actadd", "inlp_nullspace", "inlp_reflection",
                  "inlp_clamp", "inlp_actadd", "leace"]
CLASSES = ("harmful", "harmless")
HELDOUT_FRACTION = 0.35


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in argv)


def generate_layer_variants(workdir: Path, out: Path, layers: list[int], n_prompts: int,
                            max_new_tokens: int) -> None:
    """Completions of LAYER_VARIANTS with every selected component moved to each layer."""
    config = get_config()
    model = load_model(config.model.source)
    directions = artifacts.read_arrays(workdir / "extract/directions.npz")
    selection = artifacts.read_json(workdir / "select/selection.json")
    prompts = artifacts.read_json(workdir / "extract/prompts.json")
    (out / "completions").mkdir(parents=True, exist_ok=True)
    for layer in layers:
        moved = copy.deepcopy(selection)
        for method in ("dim", "inlp"):
            for component in moved[method]["components"]:
                component["layer"] = layer
        variants = build_variants(model, directions, moved, config, names=LAYER_VARIANTS)
        texts = {}
        for prompt_set in CLASSES:
            instructions = prompts[f"{prompt_set}_eval"][:n_prompts]
            interventions = [getattr(v, prompt_set) for v in variants]
            texts[prompt_set] = complete_each(
                model, instructions, interventions, max_new_tokens=max_new_tokens,
                batch_size=n_prompts, length_bucket=config.runtime.length_bucket,
                name=f"layer {layer} {prompt_set}")
        for index, variant in enumerate(variants):
            rows = {prompt_set: [{"instruction": i, "completion": c} for i, c in zip(
                prompts[f"{prompt_set}_eval"][:n_prompts], texts[prompt_set][index])]
                for prompt_set in CLASSES}
            (out / f"completions/{variant.name}_layer{layer}.json").write_text(json.dumps(
                {"name": f"{variant.name}_layer{layer}", "description": variant.description,
                 **rows}, indent=1))


def sample_completions(workdir: Path, layers_dir: Path, out: Path, per_set: int,
                       per_set_layers: int, seed: int) -> None:
    """A stratified sample: `per_set` completions of each study variant and prompt set,
    `per_set_layers` of each layer variant and prompt set; of each variant's rows,
    round(HELDOUT_FRACTION * n) drawn at random form the held-out split (a random generator per
    variant, seeded by `seed` and its name)."""
    rows = []
    sources = [(path, per_set) for path in sorted((workdir / "infer/completions").glob("*.json"))]
    sources += [(path, per_set_layers)
                for path in sorted((layers_dir / "completions").glob("*.json"))]
    for path, n in sources:
        rng = random.Random(f"{seed}/{path.stem}")
        data = json.loads(path.read_text())
        variant_rows = []
        for prompt_set in CLASSES:
            for index in sorted(rng.sample(range(len(data[prompt_set])), n)):
                row = data[prompt_set][index]
                variant_rows.append({"id": f"{path.stem}/{prompt_set}/{index}",
                                     "variant": path.stem, "prompt_set": prompt_set,
                                     "prompt": row["instruction"],
                                     "completion": row["completion"], "split": "train"})
        for row in rng.sample(variant_rows, round(HELDOUT_FRACTION * len(variant_rows))):
            row["split"] = "heldout"
        rows += variant_rows
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} completions to {out}")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("layers", "sample"):
        raise SystemExit(__doc__)
    flags = _flags(argv[1:])
    workdir = Path(flags["workdir"])
    if argv[0] == "layers":
        generate_layer_variants(workdir, Path(flags["out"]),
                                [int(x) for x in flags.get("layers", "10,16").split(",")],
                                int(flags.get("n_prompts", 8)),
                                int(flags.get("max_new_tokens", 48)))
    else:
        sample_completions(workdir, Path(flags["layers_dir"]), Path(flags["out"]),
                           int(flags.get("per_set", 9)), int(flags.get("per_set_layers", 3)),
                           int(flags.get("seed", 0)))


if __name__ == "__main__":
    main(sys.argv[1:])
