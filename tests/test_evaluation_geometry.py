"""Geometry: centroid-axis positions on clusters where the answer holds by construction,
angles against numpy/scipy, the 2-D planes and the plots."""

import numpy as np
import pytest
import scipy.linalg

from refusal_jax.evaluation import geometry
from refusal_jax.interventions import project_out, reflect

D = 24


def clusters(seed=0, n=60, separation=4.0, noise=0.5):
    """Harmful / harmless clusters symmetric about an offset `c` orthogonal to the class axis u.

    The refusal information is the u-coordinate only (+s harmful, -s harmless), so projecting u
    out puts every point at the midpoint's u-coordinate (position 0.5) and reflecting u swaps
    the clusters (position 1)."""
    rng = np.random.default_rng(seed)
    u = np.zeros(D)
    u[3] = 1.0
    c = rng.normal(size=D) * 3
    c[3] = 0.0
    other = rng.normal(size=(2 * n, D)) * noise
    other[:, 3] = 0.0
    harmful = c + separation * u + other[:n] + np.outer(rng.normal(size=n) * noise, u)
    harmless = c - separation * u + other[n:] + np.outer(rng.normal(size=n) * noise, u)
    return harmful, harmless, u


def test_centroids_are_at_zero_and_one():
    harmful, harmless, _ = clusters()
    mu_h, mu_b = harmful.mean(0), harmless.mean(0)
    np.testing.assert_allclose(geometry.centroid_axis_position(np.stack([mu_h, mu_b]), mu_h, mu_b),
                               [0.0, 1.0], atol=1e-12)
    # the cluster means sit at the ends, and offsets orthogonal to the axis do not move a point
    position = geometry.centroid_axis_position
    assert position(harmful, mu_h, mu_b).mean() == pytest.approx(0, abs=1e-12)
    assert position(harmless, mu_h, mu_b).mean() == pytest.approx(1, abs=1e-12)
    axis = mu_b - mu_h
    sideways = np.linalg.svd(axis[None])[2][1]  # a unit vector orthogonal to the axis
    points = np.stack([mu_h + 5 * sideways, 0.25 * mu_h + 0.75 * mu_b - 2 * sideways,
                       mu_h - axis])
    np.testing.assert_allclose(geometry.centroid_axis_position(points, mu_h, mu_b),
                               [0.0, 0.75, -1.0], atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nullspace_lands_between_and_reflection_in_the_opposite_cluster(seed):
    harmful, harmless, _ = clusters(seed)
    # the directions estimated from the data, as the pipeline would use them
    r_hat = harmful.mean(0) - harmless.mean(0)
    r_hat /= np.linalg.norm(r_hat)
    basis = r_hat[None]
    mu_h, mu_b = harmful.mean(0), harmless.mean(0)
    projected = np.asarray(project_out(harmful, basis))
    reflected = np.asarray(reflect(harmful, basis, 2.0))
    nullspace_position = geometry.centroid_axis_position(projected, mu_h, mu_b).mean()
    reflection_position = geometry.centroid_axis_position(reflected, mu_h, mu_b).mean()
    # by construction the class information is the u-coordinate and the midpoint m of the
    # centroids is (nearly) orthogonal to u: projection lands between, reflection opposite
    assert nullspace_position == pytest.approx(0.5, abs=0.05)
    assert reflection_position == pytest.approx(1.0, abs=0.05)
    # exactly, with r_hat the unit DiM direction: 0.5 + (m . r_hat) / |mu_h - mu_b| for the
    # projection and 1 + 2 (m . r_hat) / |mu_h - mu_b| for the reflection
    offset = ((mu_h + mu_b) / 2) @ r_hat / np.linalg.norm(mu_h - mu_b)
    assert nullspace_position == pytest.approx(0.5 + offset, abs=1e-6)
    assert reflection_position == pytest.approx(1.0 + 2 * offset, abs=1e-6)
    # and the same for a larger (INLP-like) subspace that contains the centroid difference
    extra = np.random.default_rng(seed + 10).normal(size=D)
    extra -= (extra @ r_hat) * r_hat
    subspace = np.stack([r_hat, extra / np.linalg.norm(extra)])
    for moved, expected in ((project_out(harmful, subspace), 0.5 + offset),
                            (reflect(harmful, subspace, 2.0), 1.0 + 2 * offset)):
        assert geometry.centroid_axis_position(np.asarray(moved), mu_h, mu_b).mean() == \
            pytest.approx(expected, abs=1e-6)
    # untouched points stay in their own cluster
    assert geometry.centroid_axis_position(harmful, mu_h, mu_b).mean() == pytest.approx(0.0)


def test_cosine_and_principal_angles_against_numpy_and_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=D), rng.normal(size=D)
    assert geometry.cosine_similarity(a, b) == pytest.approx(
        np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
    basis = np.linalg.qr(rng.normal(size=(D, 5)))[0].T  # orthonormal rows
    for first, second in ((a, basis), (rng.normal(size=(3, 3)) @ basis[:3], basis),
                          (rng.normal(size=(4, D)), rng.normal(size=(2, D)))):
        expected = np.sort(scipy.linalg.subspace_angles(np.atleast_2d(first).T,
                                                        np.atleast_2d(second).T))
        np.testing.assert_allclose(geometry.principal_angles(first, second), expected,
                                   atol=1e-10)
    # a direction inside the subspace, a tiny tilt away (where arccos loses precision), and an
    # orthogonal one
    inside = basis.T @ rng.normal(size=5)
    random = rng.normal(size=D)
    orthogonal = random - basis.T @ (basis @ random)  # float64, unlike project_out
    tilt = 1e-7
    tilted = inside / np.linalg.norm(inside) + tilt * orthogonal / np.linalg.norm(orthogonal)
    assert geometry.principal_angles(inside, basis)[0] == pytest.approx(0.0, abs=1e-7)
    assert geometry.principal_angles(tilted, basis)[0] == pytest.approx(tilt, rel=1e-6)
    assert geometry.principal_angles_deg(np.asarray(orthogonal), basis) == pytest.approx([90.0])
    # zero rows are unused INLP slots and are ignored
    padded = np.concatenate([basis, np.zeros((3, D))])
    np.testing.assert_allclose(geometry.principal_angles(a, padded),
                               geometry.principal_angles(a, basis), atol=1e-12)


def test_planes_are_orthonormal_and_oriented():
    harmful, harmless, u = clusters()
    rng = np.random.default_rng(4)
    inlp = u + 0.3 * rng.normal(size=D)
    for plane in (geometry.pca_plane(harmful, harmless),
                  geometry.dim_inlp_plane(harmful.mean(0) - harmless.mean(0), inlp, harmful,
                                          harmless)):
        np.testing.assert_allclose(plane.basis @ plane.basis.T, np.eye(2), atol=1e-12)
        assert plane.project(harmless).mean(0)[0] > plane.project(harmful).mean(0)[0]
    plane = geometry.dim_inlp_plane(-u, inlp, harmful, harmless)
    # first axis is the DiM direction (flipped to point at the harmless side); the second lies
    # in span(DiM, INLP)
    np.testing.assert_allclose(plane.basis[0], -u * np.sign(plane.basis[0] @ -u), atol=1e-12)
    assert geometry.principal_angles(plane.basis, np.stack([u, inlp])) == pytest.approx(
        [0.0, 0.0], abs=1e-7)
    # PCA: the largest variance of these clusters is along u
    assert abs(geometry.pca_plane(harmful, harmless).basis[0] @ u) > 0.99


def test_analyse_geometry_writes_plots_and_summary(tmp_path):
    harmful, harmless, u = clusters(n=30)
    e7 = np.eye(D)[7]
    # orthonormal INLP rows spanning u and e7, the first tilted from u; the last row is unused
    inlp_basis = np.stack([u + 0.5 * e7, e7 - 0.5 * u, np.zeros(D)]) / np.sqrt(1.25)
    intervened = {
        "inlp_nullspace": (np.asarray(project_out(harmful, u[None])),
                           np.asarray(project_out(harmless, u[None]))),
        "inlp_reflection": (np.asarray(reflect(harmful, u[None], 2.0)), None),
        # the centroids are 8 apart along u: a shift of 12 goes half an axis past harmless
        "dim_actadd": (harmful - 12.0 * u, harmless + 12.0 * u),
    }
    workdir = tmp_path / "run"
    result = geometry.analyse_geometry(harmful, harmless, intervened, dim_direction=-u,
                                       inlp_basis=inlp_basis, position=-1, layer=5,
                                       out_dir=workdir / "plots", workdir=workdir)
    summary = result.summary
    assert summary.plots == ["plots/geometry_pca.png", "plots/geometry_dim_inlp.png"]
    for plot in summary.plots:
        data = (workdir / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert summary.cosine_dim_inlp == pytest.approx(-1 / np.sqrt(1.25))
    assert summary.principal_angles_deg == pytest.approx([0.0], abs=1e-5)
    assert (summary.position, summary.layer) == (-1, 5)
    # Exactly, with s = u . (mu_b - mu_h) / |mu_b - mu_h|^2 (about -1/8): the clusters' own
    # positions average 0 and 1, and each map moves a point's position by its shift along u
    # times s. Projecting u out shifts x by -(x . u) u, reflecting by -2 (x . u) u. Measured
    # error 5.6e-9 (the maps run in float32); tolerance 5e-8.
    mu_h, mu_b = harmful.mean(0), harmless.mean(0)
    s = (u @ (mu_b - mu_h)) / ((mu_b - mu_h) @ (mu_b - mu_h))
    exact = {"inlp_nullspace": (-(mu_h @ u) * s, 1 - (mu_b @ u) * s),
             "inlp_reflection": (-2 * (mu_h @ u) * s, None),
             "dim_actadd": (-12.0 * s, 1 + 12.0 * s)}
    harmful_position, harmless_position = result.positions["inlp_nullspace"]
    assert harmful_position == pytest.approx(0.5, abs=0.05)  # between the clusters
    assert harmless_position == pytest.approx(0.5, abs=0.05)
    assert result.positions["inlp_reflection"][1] is None
    for name, (harmful_exact, harmless_exact) in exact.items():
        assert result.positions[name][0] == pytest.approx(harmful_exact, abs=5e-8), name
        if harmless_exact is not None:
            assert result.positions[name][1] == pytest.approx(harmless_exact, abs=5e-8), name


def test_parallel_directions_give_only_the_pca_plot(tmp_path):
    harmful, harmless, u = clusters(n=10)
    result = geometry.analyse_geometry(harmful, harmless, {"x": (harmful, None)},
                                       dim_direction=u, inlp_basis=2 * u, position=-2, layer=1,
                                       out_dir=tmp_path)
    assert result.summary.plots == ["geometry_pca.png"]
    with pytest.raises(ValueError, match="parallel"):
        geometry.dim_inlp_plane(u, -3 * u, harmful, harmless)


def test_an_empty_inlp_basis_leaves_the_angles_out(tmp_path):
    harmful, harmless, u = clusters(n=10)
    result = geometry.analyse_geometry(harmful, harmless, {"x": (harmful, None)},
                                       dim_direction=u, inlp_basis=np.zeros((3, D)),
                                       position=-1, layer=2, out_dir=tmp_path)
    assert result.summary.cosine_dim_inlp is None
    assert result.summary.principal_angles_deg == []
    assert result.summary.plots == ["geometry_pca.png"]


def test_errors():
    harmful, harmless, u = clusters(n=5)
    with pytest.raises(ValueError, match="centroids coincide"):
        geometry.centroid_axis_position(harmful, harmful.mean(0), harmful.mean(0))
    with pytest.raises(ValueError, match="width 3, expected 24"):
        geometry.centroid_axis_position(np.zeros((2, 3)), harmful.mean(0), harmless.mean(0))
    nan = harmful.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        geometry.pca_plane(nan, harmless)
    with pytest.raises(ValueError, match="non-zero"):
        geometry.cosine_similarity(u, np.zeros(D))
    with pytest.raises(ValueError, match="one width"):
        geometry.principal_angles(u, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="no non-zero row"):
        geometry.principal_angles(u, np.zeros((2, D)))
    with pytest.raises(ValueError, match="intervened is empty"):
        geometry.plot_view("unused.png", geometry.pca_plane(harmful, harmless), harmful,
                           harmless, {}, title="")
    with pytest.raises(ValueError, match=r"inlp_basis must be \[k, 24\]"):
        geometry.analyse_geometry(harmful, harmless, {"x": (harmful, None)}, dim_direction=u,
                                  inlp_basis=np.ones((2, 4)), position=-1, layer=0,
                                  out_dir="unused")
