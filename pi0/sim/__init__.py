"""Simulated robots for closed-loop evaluation and for demonstrations to train on (`pip install 'pi0[sim]'`).

Importing this package sets nothing up: a simulator's module configures its renderer when it is imported."""


class SimError(RuntimeError):
    """The simulator cannot run here (missing package, no OpenGL): the message says how to fix it."""
