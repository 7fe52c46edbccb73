"""Golden fixtures for `pi0 convert --layout lerobot`: a pi0-trained checkpoint, and what LeRobot 0.6.1 answers
when it loads the converted checkpoint with its own processors. Run by hand, never by CI, in two steps:

    .venv/bin/python tools/make_export_fixtures.py train                  # pi0: tests/fixtures/export/<kind>/
    /tmp/lerobot-oracle/bin/python tools/make_export_fixtures.py lerobot  # LeRobot: case.safetensors

`train` fine-tunes nothing: it runs `pi0 train --size <a shape LeRobot can build>` for 2 steps on a small dataset it
writes (2 cameras, 8 state values, 7 actions), keeps the checkpoint (weights, config.json, stats, tokenizer) and a
raw observation with its noise. `lerobot` converts that checkpoint with this repository's `pi0 convert --layout
lerobot` (the project's venv), loads the result with `PI0Policy.from_pretrained` / `PI05Policy.from_pretrained` and
`make_pre_post_processors(config, pretrained_path=...)` (shrunk as the oracle's build.py shrinks it; the tokenizer
step loads the converted checkpoint's own tokenizer folder), and stores its actions and the two pipeline files it
ran beside the observation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "export"
ORACLE = ROOT.parent / "shared" / "oracles" / "lerobot"
PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
CAMS = ("observation.images.top", "observation.images.wrist")
STATE, ACTION, VOCAB = 8, 7, 300
TINY = dict(depth=2, vlm_width=64, expert_width=32, head_dim=16, vision_width=32, vision_layers=2, vocab=VOCAB,
            image_res=28)


def size_json(kind: str) -> dict:
    """The Pi0Config of LeRobot's tiny model (build.py's shape: 8 Gemma heads, 4 SigLIP heads, 14-px patches)."""
    t = TINY
    gemma = lambda w, vocab: {"width": w, "depth": t["depth"], "mlp_dim": 4 * w, "num_heads": 8,  # noqa: E731
                              "num_kv_heads": 1, "head_dim": t["head_dim"], "vocab_size": vocab}
    return {"vision": {"width": t["vision_width"], "depth": t["vision_layers"], "num_heads": 4,
                       "mlp_dim": 4 * t["vision_width"], "patch_size": 14, "image_size": t["image_res"]},
            "vlm": gemma(t["vlm_width"], VOCAB), "expert": gemma(t["expert_width"], 0), "pi05": kind == "pi05",
            "action_dim": 32, "state_dim": 32, "action_horizon": 10, "max_token_len": 48 if kind == "pi0" else 200,
            "num_steps": 10}


def train() -> None:
    sys.path.insert(0, str(ROOT))
    from pi0.data.writer import LeRobotDatasetWriter

    if OUT.exists():
        shutil.rmtree(OUT)
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    feats = {k: {"dtype": "video", "shape": (28, 28, 3), "names": ["height", "width", "channels"]} for k in CAMS}
    feats["observation.state"] = {"dtype": "float32", "shape": (STATE,), "names": None}
    feats["action"] = {"dtype": "float32", "shape": (ACTION,), "names": None}
    w = LeRobotDatasetWriter(tmp / "data", fps=10, features=feats)
    for e in range(4):
        ep = {"observation.state": (rng.normal(size=(12, STATE)) * 2 + 1).astype(np.float32),
              "action": (rng.normal(size=(12, ACTION)) * 3 - 1).astype(np.float32)}
        for k in CAMS:
            ep[k] = rng.integers(0, 256, (12, 28, 28, 3), dtype=np.uint8)
        w.add_episode(ep, ["pick up the red cup", "open the drawer"][e % 2])
    w.finalize()
    for kind in ("pi0", "pi05"):
        (tmp / f"{kind}.json").write_text(json.dumps(size_json(kind)))
        run = tmp / f"run-{kind}"
        subprocess.run([str(PROJECT_PYTHON), "-m", "pi0.cli.main", "train", "--dataset", str(tmp / "data"), "--size",
                        str(tmp / f"{kind}.json"), "--out", str(run), "--steps", "2", "--batch", "4", "--lr", "1e-3",
                        "--dtype", "float32", "--tokenizer-vocab", str(VOCAB), "--quiet"], check=True)
        d = OUT / kind / "trained"
        src = (run / "latest").resolve()
        d.mkdir(parents=True)
        for name in ("model.safetensors", "config.json", "stats.safetensors", "paligemma_tokenizer.model", "assets"):
            (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, d / name)
        from safetensors.numpy import save_file

        case = {k: rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for k in CAMS}  # the model's size: no resize
        case["observation.state"] = (rng.normal(size=STATE) * 2 + 1).astype(np.float32)
        case["noise"] = rng.standard_normal((10, 32)).astype(np.float32)
        save_file(case, str(OUT / kind / "case.safetensors"), metadata={"task": "pick up the red cup"})
        print(f"{kind}: {d}")


def lerobot() -> None:
    sys.path.insert(0, str(ORACLE))
    import build
    import lerobot as lerobot_pkg
    import torch
    import transformers
    from lerobot.policies.factory import make_pre_post_processors
    from safetensors.torch import load_file, save_file

    versions = {"lerobot": lerobot_pkg.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    for kind in ("pi0", "pi05"):
        converted = Path(tempfile.mkdtemp()) / "lerobot"
        subprocess.run([str(PROJECT_PYTHON), "-m", "pi0.cli.main", "convert", str(OUT / kind / "trained"), str(converted),
                        "--layout", "lerobot"], check=True)
        build.build_tiny(kind, **TINY)  # LeRobot builds only its own sizes: the patches make it build this one
        mod = __import__(f"lerobot.policies.{kind}.modeling_{kind}", fromlist=["x"])
        Pol = mod.PI0Policy if kind == "pi0" else mod.PI05Policy
        policy = Pol.from_pretrained(str(converted)).eval()
        pre, post = make_pre_post_processors(policy.config, pretrained_path=str(converted))
        case = load_file(str(OUT / kind / "case.safetensors"))
        frame = {"observation.state": case["observation.state"], "task": "pick up the red cup"}
        for cam in CAMS:  # LeRobot takes float CHW in [0, 1]
            frame[cam] = case[cam].permute(2, 0, 1).float() / 255
        with torch.no_grad():
            batch = pre(frame)
            actions = post(policy.predict_action_chunk(batch, noise=case["noise"][None].clone()))
        case["lerobot_actions"] = actions[0].contiguous()
        case["lerobot_tokens"] = batch["observation.language.tokens"][0].contiguous()
        files = {n: (converted / n).read_text() for n in ("policy_preprocessor.json", "policy_postprocessor.json")}
        save_file(case, str(OUT / kind / "case.safetensors"),
                  metadata={"task": "pick up the red cup", **versions, **files})
        print(f"{kind}: LeRobot's actions {tuple(actions.shape)}, max |a| {actions.abs().max():.3f}")


if __name__ == "__main__":
    {"train": train, "lerobot": lerobot}[sys.argv[1]]()
