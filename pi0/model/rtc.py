"""Real-time chunking (Black et al. 2025) at sampling time, as LeRobot 0.6.1 computes it
(../shared/spec/rtc.md): while the robot still executes the previous chunk, the new one is guided to
continue its unexecuted actions. Both backends call `Guide.velocity` once per Euler step; it is a few
elementwise ops on [B, horizon, action_dim] (the model runs exactly as without RTC).

Parameters, in a robot engineer's words:
- prev_actions: the previous chunk's actions the robot has NOT executed yet when this request is sent,
  in model space (a reply's `model_actions` rows), [B, T_prev, D_prev] with T_prev <= horizon;
- inference_delay d: how many of those the robot will execute while this chunk is computed (latency x
  control rate, rounded up): the new chunk's first d actions copy them (weight 1);
- execution_horizon s: how far into the new chunk the old one still pulls (weights fade to 0 at s;
  clipped to T_prev);
- schedule: the fade from d to s: "linear" (default), "exp", "ones" (weight 1 up to s) or "zeros"
  (weight 1 for the first d only); max_guidance_weight: the cap on the guidance strength (10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULES = ("linear", "exp", "ones", "zeros")
# what an RTC request may leave out, unless a server sets other defaults (`RTCDefaults`)
EXECUTION_HORIZON, SCHEDULE, MAX_GUIDANCE_WEIGHT = 10, "linear", 10.0
JACOBIANS = ("identity", "exact")


@dataclass
class RTC:
    """Real-time chunking inputs for `sample_actions(obs, rtc=RTC(...))` (see the module docstring).
    jacobian: "identity" is LeRobot's (the correction equals the weighted error; no backward pass);
    "exact" is the paper's vector-Jacobian product through the action expert (reference backend only,
    one backward pass per step; not what LeRobot computes)."""

    prev_actions: Tensor
    inference_delay: int
    execution_horizon: int = EXECUTION_HORIZON
    schedule: str = SCHEDULE
    max_guidance_weight: float = MAX_GUIDANCE_WEIGHT
    jacobian: str = "identity"

    def validate(self, batch: int, horizon: int, action_dim: int) -> None:
        """Raise ValueError naming the field that is wrong and what it must be."""
        y = self.prev_actions
        if not isinstance(y, Tensor):
            raise ValueError(f"rtc prev_actions must be a tensor [B, T_prev, D_prev], got {type(y).__name__}")
        if y.ndim == 2 and batch == 1:
            y = self.prev_actions = y[None]
        if y.ndim != 3 or y.shape[0] != batch:
            raise ValueError(f"rtc prev_actions must be [{batch}, T_prev, D_prev] (one row per observation), "
                             f"got {list(y.shape)}")
        if not y.dtype.is_floating_point:
            raise ValueError(f"rtc prev_actions must be float, got {y.dtype}")
        if not 1 <= y.shape[1] <= horizon:
            raise ValueError(f"rtc prev_actions has {y.shape[1]} actions; it needs 1 to {horizon} (the horizon): "
                             "send the rows of the previous chunk that are not executed yet")
        if not 1 <= y.shape[2] <= action_dim:
            raise ValueError(f"rtc prev_actions has {y.shape[2]} dims per action; it needs 1 to {action_dim} "
                             "(model space: a reply's model_actions)")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("rtc prev_actions holds NaN or infinite values")
        if isinstance(self.inference_delay, bool) or not isinstance(self.inference_delay, int) or self.inference_delay < 0:
            raise ValueError(f"rtc inference_delay must be an int >= 0 (actions executed while this chunk is "
                             f"computed), got {self.inference_delay!r}")
        if isinstance(self.execution_horizon, bool) or not isinstance(self.execution_horizon, int) or self.execution_horizon < 1:
            raise ValueError(f"rtc execution_horizon must be an int >= 1, got {self.execution_horizon!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"rtc schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        beta = self.max_guidance_weight
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"rtc max_guidance_weight must be a finite number > 0, got {beta!r}")
        if self.jacobian not in JACOBIANS:
            raise ValueError(f"rtc jacobian must be one of {', '.join(JACOBIANS)}, got {self.jacobian!r}")


def prefix_weights(inference_delay: int, execution_horizon: int, horizon: int, schedule: str) -> Tensor:
    """w [horizon] fp32: 1 for the first d actions, a fade (schedule) to 0 at s, 0 after (s already clipped)."""
    start, end = min(inference_delay, execution_horizon), execution_horizon
    if schedule == "zeros":
        w = torch.zeros(horizon)
        w[:start] = 1.0
        return w
    if schedule == "ones":
        w = torch.ones(horizon)
        w[end:] = 0.0
        return w
    ramp = torch.linspace(1, 0, end - start + 2)[1:-1]  # interior of the fade, endpoints dropped
    if schedule == "exp":
        ramp = ramp * torch.expm1(ramp) / (math.e - 1)
    w = torch.cat([ramp, torch.zeros(horizon - end)])
    return torch.cat([torch.ones(start), w])[:horizon]


def guidance_weight(time: float, max_guidance_weight: float) -> Tensor:
    """g(tau = 1 - time) = min(beta, (1 - tau) / tau * ((1 - tau)^2 + tau^2) / (1 - tau)^2), in fp32;
    the first step (tau = 0) gives beta."""
    beta = torch.as_tensor(max_guidance_weight, dtype=torch.float32)
    tau = torch.as_tensor(1 - time, dtype=torch.float32)
    one_minus_sq = (1 - tau) ** 2
    inv_r2 = (one_minus_sq + tau**2) / one_minus_sq
    c = torch.nan_to_num((1 - tau) / tau, posinf=float(beta))
    return torch.minimum(torch.nan_to_num(c * inv_r2, posinf=float(beta)), beta)


class Guide:
    """One sampling call's guidance: per row, the zero-padded previous chunk, the prefix weights and the
    guidance cap. Rows without RTC get weight 0, so their velocity is unchanged."""

    def __init__(self, rows: list[RTC | None], horizon: int, action_dim: int, device: torch.device | str):
        batch = len(rows)
        self.target = torch.zeros(batch, horizon, action_dim, dtype=torch.float32, device=device)
        self.weights = torch.zeros(batch, horizon, 1, dtype=torch.float32, device=device)
        self.betas = [1.0] * batch
        jacobians = {r.jacobian for r in rows if r is not None}
        if len(jacobians) > 1:
            raise ValueError("rtc rows of one batch must share one jacobian ('identity' or 'exact')")
        self.exact = jacobians == {"exact"}
        for i, rtc in enumerate(rows):
            if rtc is None:
                continue
            rtc.validate(1, horizon, action_dim)
            y = rtc.prev_actions
            self.target[i, : y.shape[1], : y.shape[2]] = y[0].to(device=device, dtype=torch.float32)
            s = min(rtc.execution_horizon, y.shape[1])  # nothing to merge past the previous chunk's end
            self.weights[i, :, 0] = prefix_weights(rtc.inference_delay, s, horizon, rtc.schedule).to(device)
            self.betas[i] = rtc.max_guidance_weight

    def error(self, x1_hat: Tensor) -> Tensor:
        """(previous chunk - clean-action estimate) x prefix weights."""
        return (self.target - x1_hat) * self.weights

    def velocity(self, x_t: Tensor, v_t: Tensor, time: float, correction: Tensor | None = None) -> Tensor:
        """The guided velocity v_t - g * correction; the correction defaults to the weighted error of
        x1_hat = x_t - time * v_t (LeRobot's identity Jacobian)."""
        if correction is None:
            correction = self.error(x_t - time * v_t)
        g = torch.stack([guidance_weight(time, b) for b in self.betas]).to(v_t.device)[:, None, None]
        return v_t - g * correction


def make_guide(rtc: RTC | list[RTC | None] | None, batch: int, horizon: int, action_dim: int, device) -> Guide | None:
    """rtc: one RTC for the whole batch (prev_actions [B, T_prev, D_prev]), or one RTC (or None) per row."""
    if rtc is None:
        return None
    if isinstance(rtc, RTC):
        rtc.validate(batch, horizon, action_dim)
        rows = [RTC(rtc.prev_actions[i: i + 1], rtc.inference_delay, rtc.execution_horizon, rtc.schedule,
                    rtc.max_guidance_weight, rtc.jacobian) for i in range(batch)]
    else:
        rows = list(rtc)
        if len(rows) != batch:
            raise ValueError(f"rtc has {len(rows)} rows for a batch of {batch}: give one RTC (or None) per row")
        if all(r is None for r in rows):
            return None
    return Guide(rows, horizon, action_dim, device)


@dataclass(frozen=True)
class RTCDefaults:
    """What a request's "rtc" map may leave out (`pi0 serve --rtc-horizon --rtc-schedule --rtc-max-guidance`),
    checked when made: a server whose defaults would make every RTC request fail does not start."""

    execution_horizon: int = EXECUTION_HORIZON
    schedule: str = SCHEDULE
    max_guidance_weight: float = MAX_GUIDANCE_WEIGHT

    def __post_init__(self) -> None:
        h, beta = self.execution_horizon, self.max_guidance_weight
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"--rtc-horizon must be an integer >= 1 (how far into a new chunk the previous one still "
                             f"pulls), got {h!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--rtc-schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"--rtc-max-guidance must be a finite number > 0, got {beta!r}")
