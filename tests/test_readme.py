"""The README's example of using the steering functions outside our runtime runs as written."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_example_runs_and_does_what_it_says():
    text = README.read_text()
    code = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    r_hat, V, inlp = namespace["r_hat"], namespace["V"], namespace["inlp"]
    k = int(inlp.n_directions)
    assert k >= 1
    np.testing.assert_allclose(V[:k] @ V[:k].T, np.eye(k), atol=1e-5)
    assert np.all(np.asarray(V[k:]) == 0)
    plain = namespace["my_forward"](namespace["weights"], namespace["harmful"])
    for name in ("ablated", "projected", "flipped"):
        assert not np.allclose(namespace[name], plain), name
    # The planted harmful offset lies along the first axis: DiM and INLP both find it.
    assert abs(float(r_hat[0])) > 0.9
    assert abs(float(jnp.dot(inlp.first_direction, r_hat))) > 0.8


def test_the_main_job_and_the_results_section_name_files_that_exist():
    import importlib.util

    from refusal_jax.results import schema as report

    text = README.read_text()
    command = re.search(r"bash scripts/setup.sh && (python -m (\S+) .*)", text)
    assert command, "the Quick start lost its main-job command"
    assert importlib.util.find_spec(command.group(2)) is not None
    config = re.search(r"--config=(\S+)", command.group(1)).group(1)
    assert (README.parent / config).is_file()
    start, end = text.index(report.README_START), text.index(report.README_END)
    assert start < end
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text[start:end]):
        assert (README.parent / image).is_file(), image
