"""Golden fixtures of LeRobot 0.6.1's WHOLE pipeline: raw observation dict -> pre-processor ->
predict_action_chunk(noise) -> post-processor -> robot actions.

Run by hand in the oracle venv (never in CI):

    /tmp/lerobot-oracle/bin/python tools/make_pipeline_fixtures.py   # writes tests/fixtures/pipeline/

Offline, as ../shared/spec/lerobot_processing.md says: a SentencePiece BPE tokenizer with PaliGemma's settings
is trained here and saved as tests/fixtures/pipeline/tokenizer.model; LeRobot's tokenizer step loads it
through transformers' AutoTokenizer (its hub name is redirected to that folder). Each checkpoint is what
LeRobot saves (`policy.save_pretrained` + both processors' `save_pretrained`: config.json, model.safetensors,
policy_{pre,post}processor.json and the normaliser state files), weights randomised; each case is a raw
observation (images of other sizes and aspect ratios, float CHW or uint8 HWC, a camera left out, awkward or
over-long prompts, a state outside the stats' range) with its noise and LeRobot's actions.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ORACLE, randomise_  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pipeline"
CAMS = ["observation.images.base", "observation.images.wrist", "observation.images.side"]
STATE, ACTION = 8, 7
TINY = dict(depth=2, vlm_width=64, expert_width=32, head_dim=16, vision_width=32, vision_layers=2, vocab=1000, image_res=28)
CHECKPOINTS = {  # name: (kind, normalization_mapping overrides)
    "pi0_default": ("pi0", {}),
    "pi05_default": ("pi05", {}),
    "pi0_minmax_q10": ("pi0", {"STATE": "MIN_MAX", "ACTION": "QUANTILE10"}),
}


def train_tokenizer(folder: Path, lines: list[str] | None = None, vocab_size: int = 700) -> Path:
    """A SentencePiece BPE with PaliGemma's settings, trained on `lines` (default: prompts of pi0's pipelines)."""
    import sentencepiece as spm

    if lines is None:
        rng = np.random.default_rng(0)
        words = ("pick up the red cup put block in bowl open close drawer move left right arm gripper stack blue "
                 "blocks on plate fold towel push button Task State Action").split()
        lines = [" ".join(rng.choice(words, 8)) + f" {rng.integers(0, 256)}" for _ in range(3000)]
        lines += [f"Task: {' '.join(rng.choice(words, 3))}, State: {' '.join(map(str, rng.integers(0, 256, 8)))};\n"
                  "Action: " for _ in range(1000)]
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", normalization_rule_name="identity", add_dummy_prefix=False,
        byte_fallback=True, user_defined_symbols=["\n"], character_coverage=1.0, minloglevel=2,
        remove_extra_whitespaces=False)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    return folder / "tokenizer.model"


def stats(rng, n: int) -> dict[str, torch.Tensor]:
    lo = rng.uniform(-2, -1, n)
    q = {k: lo + rng.uniform(0.5, 1.5, n) * f for k, f in (("q01", 0.0), ("q10", 0.3), ("q50", 1.0), ("q90", 1.7), ("q99", 2.0))}
    q["q01"] = lo + rng.uniform(0.01, 0.05, n)
    d = {"mean": rng.normal(0, 1, n), "std": rng.uniform(0.5, 2, n), "min": lo - 0.2, "max": q["q99"] + 0.3,
         "count": np.array([1000.0]), **q}
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in d.items()}


def image(rng, h: int, w: int, uint8: bool):
    if uint8:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # HWC, as robots send
    return rng.random((3, h, w), dtype=np.float32)  # CHW in [0, 1], as LeRobot datasets hold


LONG = " ".join(["put the red block in the bowl and then close the drawer"] * 30)
CASES = {  # name: (camera sizes (None: left out), uint8, task, state scale)
    "square_float": ([(28, 28), (28, 28), (28, 28)], False, "pick up the red cup", 1.0),
    "other_sizes": ([(48, 64), (20, 20), (100, 60)], False, "open the drawer", 1.0),
    "uint8_hwc": ([(64, 48), (28, 28), (30, 90)], True, "push the button", 1.0),
    "camera_left_out": ([(40, 40), None, (28, 36)], False, "fold the towel", 1.0),
    "awkward_prompt": ([(28, 28), (28, 28), (28, 28)], False, "  stack_the blue blocks\non the plate  \n", 1.0),
    "prompt_too_long": ([(28, 28), (33, 28), (28, 28)], False, LONG, 1.0),
    "state_out_of_range": ([(28, 28), (28, 28), (50, 30)], False, "move left", 6.0),
}


def main() -> None:
    sys.path.insert(0, str(ORACLE))
    import build
    import lerobot
    import transformers
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.processor import tokenizer_processor
    from safetensors.torch import load_file, save_file

    tok_dir = Path(tempfile.mkdtemp())
    train_tokenizer(tok_dir)
    real = transformers.AutoTokenizer.from_pretrained
    tokenizer_processor.AutoTokenizer.from_pretrained = lambda name, *a, **k: real(str(tok_dir), *a, **k)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    shutil.copy(tok_dir / "tokenizer.model", OUT / "tokenizer.model")
    versions = {"lerobot": lerobot.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    for ci, (name, (kind, mapping)) in enumerate(CHECKPOINTS.items()):
        policy = build.build_tiny(kind, **TINY)
        cfg = policy.config
        cfg.input_features = {c: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 28, 28)) for c in CAMS}
        cfg.input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE,))
        cfg.output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION,))}
        for k, v in mapping.items():
            cfg.normalization_mapping[k] = type(next(iter(cfg.normalization_mapping.values())))[v]
        randomise_(policy, seed=300 + ci)
        rng = np.random.default_rng(ci)
        ds = {"observation.state": stats(rng, STATE), "action": stats(rng, ACTION)}
        pre, post = make_pre_post_processors(cfg, dataset_stats=ds)
        d = OUT / name
        policy.save_pretrained(d)
        # the expert's unused lm_head is [257152, width] whatever the tiny vocab: dropped to keep the fixtures small
        sd = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if "gemma_expert.lm_head" not in k}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        pre.save_pretrained(d)
        post.save_pretrained(d)
        for case_i, (case, (sizes, uint8, task, scale)) in enumerate(CASES.items()):
            rng = np.random.default_rng(1000 * ci + case_i)
            raw = {}
            for cam, size in zip(CAMS, sizes):
                if size is not None:
                    raw[cam] = image(rng, *size, uint8)
            st = ds["observation.state"]
            raw_state = (st["mean"].numpy() + scale * st["std"].numpy() * rng.standard_normal(STATE)).astype(np.float32)
            noise = torch.from_numpy(rng.standard_normal((1, cfg.chunk_size, cfg.max_action_dim)).astype(np.float32))
            frame = {"observation.state": torch.from_numpy(raw_state), "task": task}
            for cam, im in raw.items():  # LeRobot takes float CHW in [0, 1]
                frame[cam] = torch.from_numpy(im).permute(2, 0, 1).float() / 255 if uint8 else torch.from_numpy(im)
            with torch.no_grad():
                batch = pre(frame)
                actions = post(policy.predict_action_chunk(batch, noise=noise.clone()))
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}
            tensors.update({"observation.state": torch.from_numpy(raw_state), "noise": noise[0],
                            "actions": actions[0].contiguous(), "tokens": batch["observation.language.tokens"][0]})
            save_file(tensors, str(d / f"case_{case}.safetensors"), metadata={"task": task, **versions})
            print(f"{name}/{case}: actions {tuple(actions.shape)} max|a| {actions.abs().max():.3f}, "
                  f"{int(batch['observation.language.attention_mask'].sum())} tokens")
    (OUT / "VERSIONS.json").write_text(json.dumps(versions, indent=2))


if __name__ == "__main__":
    main()
