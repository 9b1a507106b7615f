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
