"""Golden fixtures from LeRobot 0.6.1, an independent pi0 / pi0.5 implementation.

Run by hand, never by CI, inside the oracle venv (../shared/oracles/lerobot/setup.sh):

    bash ../shared/oracles/lerobot/setup.sh /tmp/lerobot-oracle
    /tmp/lerobot-oracle/bin/python tools/make_fixtures.py            # writes tests/fixtures/

For each tiny model shape it builds LeRobot's PI0Policy / PI05Policy (shrunk the way the oracle's
build.py does: 8 Gemma heads, 4 SigLIP heads), randomises EVERY parameter (also the ones LeRobot
zero-initialises: RMSNorm weights, the adaRMS dense layers), and saves

    tests/fixtures/<model>/model.safetensors   weights in LeRobot's own key layout, lm_heads dropped
    tests/fixtures/<model>/config.json         LeRobot's config fields (type, chunk_size, ...)
    tests/fixtures/<model>/<case>.safetensors  inputs, noise, actions and intermediates; metadata
                                               holds num_steps and the versions used

Intermediates localise a mismatch: `vision_0` (camera 0 after SigLIP + projector), `prefix_out`
(the prefix after the last VLM layer and the final norm), `v_t0` (v_t of the first Euler step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ORACLE = Path(__file__).resolve().parents[1].parent / "shared" / "oracles" / "lerobot"

# name: (kind, build_tiny kwargs)
MODELS = {
    "pi0_a": ("pi0", dict(depth=2, vlm_width=64, expert_width=32, head_dim=16, vision_width=32, vision_layers=2,
                          vocab=1000, image_res=28)),
    "pi0_b": ("pi0", dict(depth=3, vlm_width=48, expert_width=48, head_dim=8, vision_width=48, vision_layers=1,
                          vocab=503, image_res=42)),
    "pi05_a": ("pi05", dict(depth=2, vlm_width=64, expert_width=32, head_dim=16, vision_width=32, vision_layers=2,
                            vocab=1000, image_res=28)),
    "pi05_b": ("pi05", dict(depth=3, vlm_width=48, expert_width=40, head_dim=8, vision_width=48, vision_layers=1,
                            vocab=503, image_res=42)),
}

# name: (batch, valid tokens per row, camera masks per row (3 cameras), num_steps)
CASES = {
    "three_cameras": (1, [9], [[True, True, True]], 10),
    "masked_camera": (2, [9, 9], [[True, True, True], [True, False, True]], 10),
    "prompt_lengths": (2, [5, 13], [[True, True, True], [True, True, True]], 10),
    "steps3": (2, [7, 11], [[True, True, True], [False, True, True]], 3),
}


def randomise_(policy: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(policy.named_parameters()):
            if "lm_head" in name:
                continue
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            elif "layer_norm" in name or "post_layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif p.ndim == 1:  # biases, Gemma RMSNorm weights (used as 1 + w)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)


def make_inputs(cfg, res: int, vocab: int, batch: int, valid: list[int], cams: list[list[bool]], seed: int):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(batch, 3, res, res, generator=g) * 2 - 1 for _ in range(3)]
    image_masks = [torch.tensor([row[i] for row in cams]) for i in range(3)]
    L = cfg.tokenizer_max_length
    tokens = torch.zeros(batch, L, dtype=torch.long)
    token_masks = torch.zeros(batch, L, dtype=torch.bool)
    for b, n in enumerate(valid):
        tokens[b, 0] = 2
        tokens[b, 1:n] = torch.randint(3, vocab, (n - 1,), generator=g)
        token_masks[b, :n] = True
    state = torch.randn(batch, cfg.max_state_dim, generator=g)
    noise = torch.randn(batch, cfg.chunk_size, cfg.max_action_dim, generator=g)
    return images, image_masks, tokens, token_masks, state, noise


@torch.no_grad()
def run_case(policy, kind, images, image_masks, tokens, token_masks, state, noise, num_steps):
    from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

    m = policy.model
    pwe = m.paligemma_with_expert
    vision_0 = pwe.embed_image(images[0])
    prefix, prefix_pad, prefix_att = m.embed_prefix(images, image_masks, tokens, token_masks)
    att_2d = make_att_2d_masks(prefix_pad, prefix_att)
    positions = torch.cumsum(prefix_pad, dim=1) - 1
    att_4d = prepare_attention_masks_4d(att_2d)
    pwe.paligemma.model.language_model.config._attn_implementation = "eager"
    (prefix_out, _), past = pwe.forward(attention_mask=att_4d, position_ids=positions, past_key_values=None,
                                        inputs_embeds=[prefix, None], use_cache=True)
    t0 = torch.ones(noise.shape[0], dtype=torch.float32)
    if kind == "pi0":
        v_t0 = m.denoise_step(state, prefix_pad, past, noise, t0)
        actions = m.sample_actions(images, image_masks, tokens, token_masks, state, noise=noise, num_steps=num_steps)
    else:
        v_t0 = m.denoise_step(prefix_pad, past, noise, t0)
        actions = m.sample_actions(images, image_masks, tokens, token_masks, noise=noise, num_steps=num_steps)
    return {"vision_0": vision_0, "prefix_out": prefix_out, "v_t0": v_t0, "actions": actions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    args = ap.parse_args()
    sys.path.insert(0, str(ORACLE))
    import build  # the oracle's LeRobot builder (shrinks LeRobot by monkeypatching)
    import lerobot
    import transformers
    from safetensors.torch import save_file

    versions = {"lerobot": lerobot.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    out = Path(args.out)
    for mi, (model_name, (kind, kw)) in enumerate(MODELS.items()):
        policy = build.build_tiny(kind, **kw)
        randomise_(policy, seed=100 + mi)
        d = out / model_name
        d.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in policy.state_dict().items() if "lm_head" not in k}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt", **versions})
        cfg = policy.config
        (d / "config.json").write_text(json.dumps({
            "type": kind, "chunk_size": cfg.chunk_size, "n_action_steps": cfg.n_action_steps,
            "max_state_dim": cfg.max_state_dim, "max_action_dim": cfg.max_action_dim,
            "num_inference_steps": cfg.num_inference_steps, "tokenizer_max_length": cfg.tokenizer_max_length,
            "image_resolution": list(cfg.image_resolution), "paligemma_variant": cfg.paligemma_variant,
            "action_expert_variant": cfg.action_expert_variant, "dtype": cfg.dtype,
        }, indent=2))
        for ci, (case, (batch, valid, cams, steps)) in enumerate(CASES.items()):
            images, image_masks, tokens, token_masks, state, noise = make_inputs(
                cfg, kw["image_res"], kw["vocab"], batch, valid, cams, seed=1000 * mi + ci)
            outs = run_case(policy, kind, images, image_masks, tokens, token_masks, state, noise, steps)
            tensors = {f"image_{i}": im for i, im in enumerate(images)}
            tensors.update({f"image_mask_{i}": m for i, m in enumerate(image_masks)})
            tensors.update(tokens=tokens, token_masks=token_masks, state=state, noise=noise, **outs)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / f"{case}.safetensors"),
                      metadata={"num_steps": str(steps), **versions})
            print(f"{model_name}/{case}: actions {tuple(outs['actions'].shape)} |a|max {outs['actions'].abs().max():.3f}")
    (out / "VERSIONS.json").write_text(json.dumps(versions, indent=2))


if __name__ == "__main__":
    main()
