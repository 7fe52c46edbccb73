"""Golden training-loss fixtures from LeRobot 0.6.1: the per-element flow-matching loss and the gradients
of every parameter, for the four tiny models of tools/make_fixtures.py (their LeRobot weights are reused).

Run by hand, never by CI, inside the oracle venv (../shared/oracles/lerobot/setup.sh):

    /tmp/lerobot-oracle/bin/python tools/make_train_fixtures.py     # writes tests/fixtures/<model>/train/

Per model, one batch of two rows (prompts of different lengths, a camera masked in the second row), real
actions 7 wide zero-padded to 32 (LeRobot's prepare_action), given noise and flow times, and LeRobot's
`PI0Pytorch.forward` / `PI05Pytorch.forward` in training mode:

    loss.safetensors   inputs, actions, noise, time; `loss` [B, H, 32] unreduced; `grad.<name>` the gradient
                       of loss[:, :, :7].mean() (LeRobot's PI0Policy.forward reduction) for every parameter
                       that has one, under LeRobot's own parameter names; metadata: action_dim, versions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ORACLE = HERE.parents[1] / "shared" / "oracles" / "lerobot"
ACTION_DIM = 7  # the robot's action width; the rest of the 32 is zero padding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=str(HERE.parent / "tests" / "fixtures"))
    args = ap.parse_args()
    sys.path[:0] = [str(ORACLE), str(HERE)]
    import build  # the oracle's LeRobot builder (shrinks LeRobot by monkeypatching)
    import lerobot
    import transformers
    from make_fixtures import MODELS, make_inputs
    from safetensors.torch import load_file, save_file

    versions = {"lerobot": lerobot.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    root = Path(args.fixtures)
    for mi, (name, (kind, kw)) in enumerate(MODELS.items()):
        policy = build.build_tiny(kind, **kw)
        missing, unexpected = policy.load_state_dict(load_file(str(root / name / "model.safetensors")), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        policy.train()
        cfg = policy.config
        images, image_masks, tokens, token_masks, state, noise = make_inputs(
            cfg, kw["image_res"], kw["vocab"], 2, [6, 13], [[True, True, True], [True, False, True]], seed=5000 + mi)
        g = torch.Generator().manual_seed(6000 + mi)
        actions = torch.zeros(2, cfg.chunk_size, cfg.max_action_dim)
        actions[..., :ACTION_DIM] = torch.randn(2, cfg.chunk_size, ACTION_DIM, generator=g)
        time = torch.tensor([0.83, 0.21])
        m = policy.model
        if kind == "pi0":
            loss = m.forward(images, image_masks, tokens, token_masks, state, actions, noise, time)
        else:
            loss = m.forward(images, image_masks, tokens, token_masks, actions, noise, time)
        loss[:, :, :ACTION_DIM].mean().backward()
        grads = {f"grad.{k}": p.grad.detach().clone() for k, p in policy.named_parameters() if p.grad is not None}
        tensors = {f"image_{i}": im for i, im in enumerate(images)}
        tensors.update({f"image_mask_{i}": mk for i, mk in enumerate(image_masks)})
        tensors.update(tokens=tokens, token_masks=token_masks, state=state, noise=noise, actions=actions, time=time,
                       loss=loss.detach(), **grads)
        out = root / name / "train"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "loss.safetensors"),
                  metadata={"action_dim": str(ACTION_DIM), **versions})
        print(f"{name}: loss mean {loss[:, :, :ACTION_DIM].mean():.4f}, {len(grads)} gradients")


if __name__ == "__main__":
    main()
