"""Golden fixtures of LeRobot 0.6.1's whole π0-FAST pipeline: raw observation -> its pre-processor -> greedy
decoding -> its detokenisation -> its post-processor -> robot actions, for a LeRobot `pi0_fast` checkpoint as
LeRobot saves it.

Run by hand in the oracle venv (never in CI; the venv also needs scipy, which LeRobot's pi0_fast imports):

    /tmp/lerobot-oracle/bin/python tools/make_fast_pipeline_fixtures.py   # writes tests/fixtures/pi0_fast_pipeline/

Offline: a SentencePiece BPE tokenizer with PaliGemma's settings ("|" one of its pieces) is trained here and read
by LeRobot through transformers' AutoTokenizer; the FAST tokenizer is fitted here (`pi0.robot.fast`, files in
Physical Intelligence's processor format) and handed to LeRobot as `HubFast`, which does what the hub's
`UniversalActionProcessor` does with those files (DCT, scale, round, shift by min_token, characters, BPE; its
`bpe_tokenizer`, `scale`, `min_token` are what LeRobot's decoding reads). The tiny PI0FastPolicy (make_fast_fixtures'
widths) is taught two observations' chunks with LeRobot's own loss (`policy.forward` on the pre-processor's
action tokens, Adam), saved with both processors, loaded back by `PI0FastPolicy.from_pretrained`, and asked for
each case's chunk. Saves per checkpoint the LeRobot files, per case the raw observation, the prompt ids,
LeRobot's generated ids and its actions (`decoded`: 0 where LeRobot's decoding failed and it answered zeros);
`train.safetensors`: the pre-processor's action tokens and masks for the taught chunks and LeRobot's loss on them.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fast_fixtures import RES, shrink, strengthen_  # noqa: E402
from make_fixtures import randomise_  # noqa: E402
from make_pipeline_fixtures import train_tokenizer  # noqa: E402

from pi0.robot.fast import FastTokenizer  # noqa: E402  (fits the FAST tokenizer's files; LeRobot reads them)

OUT = ROOT / "tests" / "fixtures" / "pi0_fast_pipeline"
CAMS = ["observation.images.base", "observation.images.wrist"]
STATE, ACTION, CHUNK = 6, 4, 5
STEPS = 40


def train_text_tokenizer(folder: Path) -> Path:
    """make_pipeline_fixtures' tokenizer on π0-FAST's text too (so "|" is one of its pieces)."""
    rng = np.random.default_rng(0)
    words = ("pick up the red cup put block in bowl open close drawer move left right arm gripper stack blue "
             "Open Drawer Pick Cup blocks on plate fold towel push button Task State Action").split()
    lines = [" ".join(rng.choice(words, 8)) + f" {rng.integers(0, 256)}" for _ in range(3000)]
    lines += [f"Task: {' '.join(rng.choice(words, 3))}, State: {' '.join(map(str, rng.integers(-1, 256, 6)))};\n"
              f"Action: {''.join(rng.choice(list('abcdefghij'), 5))}|" for _ in range(1000)]
    return train_tokenizer(folder, lines, vocab_size=600)


class HubFast:
    """What LeRobot gets from `AutoProcessor.from_pretrained("physical-intelligence/fast")`, from the same files:
    `__call__` encodes [B, T, D] chunks to token lists; `bpe_tokenizer`, `scale`, `min_token` serve its decoding."""

    def __init__(self, folder: Path):
        from transformers import PreTrainedTokenizerFast

        cfg = json.loads((folder / "processor_config.json").read_text())
        self.scale, self.min_token = float(cfg["scale"]), int(cfg["min_token"])
        self.time_horizon, self.action_dim = cfg.get("time_horizon"), cfg.get("action_dim")
        self.bpe_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                     clean_up_tokenization_spaces=False)

    def __call__(self, action_chunk):
        from scipy.fft import dct

        chunks = np.asarray(action_chunk, dtype=np.float64)
        coeff = np.around(dct(chunks, axis=1, norm="ortho") * self.scale)
        return [self.bpe_tokenizer("".join(map(chr, np.maximum(c.flatten() - self.min_token, 0).astype(int))))
                ["input_ids"] for c in coeff]


def smooth_chunks(rng, n: int) -> np.ndarray:
    return np.tanh(np.cumsum(rng.normal(0, 0.3, (n, CHUNK, ACTION)), axis=1) + rng.normal(0, 0.5, (n, 1, ACTION)))


def stats(rng, n: int) -> dict[str, torch.Tensor]:
    mean, std = rng.normal(0, 1, n), rng.uniform(0.5, 2, n)
    d = {"mean": mean, "std": std, "min": mean - 3 * std, "max": mean + 3 * std, "q01": mean - 2.3 * std,
         "q99": mean + 2.3 * std, "count": np.array([1000.0])}
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in d.items()}


def patch_lerobot(tok_dir: Path, fast_dir: Path, vocab: int) -> None:
    """Tiny widths, and both tokenizers from the folders written here (the hub is not reachable)."""
    import transformers
    from lerobot.processor import tokenizer_processor

    mod = shrink(vocab)
    real_tok = transformers.AutoTokenizer.from_pretrained

    class Processor:
        @staticmethod
        def from_pretrained(name, *a, **k):
            return HubFast(fast_dir)

    for m in (mod, tokenizer_processor):
        m.AutoProcessor = Processor
        m.AutoTokenizer.from_pretrained = lambda name, *a, **k: real_tok(str(tok_dir), *a, **k)


def tie_(policy) -> None:
    pg = policy.model.paligemma_with_expert.paligemma
    pg.lm_head.weight = pg.model.language_model.embed_tokens.weight  # one tensor, as LeRobot's loader makes it


def observation(rng, task: str, state_std: float, st: dict[str, torch.Tensor], cams: list[str]) -> dict:
    frame = {"task": task, "observation.state": (st["mean"] + state_std * st["std"] *
                                                 torch.from_numpy(rng.standard_normal(STATE)).float())}
    for cam in cams:
        h, w = (RES, RES) if cam.endswith("base") else (RES + 12, RES)  # the wrist camera resized with padding
        frame[cam] = torch.from_numpy(rng.random((3, h, w), dtype=np.float32))
    return frame


CASES = {  # name: (taught chunk index or None, task, state spread, cameras)
    "taught_a": (0, "pick up the red cup", 0.5, CAMS),
    "taught_b": (1, "  Open_the Drawer\n", 1.5, CAMS),
    "wrist_left_out": (None, "pick up the red cup", 0.5, CAMS[:1]),
    "untaught": (None, "stack blue blocks on plate", 2.5, CAMS),
}


def main() -> None:
    import lerobot
    import transformers
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
    from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPolicy
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp())
    sp_path = train_text_tokenizer(work / "text")
    hf = transformers.AutoTokenizer.from_pretrained(str(work / "text"))
    vocab = hf.vocab_size
    assert hf.convert_tokens_to_ids("|") != hf.unk_token_id, "'|' must be a piece of the text tokenizer"
    rng = np.random.default_rng(0)
    fast = FastTokenizer.fit(smooth_chunks(rng, 400), scale=10, vocab_size=300)
    fast.save(work / "fast")
    patch_lerobot(work / "text", work / "fast", vocab)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    shutil.copy(sp_path, OUT / "tokenizer.model")
    fast.save(OUT / "fast_tokenizer")
    versions = {"lerobot": lerobot.__version__, "transformers": transformers.__version__, "torch": torch.__version__}

    torch.manual_seed(0)
    cfg = PI0FastConfig(device="cpu", dtype="float32", image_resolution=(RES, RES), chunk_size=CHUNK,
                        n_action_steps=CHUNK, max_action_dim=8, max_state_dim=8, tokenizer_max_length=48,
                        max_decoding_steps=STEPS, max_action_tokens=32, text_tokenizer_name="paligemma-tiny",
                        action_tokenizer_name="fast-tiny")
    cfg.input_features = {c: PolicyFeature(type=FeatureType.VISUAL, shape=(3, RES, RES)) for c in CAMS}
    cfg.input_features["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE,))
    cfg.output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION,))}
    policy = PI0FastPolicy(cfg)
    randomise_(policy, seed=500)
    strengthen_(policy.model)
    tie_(policy)
    ds = {"observation.state": stats(rng, STATE), "action": stats(rng, ACTION)}
    pre, post = make_pre_post_processors(cfg, dataset_stats=ds)

    # teach two observations their chunks, with LeRobot's loss on its pre-processor's action tokens
    taught = smooth_chunks(np.random.default_rng(1), 2)
    raw_actions = [torch.from_numpy(c).float() * ds["action"]["std"] + ds["action"]["mean"] for c in taught]
    frames = {name: observation(np.random.default_rng(10 + i), task, spread, ds["observation.state"], cams)
              for i, (name, (_, task, spread, cams)) in enumerate(CASES.items())}
    batches = [pre({**frames[name], "action": raw_actions[k][None]}) for name, (k, *_) in CASES.items() if k is not None]
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    policy.train()
    for step in range(200):
        loss = sum(policy.forward(b)[0] for b in batches) / len(batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"taught: loss {float(loss):.5f} after {step + 1} steps")
    policy.eval()
    with torch.no_grad():
        train = {"action_tokens": torch.cat([b["action.tokens"] for b in batches]),
                 "action_masks": torch.cat([b["action.token_mask"] for b in batches]),
                 "tokens": torch.cat([b["observation.language.tokens"] for b in batches]),
                 "token_masks": torch.cat([b["observation.language.attention_mask"] for b in batches]),
                 "losses": torch.stack([policy.forward(b)[0] for b in batches]),
                 "raw_actions": torch.stack(raw_actions)}

    for name, n_steps in (("ckpt", CHUNK), ("ckpt_short", CHUNK - 2)):  # short: LeRobot decodes fewer steps
        d = OUT / name
        policy.config.n_action_steps = n_steps
        policy.save_pretrained(d)
        pre.save_pretrained(d)
        post.save_pretrained(d)
        loaded = PI0FastPolicy.from_pretrained(d).eval()
        generated: list[torch.Tensor] = []
        real = loaded.model.sample_actions_fast_kv_cache
        loaded.model.sample_actions_fast_kv_cache = lambda *a, **k: generated.append(real(*a, **k)) or generated[-1]
        for case, (k, task, _, cams) in CASES.items():
            if name == "ckpt_short" and k != 0:
                continue
            frame = frames[case]
            warnings: list[str] = []
            handler = logging.Handler()
            handler.emit = lambda record: warnings.append(record.getMessage())
            logging.getLogger().addHandler(handler)
            try:
                with torch.no_grad():
                    batch = pre(dict(frame))
                    actions = post(loaded.predict_action_chunk(batch))
                error = ""
            except AssertionError as e:  # LeRobot's check that the answer starts with "Action:"
                actions, error = torch.zeros(1, n_steps, ACTION), str(e)
            finally:
                logging.getLogger().removeHandler(handler)
            failed = bool(error) or any("Error decoding tokens" in w for w in warnings)
            tensors = {k2: v.contiguous() for k2, v in frame.items() if isinstance(v, torch.Tensor)}
            tensors.update(tokens=batch["observation.language.tokens"][0],
                           token_masks=batch["observation.language.attention_mask"][0],
                           generated=generated[-1][0], actions=actions[0].float().contiguous(),
                           decoded=torch.tensor(not failed))
            save_file(tensors, str(d / f"case_{case}.safetensors"), metadata={"task": task, **versions})
            ids = generated[-1][0].tolist()
            print(f"{name}/{case}: decoded={not failed} {error[:60]} ids {ids[:12]}... actions "
                  f"{tuple(actions.shape)} max|a| {actions.abs().max():.3f}")
    save_file({k: v.contiguous() for k, v in train.items()}, str(OUT / "train.safetensors"), metadata=versions)
    (OUT / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")


if __name__ == "__main__":
    main()
