"""Toy binary-classification tasks generated in code: deterministic by seed, no downloads.

Each task draws 2-D points (moons, circles, xor, spirals) with a label, then lifts them to
``n_features`` dimensions: the extra dimensions are filled with Gaussian noise and the
whole vector is turned by a random rotation (``embed_seed``), so every input feature
carries a mix of signal and noise and the model has real width to adapt.

A *downstream task* reuses the same feature space (same ``embed_seed``) but moves the
2-D problem, by a rotation, a shift, or a relabelling of one half-plane, so that a model
pretrained on the original task is poor on it and fine-tuning has something to learn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

DATASETS = ("moons", "circles", "xor", "spirals")


def _moons(rng, n):
    a = rng.uniform(0, math.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(a), 1 - np.cos(a))
    y = np.where(upper, np.sin(a), 0.5 - np.sin(a))
    return np.stack([x - 0.5, y - 0.25], axis=1), (~upper).astype(np.int64)


def _circles(rng, n):
    outer = rng.random(n) < 0.5
    a = rng.uniform(0, 2 * math.pi, n)
    radius = np.where(outer, 1.0, 0.5)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1), (~outer).astype(np.int64)


def _xor(rng, n):
    centres = np.array([[-1, -1], [1, 1], [-1, 1], [1, -1]], dtype=float) * 0.6
    which = rng.integers(0, 4, n)
    return centres[which] + 0.25 * rng.standard_normal((n, 2)), (which >= 2).astype(np.int64)


def _spirals(rng, n):
    t = np.sqrt(rng.random(n)) * 3 * math.pi
    arm = rng.integers(0, 2, n)
    angle = t + arm * math.pi
    return np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) / (3 * math.pi), arm.astype(np.int64)


_MAKERS = {"moons": _moons, "circles": _circles, "xor": _xor, "spirals": _spirals}


@dataclass
class Dataset:
    """Train/val/test splits of one task, plus the spec that regenerates it."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    spec: "TaskSpec"
    points: dict = field(default_factory=dict, repr=False)     # split -> the 2-D points, for plots

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]


@dataclass(frozen=True)
class TaskSpec:
    """Everything that determines a task; ``make_task(spec)`` always returns the same data."""

    name: str = "moons"
    n_samples: int = 3000
    n_features: int = 2
    noise: float = 0.1
    seed: int = 0
    embed_seed: int = 1234
    rotation: float = 0.0          # radians, applied to the 2-D points
    shift: tuple = (0.0, 0.0)      # added to the 2-D points
    relabel: bool = False          # flip the label of points with x > 0
    splits: tuple = (0.6, 0.2, 0.2)
    dtype: str = "float32"


def make_task(spec: TaskSpec | None = None, **overrides) -> Dataset:
    """Generate the task ``spec`` (fields may be overridden by keyword)."""
    spec = replace(spec or TaskSpec(), **overrides)
    if spec.name not in _MAKERS:
        raise ValueError(f"unknown dataset {spec.name!r}; choose one of {DATASETS}")
    if spec.n_features < 2:
        raise ValueError(f"n_features must be >= 2 (the 2-D problem plus extra dimensions), got {spec.n_features}")
    if spec.n_samples < 10:
        raise ValueError(f"n_samples must be >= 10, got {spec.n_samples}")
    if not math.isclose(sum(spec.splits), 1.0) or len(spec.splits) != 3 or min(spec.splits) <= 0:
        raise ValueError(f"splits must be three positive fractions summing to 1, got {spec.splits}")
    rng = np.random.default_rng(spec.seed)
    p, y = _MAKERS[spec.name](rng, spec.n_samples)
    p = p + spec.noise * rng.standard_normal(p.shape)
    c, s = math.cos(spec.rotation), math.sin(spec.rotation)
    p = p @ np.array([[c, s], [-s, c]]) + np.asarray(spec.shift, dtype=float)
    if spec.relabel:
        y = np.where(p[:, 0] > 0, 1 - y, y)
    X = embed(p, spec.n_features, spec.embed_seed, rng).astype(spec.dtype)
    order = rng.permutation(spec.n_samples)
    n_train = int(spec.splits[0] * spec.n_samples)
    n_val = int(spec.splits[1] * spec.n_samples)
    parts = np.split(order, [n_train, n_train + n_val])
    names = ("train", "val", "test")
    arrays = {f"{a}_{n}": arr[idx] for n, idx in zip(names, parts) for a, arr in (("X", X), ("y", y))}
    return Dataset(**arrays, spec=spec, points={n: p[idx] for n, idx in zip(names, parts)})


def embed(points, n_features: int, embed_seed: int, rng) -> np.ndarray:
    """Lift (n, 2) points to (n, n_features): pad with N(0, 0.5²) noise, then rotate by a fixed Q."""
    n = points.shape[0]
    if n_features == 2:
        return points
    padded = np.concatenate([points, 0.5 * rng.standard_normal((n, n_features - 2))], axis=1)
    return padded @ _rotation(n_features, embed_seed)          # (n, F) @ (F, F)


def _rotation(n_features: int, embed_seed: int) -> np.ndarray:
    """The task family's fixed random rotation Q (F, F)."""
    Q, _ = np.linalg.qr(np.random.default_rng(embed_seed).standard_normal((n_features, n_features)))
    return Q


def lift(points, spec: TaskSpec) -> np.ndarray:
    """Noise-free lift of 2-D points into the task's feature space (for decision-boundary plots)."""
    points = np.asarray(points, dtype=float)
    if spec.n_features == 2:
        return points.astype(spec.dtype)
    padded = np.concatenate([points, np.zeros((points.shape[0], spec.n_features - 2))], axis=1)
    return (padded @ _rotation(spec.n_features, spec.embed_seed)).astype(spec.dtype)


def downstream_task(ds: Dataset | TaskSpec, kind: str = "rotate", amount: float | None = None,
                    seed: int | None = None) -> Dataset:
    """A related task in the same feature space: 'rotate' (radians, default π/2), 'shift'
    (along x, default 0.6) or 'relabel' (flip labels where x > 0)."""
    spec = ds.spec if isinstance(ds, Dataset) else ds
    seed = spec.seed + 1 if seed is None else seed
    if kind == "rotate":
        return make_task(spec, rotation=spec.rotation + (math.pi / 2 if amount is None else amount), seed=seed)
    if kind == "shift":
        a = 0.6 if amount is None else amount
        return make_task(spec, shift=(spec.shift[0] + a, spec.shift[1]), seed=seed)
    if kind == "relabel":
        return make_task(spec, relabel=not spec.relabel, seed=seed)
    raise ValueError(f"downstream kind must be 'rotate', 'shift' or 'relabel', got {kind!r}")
