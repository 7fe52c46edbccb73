"""Golden fixtures for π0-FAST from LeRobot 0.6.1's `pi0_fast` (an independent implementation): greedy tokens and
the logits behind them, for the π0-FAST model pi0 will run (issue 34; the model is not built yet).

Run by hand, never by CI, inside the oracle venv (../shared/oracles/lerobot/setup.sh):

    /tmp/lerobot-oracle/bin/python tools/make_fast_fixtures.py      # writes tests/fixtures/pi0_fast_a/

It builds LeRobot's core `PI0FastPytorch` offline at tiny widths (SigLIP 32 wide, 2 layers, 4 heads, 28 px; Gemma
64 wide, 2 layers, 8 heads of 16, one kv head; vocabulary 1000), randomises every parameter as make_fixtures.py
does (then Gemma's output projections x 8, `strengthen_` says why; the lm_head takes the token embedding's
values, as LeRobot's loader makes it), and runs `sample_actions_fast_kv_cache` (greedy, KV cache)
on prepared token ids: LeRobot's text tokenizer and FAST processor come from the hub, so the token ids are given
(BOS id 2; "|" is the id row 0 emits at its 6th step, so that row stops early and the other runs on). Saves

    model.safetensors   weights in LeRobot's key layout (lm_head dropped: it is the embedding)
    config.json         LeRobot's config fields, the BOS and "|" ids, the widths
    <case>.safetensors  images, image masks, tokens, token masks, `generated` [B, steps] (LeRobot's output: zeros
                        after the batch-wide stop) and `logits` [steps, B, vocab] (every lm_head call's last row);
                        ragged_masked also `loss`, LeRobot's training loss (forward) of `action_tokens` under
                        `action_masks` (row 1's last three are padding) after the same prompt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import randomise_  # noqa: E402

WIDTH, DEPTH, HEAD_DIM, VISION_WIDTH, VOCAB, RES, BOS = 64, 2, 16, 32, 1000, 28, 2
STEPS = 24

# name: (batch, valid prompt tokens per row, camera masks per row (2 cameras))
CASES = {
    "ragged_masked": (2, [12, 7], [[True, True], [True, False]]),
    "one_row": (1, [9], [[True, True]]),
}


def shrink(vocab: int = VOCAB):
    """LeRobot's pi0_fast module at tiny widths (its Gemma config and PaliGemma class monkeypatched); returns it."""
    import lerobot.policies.pi0_fast.modeling_pi0_fast as mod

    def gemma_config(variant):
        return mod.GemmaConfig(width=WIDTH, depth=DEPTH, mlp_dim=4 * WIDTH, num_heads=8, num_kv_heads=1,
                               head_dim=HEAD_DIM)

    current = mod.PaliGemmaForConditionalGenerationWithPiGemma
    base = getattr(current, "_full", current)  # shrink twice: subclass LeRobot's class, not the tiny one

    class TinyPaliGemma(base):
        _full = base

        def __init__(self, config):
            v = config.vision_config
            v.hidden_size, v.num_hidden_layers, v.num_attention_heads = VISION_WIDTH, 2, 4
            v.intermediate_size, v.image_size = 4 * VISION_WIDTH, RES
            v.projection_dim = config.text_config.hidden_size
            config.text_config.vocab_size = config._vocab_size = vocab
            super().__init__(config)

    mod.PaliGemmaForConditionalGenerationWithPiGemma = TinyPaliGemma
    mod.get_gemma_config = gemma_config
    return mod


def tiny_model(end_token: int):
    """LeRobot's PI0FastPytorch shrunk (`shrink`)."""
    from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig

    mod = shrink()

    class Ids:  # what the decoding loop asks LeRobot's PaliGemma tokenizer
        bos_token_id = BOS

        def convert_tokens_to_ids(self, token: str) -> int:
            assert token == "|", token
            return end_token

    torch.manual_seed(0)
    cfg = PI0FastConfig(device="cpu", dtype="float32", image_resolution=(RES, RES))
    return mod.PI0FastPytorch(cfg, paligemma_tokenizer=Ids()).eval()


def make_inputs(batch: int, valid: list[int], cams: list[list[bool]], seed: int):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(batch, 3, RES, RES, generator=g) * 2 - 1 for _ in range(2)]
    image_masks = [torch.tensor([row[i] for row in cams]) for i in range(2)]
    length = max(valid) + 3  # right-padded
    tokens = torch.zeros(batch, length, dtype=torch.long)
    token_masks = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(valid):
        tokens[b, 0] = BOS
        tokens[b, 1:n] = torch.randint(3, VOCAB, (n - 1,), generator=g)
        token_masks[b, :n] = True
    return images, image_masks, tokens, token_masks


def strengthen_(model, gain: float = 8.0) -> None:
    """Gemma's attention and MLP output projections x `gain`: with a tied head and random weights the residual stream
    otherwise stays so close to the last token's own embedding that greedy decoding repeats it (measured: BOS 24
    times); at 8x the layers decide, and the sequences vary."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(gain)


def tie_(model) -> None:
    """The lm_head as LeRobot loads a checkpoint: the token embedding's values (its _fix_pytorch_state_dict_keys)."""
    pg = model.paligemma_with_expert.paligemma
    with torch.no_grad():
        pg.lm_head.weight.copy_(pg.model.language_model.embed_tokens.weight)


@torch.no_grad()
def decode(model, images, image_masks, tokens, token_masks) -> dict[str, torch.Tensor]:
    logits = []
    lm_head = model.paligemma_with_expert.paligemma.lm_head
    hook = lm_head.register_forward_hook(lambda mod, args, out: logits.append(out[:, -1].clone()))
    try:
        generated = model.sample_actions_fast_kv_cache(images, image_masks, tokens, token_masks,
                                                       max_decoding_steps=STEPS)
    finally:
        hook.remove()
    return {"generated": generated, "logits": torch.stack(logits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pi0_fast_a"))
    args = ap.parse_args()
    import lerobot
    import transformers
    from safetensors.torch import save_file

    versions = {"lerobot": lerobot.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    first = make_inputs(*CASES["ragged_masked"], seed=0)
    probe = tiny_model(end_token=VOCAB)  # an id never emitted: a full-length run, to pick row 0's 6th token
    randomise_(probe, seed=200)
    strengthen_(probe)
    tie_(probe)
    end_token = int(decode(probe, *first)["generated"][0, 5])
    model = tiny_model(end_token)
    randomise_(model, seed=200)
    strengthen_(model)
    tie_(model)
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt", **versions})
    cfg = model.config
    (d / "config.json").write_text(json.dumps({
        "type": "pi0_fast", "chunk_size": cfg.chunk_size, "max_action_dim": cfg.max_action_dim,
        "max_state_dim": cfg.max_state_dim, "max_decoding_steps": STEPS, "fast_skip_tokens": cfg.fast_skip_tokens,
        "image_resolution": [RES, RES], "paligemma_variant": cfg.paligemma_variant, "dtype": cfg.dtype,
        "bos_token_id": BOS, "end_of_action_token_id": end_token, "vocab_size": VOCAB,
        "widths": {"vlm": WIDTH, "depth": DEPTH, "head_dim": HEAD_DIM, "heads": 8, "kv_heads": 1,
                   "vision": VISION_WIDTH, "vision_depth": 2, "vision_heads": 4},
    }, indent=2) + "\n")
    for ci, (case, spec) in enumerate(CASES.items()):
        images, image_masks, tokens, token_masks = first if ci == 0 else make_inputs(*spec, seed=ci)
        outs = decode(model, images, image_masks, tokens, token_masks)
        tensors = {f"image_{i}": im for i, im in enumerate(images)}
        tensors.update({f"image_mask_{i}": m for i, m in enumerate(image_masks)})
        tensors.update(tokens=tokens, token_masks=token_masks, **outs)
        if case == "ragged_masked":  # the training loss over action tokens with padding (LeRobot's forward)
            g = torch.Generator().manual_seed(7)
            tensors["action_tokens"] = torch.randint(3, VOCAB, (2, 9), generator=g)
            tensors["action_masks"] = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
            with torch.no_grad():
                tensors["loss"] = model.forward(images, image_masks, tokens, token_masks, tensors["action_tokens"],
                                                tensors["action_masks"])["loss"]
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / f"{case}.safetensors"),
                  metadata=versions)
        stops = [(row == end_token).nonzero()[:1].flatten().tolist() for row in outs["generated"]]
        print(f"pi0_fast_a/{case}: generated {tuple(outs['generated'].shape)}, first '|' per row {stops}")


if __name__ == "__main__":
    main()
