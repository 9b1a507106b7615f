"""``report.md`` and the README's copy of a run: Markdown rendered from validated results.

Rendering knows no intervention names: the findings a run is compared with come from the caller
as `Expectations` (the study's are in `refusal_jax.study.findings`), each naming the rows it
needs. A finding whose rows are missing is "not measured", never guessed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from refusal_jax.evaluation.k_curve import NEAR_BASELINE_NATS
from refusal_jax.results.schema import (
    RESULTS_FILENAME,
    StudyResults,
    read_results,
    validate_results,
    write_results,
)
from refusal_jax.runtime.files import write_text_atomically

REPORT_FILENAME = "report.md"


@dataclasses.dataclass(frozen=True)
class Finding:
    """A published finding, checked on the rows named by ``rows`` (intervention names).

    ``judge`` gets those rows (`InterventionResult`s, in that order) and returns (holds,
    evidence), with holds None when the run's sample cannot resolve the finding, or a string
    saying why the run cannot judge it. ``explain``, when given, gets the results and the same
    rows of a run where the finding does not hold or is not resolved and returns a note on why,
    from the run's own numbers (or None).
    """

    claim: str
    rows: tuple[str, ...]
    judge: Callable[..., tuple[bool, str] | str]
    explain: Callable[..., str | None] | None = None


@dataclasses.dataclass(frozen=True)
class Expectations:
    """What a run is compared with: ``summary``, a paragraph for the reader, and ``findings``,
    checked in this order."""

    summary: str
    findings: tuple[Finding, ...]


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rate(value: float | None, n: int | None = None,
          interval: list[float] | None = None) -> str:
    """``0.25``, ``0.25 (4/16)``, or with an interval ``0.25 (4/16; 0.10–0.49)``."""
    if value is None:
        return "–"
    inside = [] if n is None else [f"{round(value * n)}/{n}"]
    inside += [] if interval is None else [f"{interval[0]:.2f}–{interval[1]:.2f}"]
    return f"{value:.2f} ({'; '.join(inside)})" if inside else f"{value:.2f}"


def _mean(value: float | None, digits: int, interval: list[float] | None) -> str:
    if value is None or interval is None:
        return _number(value, digits)
    return f"{value:.{digits}f} ({interval[0]:.{digits}f}–{interval[1]:.{digits}f})"


# Optional rate columns: (field, header, which count it is a rate of), shown when any row has it.
_JUDGE_COLUMNS = (
    ("harmful_on_topic_compliance_rate", "harmful on-topic compliance", "n_harmful"),
    ("harmful_degenerate_rate", "harmful off-topic / degenerate", "n_harmful"),
    ("harmless_on_topic_compliance_rate", "harmless on-topic compliance", "n_harmless"),
    ("harmless_degenerate_rate", "harmless off-topic / degenerate", "n_harmless"),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _interventions_table(results: StudyResults, *, descriptions: bool = True) -> str:
    """The table of every intervention's metrics, then (with ``descriptions``) a list of what
    each row applied."""
    corpora = sorted({c for row in results.interventions for c in row.cross_entropy},
                     key=lambda corpus: (corpus != "builtin", corpus))  # built-in text first
    benchmarks = sorted({b for row in results.interventions for b in row.multiple_choice})
    has_judge = any(row.judge_unsafe_rate is not None for row in results.interventions)
    judged = [column for column in _JUDGE_COLUMNS
              if any(getattr(row, column[0]) is not None for row in results.interventions)]
    header = ["intervention", "harmful refusal rate", "harmless induced-refusal rate"]
    header += [title for _, title, _ in judged]
    header += ["KL (harmless)"]
    header += [f"CE {corpus} (nats)" for corpus in corpora]
    header += ["judge unsafe rate"] if has_judge else []
    header += [f"{benchmark} acc." for benchmark in benchmarks]
    header += ["centroid axis: harmful", "centroid axis: harmless"]
    rows = []
    for row in results.interventions:
        cells = [f"`{row.name}`",
                 _rate(row.harmful_refusal_rate, row.n_harmful,
                       row.intervals.get("harmful_refusal_rate")),
                 _rate(row.harmless_refusal_rate, row.n_harmless,
                       row.intervals.get("harmless_refusal_rate"))]
        cells += [_rate(getattr(row, field), getattr(row, n), row.intervals.get(field))
                  for field, _, n in judged]
        cells += [_mean(row.kl, 4, row.intervals.get("kl"))]
        cells += [_number(row.cross_entropy.get(corpus)) for corpus in corpora]
        cells += ([_rate(row.judge_unsafe_rate, row.n_harmful,
                         row.intervals.get("judge_unsafe_rate"))] if has_judge else [])
        cells += [_rate(row.multiple_choice.get(benchmark)) for benchmark in benchmarks]
        cells += [_number(row.centroid_axis_position, 2),
                  _number(row.centroid_axis_position_harmless, 2)]
        rows.append(cells)
    if not descriptions:
        return _table(header, rows)
    listing = "\n".join(f"- `{row.name}`: {row.description}" for row in results.interventions)
    return _table(header, rows) + "\n\n" + listing


_COLUMN_LEGEND = """\
Columns: *harmful refusal rate* is the fraction of completions on harmful prompts that contain a
refusal phrase (substring matching, docs/method.md section 6); *harmless induced-refusal rate* is
the same on harmless prompts; the *on-topic compliance* and *off-topic / degenerate* columns are
the offline judge's labels of the completions that are not refusals (docs/judge_guideline.md):
harmful on-topic compliance is the jailbreak measure, since a refusal replaced by gibberish is no
jailbreak. Rates read `rate (count/n; 95% Wilson interval)`, KL `mean (95% bootstrap interval
over prompts)`; *KL* is the mean
KL(baseline || intervened) of the next-token distribution at the last prompt position on harmless
prompts; *CE* is the mean token cross-entropy on a text corpus (perplexity = e^CE); the *judge
unsafe rate* is the fraction of harmful completions a safety classifier calls unsafe (completions
of fewer than 15 words count as safe); the *centroid axis* columns give the mean position of the
intervened activations at the source layer along the axis from the harmful centroid (0) to the
harmless centroid (1) of the baseline activations."""

_GEOMETRY_NOTE = """\
Reading the positions: with r the unit DiM direction, m the midpoint of the two centroids and
|d| their distance, projecting r out of the harmful centroid lands at 0.5 + (m . r) / |d| and
reflecting it at 1 + 2 (m . r) / |d|. So nullspace projection lands halfway, and reflection in the
harmless cluster, only when the midpoint has no component along r; a large mean activation along
r shifts both. The same formulas hold for INLP's projection and reflection when the centroid
difference lies inside the INLP subspace."""


def _verdicts(results: StudyResults, expectations: Expectations
              ) -> list[tuple[Finding, str, str]]:
    rows = {row.name: row for row in results.interventions}
    verdicts = []
    for finding in expectations.findings:
        if any(name not in rows for name in finding.rows):
            names = " and ".join(f"`{name}`" for name in finding.rows)
            verdicts.append((finding, "not measured", f"needs {names}"))
            continue
        outcome = finding.judge(*(rows[name] for name in finding.rows))
        if isinstance(outcome, str):  # a reason why it cannot be judged
            verdicts.append((finding, "not measured", outcome))
        else:
            holds, evidence = outcome
            verdict = {True: "holds", False: "does not hold", None: "not resolved"}[holds]
            verdicts.append((finding, verdict, evidence))
    return verdicts


def expectation_checks(results: StudyResults, expectations: Expectations
                       ) -> list[tuple[str, str, str]]:
    """Each finding as (claim, "holds" | "does not hold" | "not resolved" | "not measured",
    evidence); "not resolved" means the run's sample cannot tell (see the finding's judge)."""
    return [(finding.claim, verdict, evidence)
            for finding, verdict, evidence in _verdicts(results, expectations)]


def departure_notes(results: StudyResults, expectations: Expectations) -> list[str]:
    """The explanations, computed from the results, of the findings that do not hold or are not
    resolved."""
    rows = {row.name: row for row in results.interventions}
    notes = [finding.explain(results, *(rows[name] for name in finding.rows))
             for finding, verdict, _ in _verdicts(results, expectations)
             if verdict in ("does not hold", "not resolved") and finding.explain is not None]
    return [note for note in notes if note]


def _link(workdir: Path, relative: str, what: str) -> str:
    path = workdir / relative
    if not path.is_file():
        raise FileNotFoundError(f"{what} {relative!r} does not exist in {workdir}; write the "
                                "plot first or drop it from the results")
    return f"![{Path(relative).stem}]({Path(relative).as_posix()})"


def _selection_section(results: StudyResults) -> str:
    rows = [[s.method, str(s.position), str(s.layer), _number(s.bypass_score),
             _number(s.steering_score), _number(s.kl_score, 4),
             "–" if s.n_directions is None else str(s.n_directions),
             _number(s.first_direction_accuracy)] for s in results.selections]
    return _table(["method", "EOI position", "layer", "bypass score", "steering score",
                   "KL score", "INLP directions", "first-direction dev acc."], rows)


def _geometry_section(results: StudyResults, workdir: Path) -> str:
    text = []
    views = [("DiM", results.geometry), ("INLP", results.inlp_geometry)]
    for method, geometry in views:
        if geometry is None:
            continue
        angles = ", ".join(f"{angle:.1f}°" for angle in geometry.principal_angles_deg)
        where = (f"At the {method} source, EOI position {geometry.position}, layer "
                 f"{geometry.layer} (the baseline and the {method} interventions)"
                 if results.inlp_geometry is not None else
                 f"Activations at EOI position {geometry.position}, layer {geometry.layer}")
        if geometry.cosine_dim_inlp is None:
            text.append(f"{where}. INLP kept no direction there (k = 0: its first classifier did "
                        "not beat chance or the k policy kept none), so there is no DiM/INLP "
                        "angle to show.")
        else:
            text.append(f"{where}. Cosine between the DiM direction and the first INLP "
                        f"direction: {geometry.cosine_dim_inlp:.3f}. Principal angle(s) between "
                        f"the DiM direction and the INLP subspace: {angles or '–'}.")
        text += [_link(workdir, plot, "geometry plot") for plot in geometry.plots]
    text.append(_GEOMETRY_NOTE)
    return "\n\n".join(text)


def _k_curve_section(results: StudyResults, workdir: Path) -> str:
    curve = results.k_curve
    rows = [[str(p.k), _rate(p.harmful_refusal_rate), _rate(p.harmless_refusal_rate),
             _number(p.cross_entropy),
             _number(p.cross_entropy - curve.baseline_cross_entropy), _number(p.kl, 4)]
            for p in curve.points]
    text = [(f"`{curve.intervention}` keeping only its first k INLP directions. Baseline: "
             f"harmful refusal rate {curve.baseline_harmful_refusal_rate:.2f}, cross-entropy "
             f"{curve.baseline_cross_entropy:.3f} nats."),
            _table(["k", "harmful refusal rate", "harmless refusal rate", "CE (nats)",
                    "CE - baseline", "KL"], rows)]
    best = curve.recommended_k(NEAR_BASELINE_NATS)
    if best is None:
        text.append(f"No k keeps the cross-entropy within {NEAR_BASELINE_NATS} nats of the "
                    "baseline.")
    else:
        text.append(f"Recommended: k = {best.k}, the fewest harmful refusals "
                    f"({best.harmful_refusal_rate:.2f}) among the k whose cross-entropy stays "
                    f"within {NEAR_BASELINE_NATS} nats of the baseline "
                    f"(+{best.cross_entropy - curve.baseline_cross_entropy:.3f}).")
    if curve.plot is not None:
        text.append(_link(workdir, curve.plot, "k-curve plot"))
    return "\n\n".join(text)


def _config_section(results: StudyResults) -> str:
    if not results.config:
        return "No configuration recorded."
    return "```json\n" + json.dumps(results.config, indent=2, sort_keys=True) + "\n```"


def _reference_section(results: StudyResults) -> str | None:
    """The published-code switches (config section ``reference``) in force, or None when the
    config has none."""
    switches = (results.config or {}).get("reference")
    if not switches:
        return None
    on = [name for name, value in sorted(switches.items()) if value]
    off = [name for name, value in sorted(switches.items()) if not value]
    return ("Switches to the published code's behaviour (`reference.*`; each is a row of the "
            "departures table in docs/method.md section 7).\n\n"
            f"- on: {', '.join(f'`{name}`' for name in on) or 'none'}\n"
            f"- off: {', '.join(f'`{name}`' for name in off) or 'none'}")


def render_report(results: StudyResults, workdir: str | os.PathLike,
                  expectations: Expectations) -> str:
    """The Markdown report of validated `results` compared with `expectations`; plot paths are
    relative to `workdir`."""
    workdir = Path(workdir)
    checks = expectation_checks(results, expectations)
    parts = [f"# Refusal steering study: {results.model}", "## Results",
             _interventions_table(results), _COLUMN_LEGEND,
             "## Comparison with the published findings", expectations.summary,
             _table(["finding", "here", "evidence"], [list(check) for check in checks])]
    departures = sum(verdict == "does not hold" for _, verdict, _ in checks)
    notes = departure_notes(results, expectations) + results.notes
    if departures and not notes:
        parts.append(f"**{departures} published finding(s) do not hold in this run, and no "
                     "explanation is recorded (add one to `notes` in results.json).**")
    if notes:
        parts += ["### Notes", "\n".join(f"- {note}" for note in notes)]
    if results.selections:
        parts += ["## Selected components", _selection_section(results)]
    if results.geometry is not None:
        parts += ["## Geometry", _geometry_section(results, workdir)]
    if results.k_curve is not None:
        parts += ["## Tunable k", _k_curve_section(results, workdir)]
    if results.timings_s:
        parts += ["## Wall time", _table(["stage", "seconds"], [
            [stage, f"{seconds:.1f}"] for stage, seconds in results.timings_s.items()])]
    reference = _reference_section(results)
    if reference is not None:
        parts += ["## Published-code switches", reference]
    parts += ["## Configuration", _config_section(results),
              f"Results schema version {results.schema_version} (`{RESULTS_FILENAME}`)."]
    return "\n\n".join(parts) + "\n"


def write_report(workdir: str | os.PathLike, results: StudyResults | Mapping[str, Any],
                 expectations: Expectations) -> tuple[Path, Path]:
    """Validates `results`, then writes `workdir/results.json` and `workdir/report.md`.

    Both files are written atomically, and neither when rendering fails. Returns their paths.
    Raises ValueError for results that do not match the schema, FileNotFoundError for a missing
    workdir or a plot that does not exist.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist; create it first")
    parsed = validate_results(results)
    report = render_report(parsed, workdir, expectations)
    results_path, report_path = write_results(workdir, parsed), workdir / REPORT_FILENAME
    write_text_atomically(report_path, report)
    return results_path, report_path


# --------------------------------------------------------------------------------------------
# The README's copy of a run's results.

README_START = "<!-- study-results:start -->"
README_END = "<!-- study-results:end -->"
_README_PLOT_COLOURS = 64  # the plots are flat colours: a 64-colour palette keeps them < 100 KB


def readme_section(results: StudyResults, expectations: Expectations, plot: str | None, *,
                   source: str) -> str:
    """Markdown for a README: the intervention table (without report.md's list of what each row
    applied), the check against ``expectations`` with the run's notes, the selected components,
    ``plot`` (a path relative to the README) and the wall time per stage. ``source`` names where
    the results come from."""
    parts = [f"Results of the study on `{results.model}` (from `{source}`; "
             f"{results.interventions[0].n_harmful} harmful and "
             f"{results.interventions[0].n_harmless} harmless evaluation prompts):",
             _interventions_table(results, descriptions=False),
             _table(["published finding", "here", "evidence"],
                    [list(check) for check in expectation_checks(results, expectations)])]
    notes = departure_notes(results, expectations) + results.notes
    if notes:
        parts.append("\n".join(f"- {note}" for note in notes))
    if results.selections:
        parts.append(_selection_section(results))
    if plot is not None:
        parts.append(f"![geometry of the interventions]({plot})")
    if results.timings_s:
        total = sum(results.timings_s.values())
        parts.append("Wall time: " + ", ".join(
            f"{stage} {seconds:.0f} s" for stage, seconds in results.timings_s.items())
            + f"; {total / 60:.1f} minutes in all.")
    return "\n\n".join(parts)


def _compact_png(source: Path, destination: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    with Image.open(source) as image:
        palette = image.convert("RGB").quantize(colors=_README_PLOT_COLOURS)
    destination.parent.mkdir(parents=True, exist_ok=True)
    palette.save(destination, optimize=True)


def update_readme(readme: str | os.PathLike, workdir: str | os.PathLike,
                  expectations: Expectations, *,
                  plot: str | os.PathLike = "docs/study_geometry.png") -> Path:
    """Replaces the README text between ``README_START`` and ``README_END`` with
    :func:`readme_section` of ``workdir/results.json``, and writes a geometry plot (the DiM /
    INLP plane when there is one, of the view holding the INLP interventions) to ``plot``
    (relative to the README's folder) as a 64-colour PNG. Raises FileNotFoundError for a
    missing README or results, ValueError when the README lacks the markers."""
    readme, workdir = Path(readme), Path(workdir)
    if not readme.is_file():
        raise FileNotFoundError(f"no README at {readme}")
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} lacks the markers {README_START} ... {README_END} (in this "
                         "order) around the place where the results go; add them")
    results = read_results(workdir / RESULTS_FILENAME)
    relative_plot = None
    view = results.inlp_geometry or results.geometry  # the view holding the INLP variants
    if view is not None and view.plots:
        plots = view.plots
        chosen = next((p for p in plots if Path(p).name == "geometry_dim_inlp.png"), plots[0])
        _compact_png(workdir / chosen, readme.parent / plot)
        relative_plot = Path(plot).as_posix()
    section = readme_section(results, expectations, relative_plot,
                             source=(workdir / REPORT_FILENAME).as_posix())
    write_text_atomically(readme, text[:start + len(README_START)] + "\n" + section + "\n"
                          + text[end:])
    return readme
