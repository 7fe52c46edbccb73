"""Simulated robots for closed-loop evaluation and for demonstrations to train on (`pip install 'pi0[sim]'`)."""
