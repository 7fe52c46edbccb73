"""`pi0 demo --rtc`: a robot loop on a simulated clock, fed by a slow policy, with and without real-time
chunking. The policy's real inference time is measured once and charged to the simulated clock, and the
control rate is set so that one inference lasts `delay_ticks` ticks; each chunk is requested when half a
chunk is left. Reports, at each chunk switch, the distance between the new chunk's first executed action
and what the old chunk had planned for that tick (the gap), the step between consecutive executed actions
there (the boundary jump) against the steps inside chunks, and plots both streams."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi0.model.rtc import RTC
from pi0.serving.stream import ActionStream, SimulatedClock, SimulatedExecutor


class ModelAsPolicy:
    """A model behind the `infer(obs) -> {"actions", "model_actions"}` interface, on a fixed synthetic
    observation, with fresh seeded noise per request (what a robot gets from a server)."""

    def __init__(self, model, obs, seed: int = 0):
        self.model, self.obs = model, obs
        self.generator = torch.Generator().manual_seed(seed)

    def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        cfg = self.model.config
        noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=self.generator)
        rtc = None
        if "rtc" in request:
            r = request["rtc"]
            rtc = RTC(torch.from_numpy(r["prev_actions"])[None], r["inference_delay"],
                      r.get("execution_horizon", 10))
        a = self.model.sample_actions(self.obs, noise=noise, rtc=rtc)[0].numpy()
        return {"actions": a, "model_actions": a}


PLAN_TICKS = 12  # how much of the old chunk's plan the plot shows after each switch


def run(model, obs, out: Path, ticks: int = 300, delay_ticks: int = 8, seed: int = 0) -> dict[str, float]:
    cfg = model.config
    policy = ModelAsPolicy(model, obs, seed)
    t = time.perf_counter()
    policy.infer({})
    latency = time.perf_counter() - t
    hz = delay_ticks / latency
    refill = cfg.action_horizon // 2
    streams = {}
    for rtc in (False, True):
        policy.generator.manual_seed(seed)
        clock = SimulatedClock()
        stream = ActionStream(policy, hz, rtc=rtc, refill_at=refill, execution_horizon=refill,
                              executor=SimulatedExecutor(clock, latency), clock=clock,
                              on_empty="wait")
        actions, switches, gaps, plans = [], [], [], []
        for _ in range(ticks):
            n = stream.chunks
            plan = [a for a, _ in list(stream.queue)[:PLAN_TICKS]]
            actions.append(stream.next_action({}))
            if stream.chunks != n and plan:
                switches.append(len(actions) - 1)
                plans.append(np.stack(plan))
                gaps.append(float(np.linalg.norm(actions[-1] - plan[0])))
            clock.t += 1.0 / hz
        streams[rtc] = (np.stack(actions), switches, plans)
        key = "rtc" if rtc else "plain"
        steps = np.linalg.norm(np.diff(streams[rtc][0], axis=0), axis=1)
        at = [i - 1 for i in switches]
        report_part = {f"{key}_gap_to_old_plan": float(np.mean(gaps)) if gaps else float("nan"),
                       f"{key}_boundary_jump": float(np.mean(steps[at])) if at else float("nan"),
                       f"{key}_step_inside_chunks": float(np.mean(np.delete(steps, at))),
                       f"{key}_starved_ticks": stream.starved}
        streams[key] = report_part
    report = {"latency_s": latency, "control_hz": hz, "refill_at": refill, **streams.pop("plain"), **streams.pop("rtc")}
    _plot(streams, hz, out, f"{cfg.kind}: {latency * 1000:.0f} ms per chunk, robot at {hz:.1f} Hz")
    return report


def _plot(streams, hz: float, out: Path, title: str) -> None:
    """Action dim 0 as executed (solid) and, after each switch, what the old chunk had planned (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True, sharey=True)
    for ax, rtc in zip(axes, (False, True)):
        acts, switches, plans = streams[rtc]
        last = min(len(acts), switches[min(5, len(switches) - 1)] + PLAN_TICKS) if switches else len(acts)
        ax.plot(np.arange(last) / hz, acts[:last, 0], lw=1.3, label="executed (dim 0)")
        for k, (i, plan) in enumerate(zip(switches, plans)):
            if i >= last:
                break
            ax.axvline(i / hz, color="grey", lw=0.6, ls="--")
            ax.plot((i + np.arange(len(plan))) / hz, plan[:, 0], "k:", lw=1.3,
                    label="the old chunk's plan after a switch" if k == 0 else None)
        ax.set_title(("with" if rtc else "without") + " real-time chunking (dashed: a new chunk takes over)", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("robot time (s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
