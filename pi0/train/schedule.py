"""Training schedules and randomness: openpi's warmup-cosine learning rate, and the seeded generators that make a
run's samples and data order the same in any process, worker or resumed run."""

from __future__ import annotations

import math

import numpy as np


def learning_rate(step: int, peak: float, warmup: int, total: int, final: float) -> float:
    """openpi's warmup-cosine (optax): linear from peak / (warmup + 1) to peak over `warmup` steps, then cosine
    to `final` at `total`. `step` counts from 0."""
    if step < warmup:
        init = peak / (warmup + 1)
        return init + (peak - init) * step / warmup
    span = max(1, total - warmup)
    frac = min(step - warmup, span) / span
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * frac))


def sample_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """The generator of one sample's random draws: the same wherever (process, worker) it is made."""
    return np.random.default_rng([seed, step, position])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 1 << 20, epoch]).permutation(n)


def batch_positions(step: int, batch: int, rank: int, world: int) -> range:
    """This process's slice of the global batch of `step`: positions [step * batch + rank * batch / world, ...)."""
    per = batch // world
    start = step * batch + rank * per
    return range(start, start + per)
