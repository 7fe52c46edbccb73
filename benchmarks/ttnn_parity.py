"""The TTNN model against the fp32 reference, stage by stage, at any size (full size by default), emulated on the host
through ttnn's golden functions: fp32 goldens (the logic: max |difference| of the actions, ≤ 1e-4 expected) and the
device's formats (bf16 activations, bfloat8_b MLP weights: PCC and errors of the image embeddings, the prefix's KV
cache and the actions, over several observations). Seeded random weights, or a checkpoint's; one camera masked, a
ragged prompt.

Needs ttnn (Python 3.10 / 3.12: `make ttnn-venv`), ~20 GB of memory at full size and a few minutes a model:

    .venv-ttnn/bin/python benchmarks/ttnn_parity.py --size pi0 --size pi05 > ttnn_parity.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pi0  # noqa: E402
from pi0.backends.ttnn.model import Pi0TTNN  # noqa: E402
from pi0.backends.ttnn.runtime import open_runtime  # noqa: E402
from pi0.hardware import describe_machine  # noqa: E402


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.float(), b.float()
    return {"pcc": round(pcc(a, b), 6), "max_abs": float((a - b).abs().max()),
            "rel_l2": float((a - b).norm() / b.norm())}


def inputs(cfg: pi0.Pi0Config, seed: int) -> tuple[pi0.Observation, torch.Tensor]:
    """One observation (the last camera masked, a prompt shorter than max_token_len) and its noise."""
    obs = pi0.sample_observation(cfg, batch_size=1, num_valid_tokens=max(2, cfg.max_token_len // 3 + seed), seed=seed)
    obs.image_masks[-1] = torch.zeros_like(obs.image_masks[-1])
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(100 + seed))
    return obs, noise


def stages_of(model, obs: pi0.Observation, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image embeddings, the prefix's KV cache (every layer's k and v) and the actions, as host tensors."""
    if isinstance(model, Pi0TTNN):
        tt = model.tt
        vision = torch.cat([tt.to_torch(model.embed_image(img)).float() for img in obs.images], 1)
        cache, _ = model.prefix(obs)
        kv = torch.cat([tt.to_torch(t).float().flatten() for pair in cache for t in pair])
    else:
        embs = [model.embed_image(img) for img in obs.images]
        vision = torch.cat(embs, 1)
        cache, _ = model.fill_kv_cache(*model.embed_prefix(obs, embs))
        kv = torch.cat([t.transpose(1, 2).float().flatten() for pair in cache for t in pair])  # [B, K, L, D] order
    t = time.perf_counter()
    actions = model.sample_actions(obs, noise=noise)
    return {"vision": vision, "prefix_kv": kv, "actions": actions, "seconds": time.perf_counter() - t}


def make(source: str, weight_seed: int, **kwargs):
    """A model of `source`: a size's seeded random weights, or a checkpoint's."""
    if source in pi0.model.config.SIZES:
        return pi0.build_model(pi0.size_config(source), seed=weight_seed, **kwargs)
    return pi0.load_model(source, **kwargs)


def run(source: str, seeds: list[int], weight_seed: int) -> dict:
    out: dict = {"model": source, "observations": len(seeds)}
    t = time.perf_counter()
    ref = make(source, weight_seed, backend="reference")
    cfg = ref.config
    out["reference_build_s"] = round(time.perf_counter() - t, 1)
    with torch.no_grad():
        golden = [stages_of(ref, *inputs(cfg, s)) for s in seeds]
        out["reference_sample_s"] = round(golden[0]["seconds"], 2)
        # fp32 goldens over the reference's own tensors (views: no second copy of the weights)
        exact = Pi0TTNN(cfg, dict(ref.state_dict()), open_runtime("cpu"))
        got = stages_of(exact, *inputs(cfg, seeds[0]))
        out["fp32_goldens"] = {k: compare(got[k], golden[0][k]) for k in ("vision", "prefix_kv", "actions")}
        out["fp32_goldens"]["host_s"] = round(got["seconds"], 2)
        del exact, ref, got
        gc.collect()
        t = time.perf_counter()
        model = make(source, weight_seed, backend="ttnn", dtype="bfloat16", device="cpu")
        out["formats_build_s"] = round(time.perf_counter() - t, 1)
        rows = []
        for s, g in zip(seeds, golden):
            got = stages_of(model, *inputs(cfg, s))
            rows.append({k: compare(got[k], g[k]) for k in ("vision", "prefix_kv", "actions")} |
                        {"host_s": round(got["seconds"], 2)})
    out["device_formats"] = rows
    out["device_formats_mean_pcc"] = {k: round(sum(r[k]["pcc"] for r in rows) / len(rows), 6)
                                      for k in ("vision", "prefix_kv", "actions")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", action="append", help="pi0, pi05, tiny, tiny-pi05, or a checkpoint (its real weights) "
                   "(repeatable; default pi0 and pi05)")
    p.add_argument("--observations", type=int, default=3, help="observations (and noises) per model")
    p.add_argument("--weight-seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(0)
    report = {"hardware": describe_machine(), "torch": torch.__version__,
              "ttnn": importlib.metadata.version("ttnn"),
              "runs": [run(size, list(range(args.observations)), args.weight_seed)
                       for size in args.size or ["pi0", "pi05"]]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
