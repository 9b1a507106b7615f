"""The README is a user's guide that works: its examples run (or at least call what exists, with
arguments those functions accept), its commands name files that exist, its links resolve, and it
stays short (research history lives in docs/)."""

import ast
import importlib
import importlib.util
import inspect
import pathlib
import re

import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
README = ROOT / "README.md"
PACKAGE = ROOT / "refusal_jax"
MAX_LINES = 200


def _code_block(text, marker):
    match = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"the README lost its example marked <!-- {marker} -->"
    return match.group(1)


def test_readme_example_runs_and_does_what_it_says():
    code = _code_block(README.read_text(), "readme-example")
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    r_hat, V, inlp = namespace["r_hat"], namespace["V"], namespace["inlp"]
    k = int(inlp.n_directions)
    assert k >= 1
    np.testing.assert_allclose(V[:k] @ V[:k].T, np.eye(k), atol=1e-5)
    assert np.all(np.asarray(V[k:]) == 0)
    plain = namespace["my_forward"](namespace["weights"], namespace["harmful"])
    for name in ("ablated", "projected", "flipped", "erased"):
        assert not np.allclose(namespace[name], plain), name
    # The planted harmful offset lies along the first axis: DiM and INLP both find it.
    assert abs(float(r_hat[0])) > 0.9
    assert abs(float(jnp.dot(inlp.first_direction, r_hat))) > 0.8


def test_model_example_calls_what_exists_with_arguments_it_accepts():
    """The model example needs the default model's weights and minutes of CPU to run, so it is
    checked statically: its imports resolve, and every call of an imported function or module
    attribute binds its positional count and keyword names to the callee's signature."""
    code = _code_block(README.read_text(), "readme-example-imports")
    tree = ast.parse(code)
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule not imported by its package
                    importlib.import_module(f"{node.module}.{alias.name}")
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in names:
            target, label = names[func.id], func.id
        elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
              and func.value.id in names and inspect.ismodule(names[func.value.id])):
            module = names[func.value.id]
            assert hasattr(module, func.attr), f"{module.__name__} has no {func.attr}"
            target, label = getattr(module, func.attr), f"{func.value.id}.{func.attr}"
        else:
            continue
        if not callable(target) or inspect.isclass(target):
            continue
        keywords = {kw.arg: None for kw in node.keywords if kw.arg is not None}
        try:
            inspect.signature(target).bind(*[None] * len(node.args), **keywords)
        except TypeError as error:
            raise AssertionError(f"README calls {label} with arguments it does not accept: "
                                 f"{error}") from error
        checked += 1
    assert checked >= 4  # load_model, directional_ablation, generate, activation_addition, ...


def test_the_main_job_and_the_results_section_name_files_that_exist():
    text = README.read_text()
    command = re.search(r"bash scripts/setup.sh && (python -m (\S+) .*)", text)
    assert command, "the Quick start lost its main-job command"
    assert importlib.util.find_spec(command.group(2)) is not None
    config = re.search(r"--config=(\S+)", command.group(1)).group(1)
    assert (ROOT / config).is_file()
    # The report's README writer replaces the text between these markers; find the markers it
    # uses wherever the package keeps that writer.
    markers = {}
    for path in PACKAGE.rglob("*.py"):
        for name, value in re.findall(r'^(README_START|README_END) = "([^"]+)"', path.read_text(),
                                      re.M):
            markers[name] = value
    assert set(markers) == {"README_START", "README_END"}, "the README writer's markers moved"
    start, end = text.index(markers["README_START"]), text.index(markers["README_END"])
    assert start < end
    section = text[start:end]
    assert "| `baseline` |" in section, "the default run's results table is missing"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section):
        assert (ROOT / image).is_file(), image


def test_the_ci_runs_the_readmes_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci_lines if line.startswith("bash scripts/setup.sh --test"))
    assert command in README.read_text().splitlines()


def test_links_resolve_and_the_readme_stays_a_guide():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target
    for doc in ("docs/method.md", "docs/organism.md", "docs/benchmarks.md", "WORKSPACE.md"):
        assert f"]({doc})" in text, f"the README does not point to {doc}"
    assert len(text.splitlines()) <= MAX_LINES, "keep the README a guide; history goes to docs/"
    # Research history (the organism's training runs, dated benchmark notes) lives in docs/.
    assert "AUROC" not in text
