"""Where interventions move activations: 2-D views, the centroid axis and subspace angles
(docs/method.md section 6, "Geometry"; the second finding of Rocchetti & Ferrara).

Conventions (fixed here once):
- Activations are [N, D] arrays of one (EOI position, layer): the source layer of the
  intervention, before (baseline) and after it. They are converted to float64 numpy.
- The centroid axis runs from the baseline harmful centroid `mu_h` (position 0) to the baseline
  harmless centroid `mu_b` (position 1). A point's position is the coordinate of its orthogonal
  projection onto that line: `(x - mu_h) . (mu_b - mu_h) / ||mu_b - mu_h||^2`. Positions are not
  clipped: < 0 lies beyond the harmful centroid, > 1 beyond the harmless one.
- A `Plane` is an origin [D] and two orthonormal rows [2, D]; points map to `(x - origin) @
  basis.T`. Two planes are offered: the top two principal components of the pooled baseline
  activations (origin: their mean), and the plane of the DiM direction and the first INLP
  direction, orthonormalised (Gram-Schmidt, DiM first; origin: the midpoint of the centroids).
  Signs are fixed so that the harmless centroid lies at a larger first coordinate than the
  harmful one.
- Plots are drawn on `matplotlib.figure.Figure` objects (rendered by the Agg canvas; no pyplot
  global state, so plotting is safe in any process and thread).
- Principal angles between subspaces are computed as scipy.linalg.subspace_angles does (arcsin
  of the residual's singular values for small angles, arccos otherwise), in ascending order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# Smallest norm (relative to the inputs) of a direction that is treated as non-zero.
_RELATIVE_TOLERANCE = 1e-8

# name -> (intervened harmful [N, D], intervened harmless [M, D] or None)
Intervened = Mapping[str, tuple[np.ndarray, np.ndarray | None]]


def _matrix(name: str, value, width: int | None = None) -> np.ndarray:
    array = np.asarray(value, np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {array.shape}")
    if width is not None and array.shape[1] != width:
        raise ValueError(f"{name} has width {array.shape[1]}, expected {width}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _vector(name: str, value, width: int | None = None) -> np.ndarray:
    array = np.asarray(value, np.float64)
    if array.ndim != 1 or (width is not None and array.shape[0] != width):
        raise ValueError(f"{name} must be a [D] vector{'' if width is None else f' (D={width})'}, "
                         f"got shape {array.shape}")
    if not np.all(np.isfinite(array)) or not np.linalg.norm(array) > 0:
        raise ValueError(f"{name} must be finite and non-zero")
    return array


def centroid_axis_position(points, harmful_centroid, harmless_centroid) -> np.ndarray:
    """Position [N] of each point along the harmful (0) to harmless (1) centroid axis."""
    harmful_centroid = _vector("harmful_centroid", harmful_centroid)
    width = harmful_centroid.shape[0]
    harmless_centroid = _vector("harmless_centroid", harmless_centroid, width)
    points = _matrix("points", points, width)
    axis = harmless_centroid - harmful_centroid
    squared = float(axis @ axis)
    scale = max(np.linalg.norm(harmful_centroid), np.linalg.norm(harmless_centroid))
    if not squared > (_RELATIVE_TOLERANCE * scale) ** 2:
        raise ValueError("the harmful and harmless centroids coincide; the centroid axis is "
                         "undefined")
    return (points - harmful_centroid) @ axis / squared


def cosine_similarity(a, b) -> float:
    """Cosine of the angle between two [D] vectors."""
    a = _vector("a", a)
    b = _vector("b", b, a.shape[0])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _orthonormal_columns(name: str, rows: np.ndarray) -> np.ndarray:
    """Orthonormal basis [D, r] of the span of the rows; zero rows (unused directions) dropped."""
    norms = np.linalg.norm(rows, axis=1)
    rows = rows[norms > _RELATIVE_TOLERANCE * max(norms.max(initial=0.0), 1e-300)]
    if rows.shape[0] == 0:
        raise ValueError(f"{name} has no non-zero row")
    u, s, _ = np.linalg.svd(rows.T, full_matrices=False)
    rank = int(np.sum(s > s[0] * max(rows.shape) * np.finfo(np.float64).eps))
    return u[:, :rank]


def principal_angles(a, b) -> np.ndarray:
    """Principal angles (radians, ascending) between span(a) and span(b).

    a, b: [D] vectors or [k, D] row bases (need not be orthonormal; zero rows are ignored).
    Returns min(rank a, rank b) angles.
    """
    a = np.atleast_2d(np.asarray(a, np.float64))
    b = np.atleast_2d(np.asarray(b, np.float64))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be [D] or [k, D] with one width, got {a.shape} and "
                         f"{b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("a and b must be finite")
    qa, qb = _orthonormal_columns("a", a), _orthonormal_columns("b", b)
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa
    cosines = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1.0, 1.0)  # descending
    residual = qb - qa @ (qa.T @ qb)
    sines = np.clip(np.linalg.svd(residual, compute_uv=False), -1.0, 1.0)[::-1]  # ascending
    angles = np.where(cosines**2 >= 0.5, np.arcsin(sines), np.arccos(cosines))
    return np.sort(angles)


def principal_angles_deg(a, b) -> list[float]:
    """`principal_angles` in degrees, as a list (for results.json)."""
    return [float(angle) for angle in np.degrees(principal_angles(a, b))]


@dataclasses.dataclass(frozen=True)
class Plane:
    """A 2-D view: `(x - origin) @ basis.T`, basis [2, D] with orthonormal rows."""

    origin: np.ndarray
    basis: np.ndarray
    axis_labels: tuple[str, str]

    def project(self, points) -> np.ndarray:
        return (_matrix("points", points, self.origin.shape[0]) - self.origin) @ self.basis.T


def _orient(basis: np.ndarray, harmful_centroid, harmless_centroid) -> np.ndarray:
    """Flip rows so the harmless centroid has the larger coordinate on each (ties: unchanged)."""
    signs = np.where((harmless_centroid - harmful_centroid) @ basis.T < 0, -1.0, 1.0)
    return basis * signs[:, None]


def pca_plane(harmful, harmless) -> Plane:
    """The top two principal components of the pooled baseline activations."""
    harmful = _matrix("harmful", harmful)
    harmless = _matrix("harmless", harmless, harmful.shape[1])
    pooled = np.concatenate([harmful, harmless])
    if pooled.shape[0] < 3 or pooled.shape[1] < 2:
        raise ValueError(f"PCA needs at least 3 points of width >= 2, got {pooled.shape}")
    mean = pooled.mean(axis=0)
    _, _, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    basis = _orient(vt[:2], harmful.mean(axis=0), harmless.mean(axis=0))
    return Plane(origin=mean, basis=basis, axis_labels=("PC 1", "PC 2"))


def dim_inlp_plane(dim_direction, inlp_direction, harmful, harmless) -> Plane:
    """The plane of the DiM direction and the first INLP direction (Gram-Schmidt, DiM first),
    centred at the midpoint of the baseline centroids."""
    dim_direction = _vector("dim_direction", dim_direction)
    width = dim_direction.shape[0]
    inlp_direction = _vector("inlp_direction", inlp_direction, width)
    harmful = _matrix("harmful", harmful, width)
    harmless = _matrix("harmless", harmless, width)
    first = dim_direction / np.linalg.norm(dim_direction)
    unit_inlp = inlp_direction / np.linalg.norm(inlp_direction)
    second = unit_inlp - (unit_inlp @ first) * first
    if np.linalg.norm(second) < 1e-6:
        raise ValueError("the DiM direction and the first INLP direction are parallel, so they "
                         "span no plane; use the PCA view")
    basis = np.stack([first, second / np.linalg.norm(second)])
    harmful_centroid, harmless_centroid = harmful.mean(axis=0), harmless.mean(axis=0)
    basis = _orient(basis, harmful_centroid, harmless_centroid)
    return Plane(origin=(harmful_centroid + harmless_centroid) / 2, basis=basis,
                 axis_labels=("DiM direction", "first INLP direction (orthogonalised)"))


def plot_view(path: str | os.PathLike, plane: Plane, harmful, harmless, intervened: Intervened,
              *, title: str) -> Path:
    """PNG with one panel per intervention: the baseline clouds (faint) and the intervened
    points (solid), centroids as stars and the centroid axis as a dashed line; each panel's
    title gives the mean centroid-axis position of its intervened harmful points."""
    path = Path(path)
    if not intervened:
        raise ValueError("intervened is empty; pass at least one intervention to plot")
    harmful_2d, harmless_2d = plane.project(harmful), plane.project(harmless)
    centroids = np.stack([harmful_2d.mean(axis=0), harmless_2d.mean(axis=0)])
    full_centroids = (np.mean(harmful, axis=0), np.mean(harmless, axis=0))
    columns = min(3, len(intervened))
    rows = -(-len(intervened) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, (name, (moved_harmful, moved_harmless)) in zip(axes.flat, intervened.items()):
        axis.scatter(*harmful_2d.T, s=10, c="tab:red", alpha=0.2, label="harmful (baseline)")
        axis.scatter(*harmless_2d.T, s=10, c="tab:blue", alpha=0.2, label="harmless (baseline)")
        axis.scatter(*plane.project(moved_harmful).T, s=14, c="tab:red", marker="x",
                     label="harmful (intervened)")
        if moved_harmless is not None:
            axis.scatter(*plane.project(moved_harmless).T, s=14, c="tab:blue", marker="x",
                         label="harmless (intervened)")
        axis.plot(*centroids.T, "k--", linewidth=0.8)
        axis.scatter(*centroids.T, s=120, c=["tab:red", "tab:blue"], marker="*",
                     edgecolors="k", zorder=3)
        moved_position = centroid_axis_position(moved_harmful, *full_centroids).mean()
        axis.set_title(f"{name}: harmful at {moved_position:.2f}", fontsize=10)
        axis.set_xlabel(plane.axis_labels[0], fontsize=8)
        axis.set_ylabel(plane.axis_labels[1], fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(intervened):]:
        axis.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


@dataclasses.dataclass
class GeometrySummary:
    """What results.json keeps of one source (EOI position, layer): the DiM / INLP cosine and
    principal angles in degrees (None and [] where INLP kept no direction) and the plot paths,
    relative to the work directory."""

    position: int
    layer: int
    cosine_dim_inlp: float | None
    principal_angles_deg: list[float]
    plots: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class GeometryResult:
    """`summary` for results.json; `positions[name]` = (mean position of the intervened harmful
    points, of the intervened harmless points or None) on the centroid axis."""

    summary: GeometrySummary
    positions: dict[str, tuple[float, float | None]]


def analyse_geometry(harmful, harmless, intervened: Intervened, *, dim_direction, inlp_basis,
                     position: int, layer: int, out_dir: str | os.PathLike,
                     workdir: str | os.PathLike | None = None) -> GeometryResult:
    """Centroid-axis positions, DiM/INLP angles and the two 2-D plots of one source layer.

    Args:
      harmful, harmless: baseline activations [N, D], [M, D] at (position, layer).
      intervened: name -> (harmful [N, D], harmless [M, D] or None) after each intervention.
      dim_direction: [D] DiM direction; inlp_basis: [k, D] INLP directions in the order found
        (row 0 is the first; zero rows are unused and ignored). When every row is zero (INLP
        kept no direction at this (position, layer)), the DiM/INLP cosine and angles are None
        and [], and only the PCA view is drawn.
      out_dir: where `geometry_pca.png` and `geometry_dim_inlp.png` are written.
      workdir: plot paths in the summary are relative to it (default: `out_dir`).
    """
    harmful = _matrix("harmful", harmful)
    width = harmful.shape[1]
    harmless = _matrix("harmless", harmless, width)
    inlp_basis = np.atleast_2d(np.asarray(inlp_basis, np.float64))
    if inlp_basis.ndim != 2 or inlp_basis.shape[1] != width:
        raise ValueError(f"inlp_basis must be [k, {width}], got {inlp_basis.shape}")
    dim_direction = _vector("dim_direction", dim_direction, width)
    checked = {}
    for name, (moved_harmful, moved_harmless) in intervened.items():
        checked[name] = (_matrix(f"intervened[{name!r}] harmful", moved_harmful, width),
                         None if moved_harmless is None else
                         _matrix(f"intervened[{name!r}] harmless", moved_harmless, width))

    harmful_centroid, harmless_centroid = harmful.mean(axis=0), harmless.mean(axis=0)
    positions = {}
    for name, (moved_harmful, moved_harmless) in checked.items():
        positions[name] = (
            float(centroid_axis_position(moved_harmful, harmful_centroid,
                                         harmless_centroid).mean()),
            None if moved_harmless is None else float(centroid_axis_position(
                moved_harmless, harmful_centroid, harmless_centroid).mean()))

    out_dir = Path(out_dir)
    where = f"EOI position {position}, layer {layer}"
    plots = [plot_view(out_dir / "geometry_pca.png", pca_plane(harmful, harmless), harmful,
                       harmless, checked, title=f"PCA of the baseline activations ({where})")]
    found = np.any(inlp_basis != 0.0, axis=1)
    cosine, angles = None, []
    if found.any():
        first = inlp_basis[found][0]
        cosine = cosine_similarity(dim_direction, first)
        angles = principal_angles_deg(dim_direction, inlp_basis)
        try:
            plane = dim_inlp_plane(dim_direction, first, harmful, harmless)
        except ValueError:
            plane = None  # parallel directions: only the PCA view exists
        if plane is not None:
            plots.append(plot_view(out_dir / "geometry_dim_inlp.png", plane, harmful, harmless,
                                   checked, title=f"DiM / first INLP direction plane ({where})"))
    base = Path(workdir) if workdir is not None else out_dir
    summary = GeometrySummary(
        position=int(position), layer=int(layer), cosine_dim_inlp=cosine,
        principal_angles_deg=angles, plots=[os.path.relpath(plot, base) for plot in plots])
    return GeometryResult(summary=summary, positions=positions)
