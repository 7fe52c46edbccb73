"""openpi's normalisation of state and actions: per-feature stats and the z-score / quantile maps both ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Stats:
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    @property
    def width(self) -> int:
        """How many dims the stats cover."""
        v = next((x for x in (self.mean, self.q01, self.std, self.q99) if x is not None), None)
        return 0 if v is None else len(v)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stats":
        def arr(k):
            return None if d.get(k) is None else np.asarray(d[k], dtype=np.float32).reshape(-1)

        return cls(arr("mean"), arr("std"), arr("q01"), arr("q99"))


MODES = ("MEAN_STD", "QUANTILES", "IDENTITY")


@dataclass
class Normalizer:
    """Per feature: MEAN_STD `(x - mean) / (std + eps)` (pi0's default), QUANTILES
    `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1` (pi0.5's default) or IDENTITY. Dims beyond the stats pass
    through unchanged."""

    state: Stats | None
    actions: Stats | None
    state_mode: str = "MEAN_STD"
    action_mode: str = "MEAN_STD"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for m in (self.state_mode, self.action_mode):
            if m not in MODES:
                raise ValueError(f"unknown normalisation mode {m!r}: choose one of {MODES}")

    def _apply(self, x: np.ndarray, st: Stats | None, mode: str, inverse: bool, what: str) -> np.ndarray:
        if st is None or mode == "IDENTITY":
            return x
        x = np.asarray(x, dtype=np.float32).copy()
        if mode == "QUANTILES":
            if st.q01 is None or st.q99 is None:
                raise ValueError(f"quantile normalisation needs q01/q99 stats for {what}; the stats file has none")
            lo, hi = st.q01, st.q99
            n = min(len(lo), x.shape[-1])
            span = hi[:n] - lo[:n] + 1e-6
            if inverse:
                x[..., :n] = (x[..., :n] + 1.0) / 2.0 * span + lo[:n]
            else:
                x[..., :n] = (x[..., :n] - lo[:n]) / span * 2.0 - 1.0
        else:
            if st.mean is None or st.std is None:
                raise ValueError(f"z-score normalisation needs mean/std stats for {what}")
            n = min(len(st.mean), x.shape[-1])
            if inverse:
                x[..., :n] = x[..., :n] * (st.std[:n] + self.eps) + st.mean[:n]
            else:
                x[..., :n] = (x[..., :n] - st.mean[:n]) / (st.std[:n] + self.eps)
        return x

    def state_in(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, self.state, self.state_mode, False, "state")

    def actions_out(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, self.actions, self.action_mode, True, "actions")

    def actions_in(self, x: np.ndarray) -> np.ndarray:
        """Robot actions -> model space (what training targets)."""
        return self._apply(x, self.actions, self.action_mode, False, "actions")
