"""Full-size check against LeRobot 0.6.1 (run by hand, never by CI; ~10 min, ~17 GB peak RSS).

    /tmp/lerobot-oracle/bin/python tools/fullsize_check.py lerobot /tmp/pi0-full   # LeRobot builds, runs, saves
    .venv/bin/python tools/fullsize_check.py pi0 /tmp/pi0-full                      # pi0 loads, runs, compares

Step 1 builds LeRobot's full-size pi0 (fp32, random init; the 1-D parameters it zero-initialises are
randomised too), runs `sample_actions` on fixed inputs and noise, and saves the weights in LeRobot's own
key layout (sharded safetensors + index, lm_heads dropped), config.json and the inputs/actions.
Step 2 loads that directory with `pi0.load_model` (reference fp32, engine fp32, engine bf16) and prints
max-abs against LeRobot's actions, PCC, timings and peak RSS as JSON lines.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(1, 3, 224, 224, generator=g) * 2 - 1 for _ in range(3)]
    masks = [torch.tensor([True]), torch.tensor([True]), torch.tensor([False])]
    tokens = torch.zeros(1, 48, dtype=torch.long)
    tokens[0, 0] = 2
    tokens[0, 1:20] = torch.randint(3, 257152, (19,), generator=g)
    token_masks = torch.zeros(1, 48, dtype=torch.bool)
    token_masks[0, :20] = True
    state = torch.randn(1, 32, generator=g)
    noise = torch.randn(1, 50, 32, generator=g)
    return images, masks, tokens, token_masks, state, noise


def lerobot_side(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "oracles" / "lerobot"))
    import build
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    policy = build.build_full("pi0", "float32")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "layer_norm" in name and name.endswith("weight") else 0.0))
    build_s = time.perf_counter() - t0
    images, masks, tokens, token_masks, state, noise = inputs()
    t0 = time.perf_counter()
    with torch.inference_mode():
        actions = policy.model.sample_actions(images, masks, tokens, token_masks, state, noise=noise.clone())
    call_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in policy.state_dict().items() if "lm_head" not in k}
    shards, cur, size, limit = [], {}, 0, 2 << 30
    for k, v in sd.items():
        if cur and size + v.numel() * 4 > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * 4
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out / name))
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = policy.config
    (out / "config.json").write_text(json.dumps({"type": "pi0", "chunk_size": cfg.chunk_size,
                                                 "tokenizer_max_length": cfg.tokenizer_max_length,
                                                 "num_inference_steps": cfg.num_inference_steps}))
    io = {f"image_{i}": im for i, im in enumerate(images)} | {f"image_mask_{i}": m for i, m in enumerate(masks)}
    io |= {"tokens": tokens, "token_masks": token_masks, "state": state, "noise": noise, "actions": actions}
    save_file({k: v.contiguous() for k, v in io.items()}, str(out / "io.safetensors"))
    print(json.dumps({"impl": "lerobot-0.6.1", "build_s": build_s, "call_s": call_s, "tensors": len(sd),
                      "peak_rss_gib": rss_gib()}), flush=True)


def pi0_side(out: Path, backend: str, dtype: str) -> None:
    import pi0
    from safetensors.torch import load_file

    io = load_file(str(out / "io.safetensors"))
    obs = pi0.Observation([io[f"image_{i}"] for i in range(3)], [io[f"image_mask_{i}"] for i in range(3)],
                          io["tokens"], io["token_masks"], io["state"])
    t0 = time.perf_counter()
    model = pi0.load_model(out, backend=backend, dtype=dtype)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    actions = model.sample_actions(obs, noise=io["noise"])
    call_s = time.perf_counter() - t0
    want = io["actions"]
    pcc = torch.corrcoef(torch.stack([actions.flatten(), want.flatten()]))[0, 1].item()
    print(json.dumps({"impl": f"pi0 {backend} {dtype}", "max_abs": (actions - want).abs().max().item(), "pcc": pcc,
                      "load_s": load_s, "call_s": call_s, "peak_rss_gib": rss_gib()}), flush=True)


if __name__ == "__main__":
    side, out = sys.argv[1], Path(sys.argv[2])
    if side == "lerobot":
        lerobot_side(out)
    else:
        backend, dtype = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else ("reference", "float32")
        pi0_side(out, backend, dtype)
