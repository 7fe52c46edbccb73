"""Robot-side processing: images (against openpi-client's own resize), prompts, normalisation."""

import numpy as np
import pytest

from pi0.robot.assets import find_tokenizer
from pi0.robot.images import image_to_model, resize_with_pad_uint8, to_uint8_hwc
from pi0.robot.normalize import Normalizer, Stats
from pi0.robot.presets import _gripper_from_angular, _gripper_to_angular
from pi0.robot.tokenizer import PromptTokenizer


@pytest.mark.parametrize("shape", [(480, 640, 3), (240, 100, 3), (224, 224, 3), (50, 300, 3)])
def test_resize_with_pad_is_openpis(shape):
    image_tools = pytest.importorskip("openpi_client.image_tools")
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ours = resize_with_pad_uint8(img, 224, 224)
    theirs = image_tools.resize_with_pad(img[None], 224, 224)[0]
    assert ours.shape == (224, 224, 3)
    assert np.array_equal(ours, theirs)


def test_image_formats():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    chw = np.transpose(u8, (2, 0, 1))
    f = u8.astype(np.float32) / 255.0
    assert np.array_equal(to_uint8_hwc(chw), u8)
    assert np.abs(to_uint8_hwc(f).astype(int) - u8).max() <= 1
    x = image_to_model(u8, 28)
    assert x.shape == (3, 28, 28) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    for bad, msg in [(np.zeros((9, 9)), "HWC or CHW"), (np.zeros((4, 9, 9)), "3 channels"),
                     (np.full((9, 9, 3), 2.0), r"\[0, 1\]"), (np.full((9, 9, 3), np.nan), "NaN"),
                     (np.array([["a"]]), "dtype"), (np.zeros((5, 5, 3), np.uint8), "at least 8 px"),
                     (np.zeros((9, 200, 3), np.uint8), "aspect ratio up to 16:1")]:
        with pytest.raises(ValueError, match=msg):
            to_uint8_hwc(bad)


def test_pi0_prompt_format(tokenizer_path):
    tok = PromptTokenizer(tokenizer_path, max_len=48)
    ids, mask = tok("  pick_up the red cup\n")
    sp = tok.sp
    want = [2] + sp.encode("pick up the red cup") + sp.encode("\n")
    assert ids[: len(want)].tolist() == want
    assert mask.tolist() == [True] * len(want) + [False] * (48 - len(want))
    assert (ids[len(want):] == 0).all() and ids.dtype == np.int64


def test_prompt_truncation_warns(tokenizer_path, caplog):
    tok = PromptTokenizer(tokenizer_path, max_len=6)
    ids, mask = tok("pick up the red cup and put the block in the bowl")
    assert mask.all() and len(ids) == 6 and ids[0] == 2
    assert "truncated" in caplog.text


def test_pi05_prompt_has_the_discretised_state(tokenizer_path):
    tok = PromptTokenizer(tokenizer_path, max_len=200)
    state = np.array([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0])
    bins = PromptTokenizer.discretize(state)
    assert bins.tolist() == (np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1).tolist()
    assert bins[0] == 0 and bins[-1] == 255 and bins[2] == 128
    ids, mask = tok("fold the towel", state)
    expected = "Task: fold the towel, State: " + " ".join(map(str, bins)) + ";\nAction: "
    assert ids[mask].tolist() == tok.sp.encode(expected, add_bos=True)
    assert tok.sp.decode(ids[mask].tolist()) == expected.rstrip()  # decode drops the trailing space
    assert ids[0] == 2


def test_normalisation_round_trips():
    rng = np.random.default_rng(2)
    st = Stats(mean=rng.normal(size=5).astype(np.float32), std=rng.uniform(0.5, 2, 5).astype(np.float32),
               q01=np.full(5, -2, np.float32), q99=np.full(5, 3, np.float32))
    x = rng.normal(size=(10, 7)).astype(np.float32)  # 2 dims beyond the stats pass through
    for mode in ("MEAN_STD", "QUANTILES"):
        n = Normalizer(st, st, mode, mode)
        back = n.actions_out(n.state_in(x))
        assert np.allclose(back, x, atol=1e-5)
        assert np.array_equal(n.state_in(x)[:, 5:], x[:, 5:])
    z = Normalizer(st, st, "MEAN_STD", "MEAN_STD").state_in(x[0])
    assert np.allclose(z[:5], (x[0, :5] - st.mean) / (st.std + 1e-6))
    qn = Normalizer(st, st, "QUANTILES", "QUANTILES").state_in(x[0])
    assert np.allclose(qn[:5], (x[0, :5] + 2) / (5 + 1e-6) * 2 - 1)
    ident = Normalizer(st, st, "IDENTITY", "MEAN_STD")
    assert np.array_equal(ident.state_in(x[0]), x[0]) and not np.allclose(ident.actions_out(x), x)
    with pytest.raises(ValueError, match="unknown normalisation mode"):
        Normalizer(st, st, "MIN_MAX", "QUANTILES")


def test_aloha_gripper_maps():
    x = np.array([0.0, 0.5, 1.0])
    ang = _gripper_to_angular(x)
    assert np.all(np.diff(ang) > 0)  # monotone: closed -> open
    assert np.allclose(_gripper_from_angular(np.array([0.0])), (0.5476 + 0.6213) / (1.4910 + 0.6213))


def test_missing_tokenizer_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PI0_TOKENIZER", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        find_tokenizer(tmp_path / "nope.model", tmp_path)
    msg = str(e.value)
    assert "nope.model" in msg and "paligemma_tokenizer.model" in msg and "--tokenizer" in msg
