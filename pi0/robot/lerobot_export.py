"""What LeRobot 0.6.1 needs beside a LeRobot-layout checkpoint to run it as pi0 does: its two processor pipelines
(`policy_preprocessor.json`, `policy_postprocessor.json`, as ../shared/spec/lerobot_processing.md describes them),
the normaliser state files they name (the checkpoint's own stats), and a tokenizer its tokenizer step can load.

`pi0 convert --layout lerobot` writes them for a checkpoint that describes its robot (config.json's features: every
`pi0 train` output does); a LeRobot checkpoint's own pipeline files are copied as they are instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pi0.checkpoint.info import CheckpointInfo
from pi0.model.features import features
from pi0.robot.assets import find_tokenizer, load_norm_stats
from pi0.robot.normalize import Stats

PALIGEMMA = "google/paligemma-3b-pt-224"  # the tokenizer LeRobot's pipelines name
PALIGEMMA_VOCAB = 257_152
PRE_STATE = {"pi0": "policy_preprocessor_step_6_normalizer_processor.safetensors",
             "pi05": "policy_preprocessor_step_3_normalizer_processor.safetensors"}
POST_STATE = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"


def _stat_tensors(key: str, st: Stats | None) -> dict[str, np.ndarray]:
    if st is None:
        return {}
    out = {f"{key}.{name}": np.asarray(v, np.float32) for name in ("mean", "std", "q01", "q99")
           if (v := getattr(st, name)) is not None}
    if st.q01 is not None and st.q99 is not None:  # LeRobot's MIN_MAX reads min / max: the quantiles are the range
        out.setdefault(f"{key}.min", out[f"{key}.q01"])
        out.setdefault(f"{key}.max", out[f"{key}.q99"])
    return out


def _tokenizer_name(out: Path, tokenizer: Path | None) -> str:
    """The PaliGemma tokenizer by its hub name; a small one of `pi0 train` copied into `out/tokenizer` with the
    file Hugging Face's AutoTokenizer needs, named by its absolute path (keep the checkpoint where it was written,
    or edit tokenizer_name in policy_preprocessor.json after moving it)."""
    if tokenizer is None:
        return PALIGEMMA
    import sentencepiece

    if sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size() == PALIGEMMA_VOCAB:
        return PALIGEMMA
    folder = out / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, indent=2))
    return str(folder.resolve())


def write_pipelines(info: CheckpointInfo, out: Path) -> list[str]:
    """LeRobot's pre- and post-processor of the checkpoint `info` describes, into the converted checkpoint `out`
    (its config.json already LeRobot's). Returns the files written; raises ValueError where LeRobot's pipeline
    cannot do what pi0 does with this checkpoint."""
    from safetensors.numpy import save_file

    cfg, meta, root = info.config, info.meta, info.files.root
    feats = features(meta)
    if not feats.cameras:
        raise ValueError(f"{root}/config.json describes no cameras (input_features): LeRobot's pipeline needs the "
                         "robot's features; convert a checkpoint that has them (every pi0 train output does)")
    if cfg.pi05 and not meta.get("discrete_state_input", True):
        raise ValueError("this pi0.5 leaves the state out of its prompt (--no-state-in-prompt): LeRobot 0.6.1's pi0.5 "
                         "pipeline always puts it in, so it would not give this model's actions")
    lerobot = json.loads((out / "config.json").read_text())
    norm_map = lerobot["normalization_mapping"]
    normalizer, _ = load_norm_stats(root, meta.get("pi0_train", {}).get("asset_id"), norm_map["STATE"],
                                    norm_map["ACTION"])
    stats: dict[str, np.ndarray] = {}
    if normalizer is not None:
        stats = {**_stat_tensors(feats.state_key or "observation.state", normalizer.state),
                 **_stat_tensors("action", normalizer.actions)}
    try:
        tokenizer: Path | None = find_tokenizer(None, root)
    except FileNotFoundError:
        tokenizer = None
    all_features = {**lerobot["input_features"], **lerobot["output_features"]}
    normalizer_cfg = {"eps": 1e-08, "features": all_features, "norm_map": norm_map}
    rename = {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}}
    batch = {"registry_name": "to_batch_processor", "config": {}}
    relative = {"registry_name": "relative_actions_processor",
                "config": {"enabled": False, "exclude_joints": ["gripper"], "action_names": None}}
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    tokenize = {"registry_name": "tokenizer_processor",
                "config": {"max_length": cfg.max_token_len, "task_key": "task", "padding_side": "right",
                           "padding": "max_length", "truncation": True,
                           "tokenizer_name": _tokenizer_name(out, tokenizer)}}
    normalize = {"registry_name": "normalizer_processor", "config": normalizer_cfg, "state_file": PRE_STATE[cfg.kind]}
    if cfg.pi05:
        pre = [rename, batch, relative, normalize, {"registry_name": "pi05_prepare_state_tokenizer_processor_step",
                                                    "config": {}}, tokenize, device]
    else:
        pre = [rename, batch, {"registry_name": "pi0_new_line_processor", "config": {}}, tokenize, device, relative,
               normalize]
    assert pre.index(normalize) == int(PRE_STATE[cfg.kind].split("_step_")[1].split("_")[0]), "state file index"
    post = [{"registry_name": "unnormalizer_processor",
             "config": {**normalizer_cfg, "features": dict(lerobot["output_features"])}, "state_file": POST_STATE},
            {"registry_name": "absolute_actions_processor", "config": {"enabled": False}}, device]
    written = []
    for name, steps in (("policy_preprocessor", pre), ("policy_postprocessor", post)):
        (out / f"{name}.json").write_text(json.dumps({"name": name, "steps": steps}, indent=2))
        written.append(f"{name}.json")
    for file in (PRE_STATE[cfg.kind], POST_STATE):  # both hold every feature's stats, as LeRobot's do
        save_file(stats, str(out / file))
        written.append(file)
    return written

