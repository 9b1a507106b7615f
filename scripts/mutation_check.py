"""Plants known bugs, one at a time, in a temporary copy of the repository and reports which of
them the tests catch (issue 28). Run on demand, not in CI (it takes about half an hour on a
2-core CPU: most mutants rerun the PyTorch-twin comparison of tests/test_benchmark.py):

    python scripts/mutation_check.py                 # every mutant
    python scripts/mutation_check.py --only ranking_reversed,temperature_ignored
    python scripts/mutation_check.py --list

Each mutant is (name, file, exact old snippet, replacement, tests). The snippet must occur
exactly once in the file, or the script stops before running anything: when the package's
files move, update MUTANTS below (the only place that names paths and snippets). A mutant is
"caught" when at least one of its tests fails; the failing test ids and their first assertion
line are reported so that one can check the failure is about the bug. The working tree is never
modified: the repository is copied (without .git and caches) for each mutant.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = "refusal_jax/study/variants.py"
RANKING = "refusal_jax/selection/ranking.py"
DATA = "refusal_jax/study/data.py"
GENERATE = "refusal_jax/models/generate.py"

# Tests that compare every variant with the PyTorch twin (completions and evaluate metrics).
TWIN = ["tests/test_benchmark.py::test_twin_completions_of_every_variant_match_ours_under_greedy_"
        "decoding",
        "tests/test_benchmark.py::test_every_variant_on_our_artefacts_completes_as_the_twin",
        "tests/test_benchmark.py::test_evaluate_metrics_of_every_variant_match_the_twin"]

_NULLSPACE = ('"INLP nullspace projection at {mode}, {inlp_where}, {k_text}",\n'
              '        harmful=lambda c: c.inlp_map("reflection", ')
_MAP_A1 = ('"INLP counterfactual map a=1 at {mode}, {inlp_where}, {k_text}",\n'
           '        harmful=lambda c: c.inlp_map("reflection", ')

# (name, file relative to the repository root, exact old snippet, replacement, pytest node ids)
MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
    # -- the five bugs of issue 28
    ("dim_actadd_harmful_sign", VARIANTS,
     "harmful=lambda c: c.dim_actadd(-1.0),", "harmful=lambda c: c.dim_actadd(1.0),", TWIN),
    ("inlp_reflection_alpha_1", VARIANTS,
     'c.inlp_map("reflection", 2.0)', 'c.inlp_map("reflection", 1.0)', TWIN),
    ("inlp_ranking_reversed", RANKING,
     "return lambda pair: (-accuracy[pair], bypass[pair])",
     "return lambda pair: (accuracy[pair], bypass[pair])",
     ["tests/test_selection_ranking.py"]),
    ("refusal_filter_keeps_every_harmless", DATA,
     "keep = scores > 0 if harmful else scores < 0",
     "keep = scores > 0 if harmful else np.ones(scores.shape, bool)",
     ["tests/test_refusal_filter.py"]),
    ("temperature_ignored", GENERATE,
     "logits = logits / sampling.temperature", "logits = logits",
     ["tests/test_sampling.py"]),
    # -- a sign flip of every other variant's coefficient
    ("dim_actadd_harmless_sign", VARIANTS,
     "harmless=lambda c: c.dim_actadd(1.0)", "harmless=lambda c: c.dim_actadd(-1.0)", TWIN),
    ("inlp_actadd_harmful_sign", VARIANTS,
     "harmful=lambda c: c.inlp_actadd(-1.0),", "harmful=lambda c: c.inlp_actadd(1.0),", TWIN),
    ("inlp_actadd_harmless_sign", VARIANTS,
     "harmless=lambda c: c.inlp_actadd(1.0)", "harmless=lambda c: c.inlp_actadd(-1.0)", TWIN),
    ("inlp_nullspace_alpha_sign", VARIANTS, _NULLSPACE + "1.0)", _NULLSPACE + "-1.0)", TWIN),
    ("inlp_reflection_a1_alpha_sign", VARIANTS, _MAP_A1 + "1.0)", _MAP_A1 + "-1.0)", TWIN),
    ("inlp_reflection_alpha_sign", VARIANTS,
     'c.inlp_map("reflection", 2.0)', 'c.inlp_map("reflection", -2.0)', TWIN),
    ("inlp_clamp_target_sign", VARIANTS,
     'target=self.directions["harmless_mean"][self._pl(c)]',
     'target=-self.directions["harmless_mean"][self._pl(c)]', TWIN),
    ("leace_write_sign", VARIANTS,
     'write=self.directions["leace_write"][self._pl(c)]',
     'write=-self.directions["leace_write"][self._pl(c)]', TWIN),
    # x - (x.r) r is even in r, so a sign flip of the ablated direction is an equivalent mutant
    # (as for dim_folded); its coefficient is |r|^2 = 1, broken here by not normalising r.
    ("dim_ablation_unnormalised", VARIANTS,
     "dict(direction=_unit(self.dim[self._pl(c)])))",
     "dict(direction=self.dim[self._pl(c)]))", TWIN),
]

IGNORED = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info",
                                 ".venv", "venv", ".ruff_cache")


def check_snippets(mutants) -> None:
    """Every snippet must occur exactly once in its file (before any test runs)."""
    problems = []
    for name, path, old, new, tests in mutants:
        file = ROOT / path
        if not file.is_file():
            problems.append(f"{name}: file {path} not found")
            continue
        count = file.read_text(encoding="utf-8").count(old)
        if count != 1:
            problems.append(f"{name}: the snippet {old!r} occurs {count} times in {path} "
                            "(expected exactly once)")
        if old == new:
            problems.append(f"{name}: the replacement equals the snippet")
        for test in tests:
            if not (ROOT / test.split("::")[0]).is_file():
                problems.append(f"{name}: test file {test.split('::')[0]} not found")
    if problems:
        raise SystemExit("mutation_check: update MUTANTS:\n  " + "\n  ".join(problems))


def _failures(output: str) -> list[str]:
    """'node id: first line of the reason' of each failed or erroring test in pytest -rfE
    output."""
    lines = []
    for match in re.finditer(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", output, re.MULTILINE):
        lines.append(f"{match.group(2)}: {(match.group(3) or '')[:160]}")
    return lines


def run_mutant(mutant, timeout: int) -> dict:
    name, path, old, new, tests = mutant
    with tempfile.TemporaryDirectory(prefix=f"mutant_{name}_") as folder:
        copy = Path(folder) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORED, symlinks=True)
        file = copy / path
        text = file.read_text(encoding="utf-8")
        assert text.count(old) == 1
        file.write_text(text.replace(old, new), encoding="utf-8")
        # The copy's package, not the installed (editable) one, comes first on the path.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(copy)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "COLUMNS": "400"}  # room for the failure reason in the short summary
        command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                   "-x", *tests]
        start = time.perf_counter()
        try:
            child = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True,
                                   timeout=timeout)
            output, code = child.stdout + child.stderr, child.returncode
        except subprocess.TimeoutExpired as error:
            output, code = str(error.stdout or "") + str(error.stderr or ""), None
        seconds = time.perf_counter() - start
        # Make sure the copy's package was the one tested.
        status = ("timeout" if code is None else "caught" if code == 1 else
                  "survived" if code == 0 else f"error (pytest exit {code})")
        return {"name": name, "status": status, "seconds": seconds,
                "failures": _failures(output), "tail": output[-3000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per mutant")
    parser.add_argument("--verbose", action="store_true", help="print pytest's output tail")
    args = parser.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m[0] for m in MUTANTS})
        if unknown:
            raise SystemExit(f"unknown mutants {unknown}; --list shows them")
        mutants = [m for m in MUTANTS if m[0] in wanted]
    check_snippets(mutants)
    if args.list:
        for name, path, _, _, tests in mutants:
            print(f"{name:40s} {path}  ->  {' '.join(tests)}")
        return 0
    results = []
    for mutant in mutants:
        result = run_mutant(mutant, args.timeout)
        results.append(result)
        print(f"{result['name']}: {result['status']} ({result['seconds']:.0f} s)", flush=True)
        for failure in result["failures"]:
            print(f"    {failure}", flush=True)
        if args.verbose or result["status"].startswith(("error", "timeout")):
            print(result["tail"], flush=True)
    print("\n| mutant | file | result | failing tests |\n|---|---|---|---|")
    for (name, path, *_), result in zip(mutants, results):
        failing = "; ".join(f.split(": ")[0].split("::")[-1] for f in result["failures"]) or "-"
        print(f"| {name} | {path} | {result['status']} | {failing} |")
    caught = sum(r["status"] == "caught" for r in results)
    print(f"\n{caught} of {len(results)} mutants caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
