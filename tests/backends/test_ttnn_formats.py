"""The TTNN backend where ttnn is not needed (every Python): the format each tensor takes on the device, as `pi0
inspect` shows it, and the message a Python without ttnn gives."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import pi0
from pi0.backends.ttnn.weights import device_format, format_table
from pi0.model.config import canonical_shapes


@pytest.mark.parametrize("size", ["pi0", "pi05"])
def test_every_tensor_has_a_stated_format(size):
    shapes = canonical_shapes(pi0.size_config(size))
    formats = {name: device_format(name, exact=False)[0] for name in shapes}
    mlp = [n for n in shapes if ".mlp." in n and n.endswith(".weight")]
    assert mlp and all(formats[n] == "bfloat8_b" for n in mlp)
    assert {formats[n] for n in shapes if n not in mlp} == {"bfloat16"}
    assert {device_format(n, exact=True)[0] for n in shapes} == {"float32"}
    table = format_table(shapes)
    assert sum(r["tensors"] for r in table.values()) == len(shapes)
    share = sum(r["params"] for k, r in table.items() if k.startswith("bfloat8_b")) / sum(
        torch.Size(s).numel() for s in shapes.values())
    assert 0.65 < share < 0.75  # the docs' 71 % (pi0) and 69 % (pi0.5)


def test_inspect_shows_each_tensors_format(tmp_path, capsys):
    from pi0.cli.main import main

    pi0.save_model(pi0.build_model(pi0.size_config("tiny"), seed=0), tmp_path / "ck")
    assert main(["inspect", str(tmp_path / "ck"), "--json"]) == 0
    formats = json.loads(capsys.readouterr().out)["ttnn_formats"]
    assert formats["vlm.layers.1.mlp.down_proj.weight"] == "bfloat8_b"
    assert formats["expert.layers.0.self_attn.q_proj.weight"] == "bfloat16"
    assert len(formats) == len(canonical_shapes(pi0.size_config("tiny")))
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "the TTNN backend's device formats" in out and "bfloat8_b: Gemma MLP weight" in out


@pytest.mark.skipif(importlib.util.find_spec("ttnn") is not None, reason="ttnn is installed here")
def test_without_ttnn_the_backend_says_how_to_get_it():
    with pytest.raises(ImportError, match=r"pip install 'pi0\[ttnn\]' under Python 3.12"):
        pi0.build_model(pi0.size_config("tiny"), backend="ttnn", dtype="float32", device="cpu")
