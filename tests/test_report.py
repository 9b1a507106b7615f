"""results.json schema and report.md, rendered from a fixture results dict."""

import copy
import json
import math

import numpy as np
import pytest

from refusal_jax.evaluation import geometry, k_curve
from refusal_jax.results import render, schema
from refusal_jax.study.findings import PUBLISHED_FINDINGS as FINDINGS


def row(name, harmful, harmless, **extra):
    return {"name": name, "description": f"{name} at layer 5", "harmful_refusal_rate": harmful,
            "harmless_refusal_rate": harmless, "n_harmful": 20, "n_harmless": 10, **extra}


def fixture_results(plots=()):
    """A complete results dict; the centroid position of the reflection (0.3) contradicts the
    published finding on purpose."""
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "model": "smollm2-135m-instruct",
        "config": {"n_train": 32, "max_new_tokens": 64, "layers": [5, 6]},
        "interventions": [
            row("baseline", 0.9, 0.1, cross_entropy={"builtin": 3.0, "alpaca": 2.1},
                judge_unsafe_rate=0.05, multiple_choice={"mmlu": 0.4},
                centroid_axis_position=0.0, centroid_axis_position_harmless=1.0,
                harmful_on_topic_compliance_rate=0.05, harmful_degenerate_rate=0.05,
                intervals={"harmful_refusal_rate": [0.699, 0.972],
                           "harmful_on_topic_compliance_rate": [0.009, 0.236]}),
            row("dim_ablation", 0.1, 0.1, kl=0.02, cross_entropy={"builtin": 3.01},
                judge_unsafe_rate=0.7, centroid_axis_position=0.8,
                harmful_on_topic_compliance_rate=0.85, harmful_degenerate_rate=0.05,
                intervals={"kl": [0.011, 0.034]}),
            row("dim_actadd", 0.05, 0.9, kl=0.3, cross_entropy={"builtin": 3.2}),
            row("inlp_nullspace", 0.5, 0.1, kl=0.01, centroid_axis_position=0.52),
            row("inlp_reflection", 0.2, 0.15, kl=0.05, centroid_axis_position=0.3),
            row("leace", 0.6, 0.1, kl=0.0),
        ],
        "selections": [
            {"method": "dim", "position": -1, "layer": 5, "bypass_score": -3.2,
             "steering_score": 4.1, "kl_score": 0.02},
            {"method": "inlp", "position": -2, "layer": 6, "n_directions": 7,
             "first_direction_accuracy": 0.98},
        ],
        "geometry": {"position": -1, "layer": 5, "cosine_dim_inlp": 0.83,
                     "principal_angles_deg": [12.5], "plots": list(plots[:1])},
        "k_curve": {"intervention": "inlp_reflection", "baseline_harmful_refusal_rate": 0.9,
                    "baseline_cross_entropy": 3.0, "plot": plots[1] if plots else None,
                    "points": [{"k": 1, "harmful_refusal_rate": 0.5, "cross_entropy": 3.01},
                               {"k": 2, "harmful_refusal_rate": 0.3, "cross_entropy": 3.04},
                               {"k": 4, "harmful_refusal_rate": 0.2, "cross_entropy": 3.4}]},
        "timings_s": {"extract": 12.5, "select": 40.0},
        "notes": ["The reflection lands at 0.3 because the flips at two layers cancel."],
    }


@pytest.fixture
def workdir(tmp_path):
    rng = np.random.default_rng(0)
    harmful, harmless = rng.normal(size=(8, 6)) + 2, rng.normal(size=(8, 6)) - 2
    (tmp_path / "plots").mkdir()
    geometry.plot_view(tmp_path / "plots" / "geometry_pca.png",
                       geometry.pca_plane(harmful, harmless), harmful, harmless,
                       {"dim_ablation": (harmful * 0.5, None)}, title="fixture")
    curve = schema.validate_k_curve(fixture_results()["k_curve"])
    k_curve.plot_k_curve(tmp_path / "plots" / "k_curve.png", curve)
    return tmp_path


PLOTS = ("plots/geometry_pca.png", "plots/k_curve.png")


def test_write_report_renders_every_row_and_plot(workdir):
    results = fixture_results(PLOTS)
    results_path, report_path = render.write_report(workdir, results, FINDINGS)
    assert results_path == workdir / "results.json" and report_path == workdir / "report.md"
    text = report_path.read_text()
    assert text.startswith("# Refusal steering study: smollm2-135m-instruct\n")
    for intervention in results["interventions"]:
        assert f"| `{intervention['name']}` |" in text
        assert f"- `{intervention['name']}`: {intervention['name']} at layer 5" in text
    assert ("| intervention | harmful refusal rate | harmless induced-refusal rate | harmful "
            "on-topic compliance | harmful off-topic / degenerate | KL (harmless) | CE builtin "
            "(nats) | CE alpaca (nats) | judge unsafe rate | mmlu acc. |") in text
    assert ("| `baseline` | 0.90 (18/20; 0.70–0.97) | 0.10 (1/10) | 0.05 (1/20; 0.01–0.24) | "
            "0.05 (1/20) | – | 3.000 | 2.100 | 0.05 (1/20) | 0.40 | 0.00 | 1.00 |") in text
    assert ("| `dim_ablation` | 0.10 (2/20) | 0.10 (1/10) | 0.85 (17/20) | 0.05 (1/20) | "
            "0.0200 (0.0110–0.0340) | 3.010 | – | 0.70 (14/20) | – |") in text
    # rows the judge did not label show a dash, not a zero
    assert "| `leace` | 0.60 (12/20) | 0.10 (1/10) | – | – | 0.0000 |" in text
    for plot in PLOTS:
        assert f"]({plot})" in text and (workdir / plot).stat().st_size > 10_000
    assert "What to expect" in text and results["notes"][0] in text
    assert "no explanation is recorded" not in text
    assert "Recommended: k = 2" in text
    assert "| extract | 12.5 |" in text and '"max_new_tokens": 64' in text
    assert not list(workdir.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_results_json_round_trips_and_matches_the_json_schema(workdir):
    jsonschema = pytest.importorskip("jsonschema")
    results = fixture_results(PLOTS)
    results_path, _ = render.write_report(workdir, results, FINDINGS)
    stored = json.loads(results_path.read_text())
    jsonschema.validate(stored, schema.json_schema())
    parsed = schema.read_results(results_path)
    assert parsed == schema.validate_results(results)
    assert parsed.interventions[1].kl == 0.02 and parsed.k_curve.points[2].k == 4
    # a dataclass is accepted as well as a dict, with the same output
    render.write_report(workdir, parsed, FINDINGS)
    assert json.loads(results_path.read_text()) == stored
    # the schema and the validator reject the same mistakes
    for mutate in (lambda r: r.pop("model"), lambda r: r.update(extra=1),
                   lambda r: r["interventions"][0].update(kl="big"),
                   lambda r: r["geometry"].update(plots="a.png")):
        broken = copy.deepcopy(stored)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema.json_schema())
        with pytest.raises(ValueError):
            schema.validate_results(broken)


def test_expectation_checks():
    checks = {finding: (verdict, evidence) for finding, verdict, evidence in
              render.expectation_checks(schema.validate_results(fixture_results()),
                                        FINDINGS)}
    # judged rows: read on on-topic compliance, 1/20 -> 17/20, Newcombe [0.52, 0.91] > 0.45
    assert checks["DiM directional ablation suppresses most refusals"] == (
        "holds", "harmful on-topic compliance 0.05 -> 0.85 (+0.80, 95% CI [+0.52, +0.91]) "
        "against 0.45, half the baseline's refusal rate")
    # no judge on the reflection row: refusal rate 18/20 -> 4/20, [0.40, 0.84] straddles 0.45
    verdict, evidence = checks["INLP reflection suppresses most refusals"]
    assert verdict == "not resolved"
    assert evidence.startswith("harmful refusal rate 0.90 -> 0.20 (substring match; no offline "
                               "judge) (+0.70, 95% CI [+0.40, +0.84])")
    # 10/20 vs 2/20 refused: [0.12, 0.61] > 0
    assert checks["INLP nullspace projection suppresses fewer refusals than DiM ablation"][0] \
        == "holds"
    # 9/10 vs 1/10 refused on harmless prompts: [0.37, 0.92] > 0
    assert checks["DiM ActAdd induces refusals on harmless prompts"] == (
        "holds", "harmless refusal rate 0.10 -> 0.90 (+0.80, 95% CI [+0.37, +0.92])")
    assert checks["nullspace projection lands between the clusters"][0] == "holds"
    assert checks["reflection lands in the opposite (harmless) cluster"][0] == "does not hold"
    # rows that are missing are "not measured", never guessed
    minimal = schema.validate_results({"model": "m", "interventions": [row("baseline", 0.0, 0.0)]})
    verdicts = {verdict for _, verdict, _ in render.expectation_checks(minimal, FINDINGS)}
    assert verdicts == {"not measured"}


def test_unexplained_departures_are_flagged(tmp_path):
    results = fixture_results()
    results["notes"] = []
    _, report_path = render.write_report(tmp_path, results, FINDINGS)
    assert ("**1 published finding(s) do not hold in this run, and no explanation is recorded"
            in report_path.read_text())


def test_recommended_k():
    curve = schema.validate_k_curve(fixture_results()["k_curve"])
    assert curve.recommended_k().k == 2  # k = 4 refuses least but costs 0.4 nats
    assert curve.recommended_k(max_increase=1.0).k == 4
    assert curve.recommended_k(max_increase=0.001) is None


def mutated(change):
    results = fixture_results()
    change(results)
    return results


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("model"), "results lacks the required field 'model'"),
    (lambda r: r["interventions"][1].pop("n_harmful"),
     r"results.interventions\[1\] lacks the required field 'n_harmful'"),
    (lambda r: r.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
    (lambda r: r["interventions"][1].update(kl=math.nan),
     r"results.interventions\[1\].kl is nan; results must be finite"),
    (lambda r: r["interventions"][0].update(harmful_refusal_rate=1.2),
     r"harmful_refusal_rate = 1.2 is not a rate"),
    (lambda r: r["interventions"][2].update(name="baseline"), "duplicate names \\['baseline'\\]"),
    (lambda r: r.update(schema_version=99), "schema_version is 99"),
    (lambda r: r.update(interventions=[]), "interventions is empty"),
    (lambda r: r["interventions"][1].update(kl=-0.5), "is negative"),
    (lambda r: r["interventions"][0].update(n_harmful=0), "must be positive"),
    (lambda r: r["interventions"][0].update(n_harmful=True), "must be an integer"),
    (lambda r: r["config"].update(path=object()), "not JSON"),
    (lambda r: r["k_curve"]["points"].reverse(), "distinct increasing k"),
    (lambda r: r["interventions"][0].update(cross_entropy={"builtin": "3"}),
     r"cross_entropy.builtin must be a number"),
    (lambda r: r["geometry"].update(layer=None), "layer is null"),
    (lambda r: r["geometry"].update(cosine_dim_inlp="high"), "cosine_dim_inlp must be a number"),
    (lambda r: r["interventions"][1]["intervals"].update(kl=[0.03, 0.04]),
     r"intervals.kl = \[0.03, 0.04\] does not hold its value 0.02"),
    (lambda r: r["interventions"][1]["intervals"].update(kl=[0.01]), r"must be \[low, high\]"),
    (lambda r: r["interventions"][2].update(intervals={"harmful_degenerate_rate": [0, 1]}),
     "no number 'harmful_degenerate_rate'"),
    (lambda r: r["interventions"][0]["intervals"].update(harmful_refusal_rate=[0.8, 1.2]),
     r"harmful_refusal_rate\[1\] = 1.2 is not a rate"),
    (lambda r: r["interventions"][0].update(harmful_degenerate_rate=1.5), "is not a rate"),
])
def test_schema_errors(change, message):
    with pytest.raises(ValueError, match=message):
        schema.validate_results(mutated(change))


def test_write_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="workdir .* does not exist"):
        render.write_report(tmp_path / "missing", fixture_results(), FINDINGS)
    with pytest.raises(FileNotFoundError, match="geometry plot 'plots/none.png' does not exist"):
        render.write_report(tmp_path, fixture_results(("plots/none.png", None)), FINDINGS)
    assert not (tmp_path / "results.json").exists()  # nothing written when rendering fails
    with pytest.raises(FileNotFoundError, match="no results file"):
        schema.read_results(tmp_path / "results.json")


def test_update_readme_replaces_the_marked_section_and_copies_a_small_plot(workdir, tmp_path):
    render.write_report(workdir, fixture_results(PLOTS), FINDINGS)
    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"# Title\n\nBefore.\n\n{render.README_START}\nold results\n"
                      f"{render.README_END}\n\nAfter.\n")
    assert render.update_readme(readme, workdir, FINDINGS, plot="docs/geometry.png") == readme
    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n" + render.README_START + "\n")
    assert text.endswith(render.README_END + "\n\nAfter.\n") and "old results" not in text
    assert "| `dim_ablation` | 0.10 (2/20) | 0.10 (1/10) | 0.85 (17/20) |" in text
    assert ("| reflection lands in the opposite (harmless) cluster | does not hold | mean "
            "centroid-axis position 0.30 (expected >= 0.75) |") in text
    assert fixture_results()["notes"][0] in text  # the explanation travels with the verdict
    assert "| dim | -1 | 5 | -3.200 |" in text
    assert "![geometry of the interventions](docs/geometry.png)" in text
    assert "Wall time: extract 12 s, select 40 s; 0.9 minutes in all." in text
    plot = readme.parent / "docs/geometry.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size < 200_000
    # Rerunning replaces the section again instead of adding a second one.
    render.update_readme(readme, workdir, FINDINGS, plot="docs/geometry.png")
    assert readme.read_text() == text


def test_update_readme_errors(workdir, tmp_path):
    readme = tmp_path / "README.md"
    with pytest.raises(FileNotFoundError, match="no README"):
        render.update_readme(readme, workdir, FINDINGS)
    readme.write_text(f"{render.README_END}\n{render.README_START}\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        render.update_readme(readme, workdir, FINDINGS)
    readme.write_text(f"{render.README_START}\n{render.README_END}\n")
    with pytest.raises(FileNotFoundError, match="no results file"):
        render.update_readme(readme, tmp_path / "empty", FINDINGS)


def test_a_second_geometry_view_at_the_inlp_source(workdir, tmp_path):
    """When INLP chose another (position, layer), its variants are shown at their own source;
    the report shows both views and the README takes the plot of the INLP one."""
    results = fixture_results(PLOTS)
    (workdir / "inlp_source").mkdir()
    (workdir / "inlp_source" / "geometry_dim_inlp.png").write_bytes(
        (workdir / PLOTS[0]).read_bytes())
    results["inlp_geometry"] = {"position": -2, "layer": 6, "cosine_dim_inlp": 0.5,
                                "principal_angles_deg": [60.0],
                                "plots": ["inlp_source/geometry_dim_inlp.png"]}
    _, report_path = render.write_report(workdir, results, FINDINGS)
    text = report_path.read_text()
    assert "At the DiM source, EOI position -1, layer 5 (the baseline and the DiM" in text
    assert "At the INLP source, EOI position -2, layer 6 (the baseline and the INLP" in text
    assert "](inlp_source/geometry_dim_inlp.png)" in text and "](plots/geometry_pca.png)" in text
    assert schema.read_results(workdir / "results.json").inlp_geometry.layer == 6
    readme = tmp_path / "README.md"
    readme.write_text(f"{render.README_START}\n{render.README_END}\n")
    render.update_readme(readme, workdir, FINDINGS, plot="geometry.png")
    assert (tmp_path / "geometry.png").read_bytes() == _palette_png(
        workdir / "inlp_source" / "geometry_dim_inlp.png")


def test_geometry_where_inlp_found_no_direction(workdir):
    results = fixture_results(PLOTS)
    results["geometry"].update(cosine_dim_inlp=None, principal_angles_deg=[])
    _, report_path = render.write_report(workdir, results, FINDINGS)
    text = report_path.read_text()
    assert "INLP kept no direction there" in text and "Cosine between" not in text
    assert schema.read_results(workdir / "results.json").geometry.cosine_dim_inlp is None


def _palette_png(path):
    import io

    from PIL import Image

    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").quantize(colors=64).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_a_departure_of_nullspace_from_ablation_is_explained_from_the_results(workdir):
    results = fixture_results(PLOTS)
    results["interventions"][3]["harmful_refusal_rate"] = 0.1  # nullspace = ablation: 2/20
    parsed = schema.validate_results(results)
    (note,) = render.departure_notes(parsed, FINDINGS)
    assert note == ("Nullspace projection vs DiM ablation: 2/20 vs 2/20 harmful prompts still "
                    "refused.")
    # Both methods at one (position, layer): how much of r the INLP subspace removes.
    results["selections"][1].update(position=-1, layer=5)
    (note,) = render.departure_notes(schema.validate_results(results), FINDINGS)
    assert ("Both methods chose (position -1, layer 5), and the INLP subspace lies 12.5° from "
            "the DiM direction r, so the nullspace projection removes 95% of the component "
            "along r that DiM ablation removes, and 6 other direction(s) with it") in note
    _, report_path = render.write_report(workdir, results, FINDINGS)
    assert note in report_path.read_text()
    assert render.departure_notes(schema.validate_results(fixture_results()), FINDINGS) == []


def test_rendering_takes_its_findings_from_the_caller(tmp_path):
    """The renderer knows no intervention names: a caller's finding on its own rows is judged,
    explained when it does not hold, and "not measured" when a row is missing."""
    toy = render.Expectations(summary="Toy expectations.", findings=(
        render.Finding("toy refuses less than the baseline", ("baseline", "toy"),
                       lambda base, toy: (toy.harmful_refusal_rate < base.harmful_refusal_rate,
                                          "compared"),
                       explain=lambda results, base, toy: f"{toy.name} refused as often"),
        render.Finding("a missing row", ("absent",), lambda row: (True, "never judged")),
    ))
    results = {"model": "m", "interventions": [row("baseline", 0.5, 0.0), row("toy", 0.5, 0.0)]}
    checks = render.expectation_checks(schema.validate_results(results), toy)
    assert checks == [("toy refuses less than the baseline", "does not hold", "compared"),
                      ("a missing row", "not measured", "needs `absent`")]
    _, report_path = render.write_report(tmp_path, results, toy)
    text = report_path.read_text()
    assert "Toy expectations." in text and "- toy refused as often" in text
    assert "What to expect" not in text


def test_version_1_results_still_read():
    """Schema 2 only added optional fields, so a version 1 results.json reads unchanged."""
    results = fixture_results()
    results["schema_version"] = 1
    for intervention in results["interventions"]:
        for key in ("intervals", "harmful_on_topic_compliance_rate", "harmful_degenerate_rate"):
            intervention.pop(key, None)
    assert schema.validate_results(results).schema_version == 1
