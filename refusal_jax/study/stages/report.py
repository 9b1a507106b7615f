"""The report stage: ``results.json`` and ``report.md`` (``refusal_jax.results``) from the
evaluate stage's metrics, the selection, the stage timings and the notes, checked against the
published findings (``study.findings``).

Run as a module, it copies a finished run's results into a README:

    python -m refusal_jax.study.stages.report --workdir=runs/default [--readme=README.md]
"""

from __future__ import annotations

import argparse
import dataclasses

from refusal_jax.results import render, schema
from refusal_jax.study import artifacts
from refusal_jax.study.findings import PUBLISHED_FINDINGS


def _selections(selection: dict) -> list[schema.SelectedComponent]:
    chosen = []
    for method in ("dim", "inlp"):
        for c in selection[method]["components"]:
            chosen.append(schema.SelectedComponent(
                method=method, position=c["position"], layer=c["layer"],
                bypass_score=c["bypass"], steering_score=c["steering"], kl_score=c["kl"],
                n_directions=c.get("k"), first_direction_accuracy=c.get("first_dev_accuracy")))
    return chosen


def _timings(study) -> dict[str, float]:
    timings = {}
    for stage in ("extract", "select", "infer", "evaluate"):
        marker = study.stage_dir(stage) / artifacts.DONE_FILE
        if marker.exists():
            timings[stage] = artifacts.read_json(marker).get("seconds", {}).get("wall", 0.0)
    return timings


NOTES_FILE = "notes.md"


def _notes(study) -> list[str]:
    """Facts a reader needs to interpret the table, then the user's notes (``notes.md``)."""
    config, notes = study.config, []
    prompts = study.prompts()
    for split in ("train", "val"):
        if config.data[f"filter_{split}"]:
            wanted = config.data[f"n_{split}"]
            kept = ", ".join(f"{len(prompts[f'{cls}_{split}'])} {cls}"
                             for cls in ("harmful", "harmless"))
            notes.append(f"Refusal-score filter: of {wanted} sampled {split} prompts per class, "
                         f"{kept} were kept.")
    folding_path = study.stage_dir("infer") / "folding.json"
    if folding_path.exists():
        difference = artifacts.read_json(folding_path)["max_abs_logit_difference"]
        text = (f"`dim_folded` is the global ablation (every layer) of the best DiM direction "
                f"folded into the weights; its logits match the hooked global ablation to "
                f"{difference:.1e}.")
        if config.select.mode == "local":
            text += (" `dim_ablation` is local (the source layer only, select.mode=local), so "
                     "the two rows differ by design.")
        notes.append(text)
    selection = study.selection()
    for method in ("dim", "inlp"):
        if selection[method].get("fallback"):
            notes.append(f"{method} selection: {selection[method]['fallback']} "
                         "(select.when_none_pass=lowest_bypass).")
        rho = selection[method].get("spearman_local_global_bypass")
        if rho is not None:
            notes.append(f"{method}: Spearman correlation of the local and global bypass scores "
                         f"over all candidates: {rho:.3f}.")
    user_notes = study.workdir / NOTES_FILE
    if user_notes.exists():
        notes += [paragraph.strip() for paragraph in user_notes.read_text().split("\n\n")
                  if paragraph.strip()]
    return notes


def _intervention_result(name: str, values: dict) -> schema.InterventionResult:
    """The row of one variant: the schema's own fields, and every other registered metric under
    ``other_metrics``."""
    fields = {field.name for field in dataclasses.fields(schema.InterventionResult)}
    known = {key: value for key, value in values.items() if key in fields}
    other = {key: value for key, value in values.items() if key not in fields}
    return schema.InterventionResult(name=name, **known, other_metrics=other)


def run(study) -> list[str]:
    metrics = artifacts.read_json(study.stage_dir("evaluate") / "metrics.json")
    rows = [_intervention_result(name, values) for name, values in metrics["interventions"].items()]
    results = schema.StudyResults(
        model=study.config.model.source, interventions=rows, config=study.config.to_dict(),
        selections=_selections(study.selection()), geometry=metrics["geometry"],
        inlp_geometry=metrics.get("inlp_geometry"),
        k_curve=metrics["k_curve"], timings_s=_timings(study), notes=_notes(study))
    render.write_report(study.workdir, results, PUBLISHED_FINDINGS)
    return []


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m refusal_jax.study.stages.report",
        description="Copy a run's results table, findings and geometry plot into a README.")
    parser.add_argument("--workdir", required=True, help="work directory of a finished run")
    parser.add_argument("--readme", default="README.md", help="README with the result markers")
    parser.add_argument("--plot", default="docs/study_geometry.png",
                        help="where the geometry plot goes, relative to the README")
    args = parser.parse_args(argv)
    print(render.update_readme(args.readme, args.workdir, PUBLISHED_FINDINGS, plot=args.plot))


if __name__ == "__main__":
    _main()
