"""Golden real-time-chunking fixtures from LeRobot 0.6.1 (its RTCProcessor inside `sample_actions`).

Run by hand in the oracle venv, after tools/make_fixtures.py (it reuses those models and inputs):

    /tmp/lerobot-oracle/bin/python tools/make_rtc_fixtures.py     # writes tests/fixtures/<model>/rtc/*.safetensors

For each fixture model, LeRobot's policy is rebuilt at the same tiny size, loaded with the fixture's
weights, and sampled with RTC enabled for every case below (every schedule, d = 0 and d > 0, s clipped to
T_prev, a previous chunk narrower than 32 dims, 10 and 3 steps, batch 2 with a different previous chunk per
row). The previous chunk is the unexecuted part of a plain chunk from another noise: rows k .. k+T_prev.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import MODELS, ORACLE  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"

# name: (inputs from case, schedule, inference_delay, execution_horizon, T_prev, D_prev, max_guidance_weight)
RTC_CASES = {
    "linear_d3_s10": ("masked_camera", "LINEAR", 3, 10, 20, 7, 10.0),
    "exp_d2_s8_full_width": ("prompt_lengths", "EXP", 2, 8, 30, 32, 10.0),
    "ones_d0_s12_steps3": ("steps3", "ONES", 0, 12, 25, 7, 10.0),
    "zeros_d4": ("masked_camera", "ZEROS", 4, 10, 16, 6, 10.0),
    "linear_s_clipped": ("prompt_lengths", "LINEAR", 2, 60, 18, 7, 10.0),
    "linear_d_past_s_beta1.5": ("steps3", "LINEAR", 5, 3, 12, 7, 1.5),
}
EXECUTED = 5  # rows of the previous chunk already executed when the new request is sent


def main() -> None:
    sys.path.insert(0, str(ORACLE))
    import build
    import lerobot
    from lerobot.policies.rtc.configuration_rtc import RTCAttentionSchedule, RTCConfig

    for model_name, (kind, kw) in MODELS.items():
        policy = build.build_tiny(kind, **kw)
        missing, unexpected = policy.load_state_dict(load_file(str(FIXTURES / model_name / "model.safetensors")), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        m = policy.model
        out = FIXTURES / model_name / "rtc"
        out.mkdir(exist_ok=True)
        for ci, (name, (base, schedule, d, s, t_prev, d_prev, beta)) in enumerate(RTC_CASES.items()):
            with safe_open(str(FIXTURES / model_name / f"{base}.safetensors"), "pt") as f:
                t = {k: f.get_tensor(k) for k in f.keys()}
                steps = int(f.metadata()["num_steps"])
            images = [t[f"image_{i}"] for i in range(3)]
            masks = [t[f"image_mask_{i}"] for i in range(3)]
            args = (images, masks, t["tokens"], t["token_masks"]) + ((t["state"],) if kind == "pi0" else ())
            g = torch.Generator().manual_seed(5000 + ci)
            policy.config.rtc_config = None
            policy.init_rtc_processor()
            prev_full = m.sample_actions(*args, noise=torch.randn(t["noise"].shape, generator=g), num_steps=steps)
            prev = prev_full[:, EXECUTED:EXECUTED + t_prev, :d_prev].contiguous()
            policy.config.rtc_config = RTCConfig(prefix_attention_schedule=RTCAttentionSchedule[schedule],
                                                 max_guidance_weight=beta, execution_horizon=10)
            policy.init_rtc_processor()
            actions = m.sample_actions(*args, noise=t["noise"], num_steps=steps, inference_delay=d,
                                       prev_chunk_left_over=prev, execution_horizon=s)
            tensors = {k: v for k, v in t.items() if k.startswith(("image", "token")) or k in ("state", "noise")}
            tensors.update(prev_actions=prev, actions=actions)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"), metadata={
                "num_steps": str(steps), "inference_delay": str(d), "execution_horizon": str(s),
                "schedule": schedule.lower(), "max_guidance_weight": repr(beta), "lerobot": lerobot.__version__,
                "torch": torch.__version__})
            k = min(d, s, t_prev)
            gap = (actions[:, :k, :d_prev] - prev[:, :k]).abs().max().item() if k else float("nan")
            print(f"{model_name}/rtc/{name}: actions {tuple(actions.shape)}, prev {tuple(prev.shape)}, "
                  f"|first {k} actions - prev| max {gap:.4f}")


if __name__ == "__main__":
    main()
