"""Digests of what pi0 computes, to show a change computes the same (a refactor's check): the actions of every
backend and dtype at tiny size, a few training steps' losses, and a served policy's answer. Deterministic on one
machine; run it before and after a change and compare the JSON.

    PI0_NATIVE_BF16=0 .venv/bin/python benchmarks/outputs_digest.py > digest.json
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pi0  # noqa: E402
from pi0.train.args import TrainArgs  # noqa: E402
from pi0.train.trainer import Trainer  # noqa: E402
from tests.train.test_train import write_dataset  # noqa: E402


def digest(a) -> str:
    data = a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else a
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def main() -> None:
    out = {}
    for size in ("tiny", "tiny-pi05"):
        cfg = pi0.size_config(size)
        obs = pi0.sample_observation(cfg, batch_size=2, num_valid_tokens=9, seed=3)
        noise = torch.randn(2, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(1))
        for backend, dtype in (("reference", "float32"), ("reference", "bfloat16"), ("engine", "float32"),
                               ("engine", "bfloat16"), ("engine", "int8")):
            model = pi0.build_model(cfg, backend=backend, dtype=dtype, seed=5)
            with torch.no_grad():
                out[f"{size}/{backend}/{dtype}"] = digest(model.sample_actions(obs, noise=noise))
    d = Path(tempfile.mkdtemp())
    ds = write_dataset(d / "ds")
    for size in ("tiny", "tiny-pi05"):
        t = Trainer(TrainArgs(dataset=str(ds), out=str(d / size), size=size, steps=4, batch=4, lr=1e-3,
                              action_horizon=4, log_every=1, progress=False, dtype="float32"))
        ckpt = t.run()
        out[f"train/{size}/losses"] = [json.loads(line)["loss"] for line in (d / size / "train_log.jsonl").read_text().splitlines()]
        policy = pi0.Policy(ckpt, backend="engine", dtype="float32", seed=0)
        item = t.ds[3]
        robot = {k: item[k].transpose(1, 2, 0) for k in t.ds.camera_keys}
        robot.update({"observation.state": item["observation.state"], "prompt": item["task"]})
        out[f"policy/{size}"] = digest(policy.infer(robot)["actions"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
