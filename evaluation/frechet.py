"""Fréchet distance between two sets of feature vectors, the statistic behind FID (Inception features) and FD-CLIP
(CLIP image features): ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of the sets' means and covariances,
computed by torch-fidelity (its formula is TTUR's, the reference implementation of FID)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_fid import KEY_METRIC_FID

from cm3.core.files import atomic_write


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean [D] and covariance [D, D] (float64) of ``count`` feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def save(self, path: Path) -> None:
        atomic_write(path, lambda staged: np.savez(staged, mu=self.mu, sigma=self.sigma, count=self.count))

    @classmethod
    def load(cls, path: Path) -> FeatureStatistics:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mu"], data["sigma"], int(data["count"]))


def statistics(features: torch.Tensor | np.ndarray) -> FeatureStatistics:
    """Mean and covariance of features [N, D], N >= 2 (a covariance needs two vectors)."""
    features = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 feature vectors [N, D], got {list(features.shape)}")
    stats = fid_features_to_statistics(features)
    return FeatureStatistics(stats["mu"], stats["sigma"], features.shape[0])


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape[0]} and {b.mu.shape[0]}")
    stat = lambda s: {"mu": s.mu, "sigma": s.sigma}  # noqa: E731
    return fid_statistics_to_metric(stat(a), stat(b), verbose=False)[KEY_METRIC_FID]
