"""FAST, π0-FAST's action tokenizer: fitted on chunks, encode then decode gives back the quantised chunk, files round
trip in the reference processor's format, and a sequence that does not decode is reported, never zeros in silence."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tokenizers")
from scipy.fft import dct  # noqa: E402

from pi0.robot.fast import FastDecodeError, FastTokenizer  # noqa: E402


def chunks(n: int, horizon: int = 10, dims: int = 7, seed: int = 0) -> np.ndarray:
    """Smooth normalised action chunks (random walks squashed into [-1, 1]), as robots' actions are."""
    rng = np.random.default_rng(seed)
    return np.tanh(np.cumsum(rng.normal(0, 0.15, (n, horizon, dims)), axis=1) + rng.normal(0, 0.5, (n, 1, dims)))


@pytest.fixture(scope="module")
def fast() -> FastTokenizer:
    return FastTokenizer.fit(chunks(300), scale=10, vocab_size=512)


def test_decode_gives_back_the_quantised_chunk(fast):
    data = chunks(20, seed=1)
    tokens = fast.encode(data)
    assert len(tokens) == 20 and all(isinstance(t, int) for row in tokens for t in row)
    for chunk, row in zip(data, tokens):
        back = fast.decode(row)
        assert np.array_equal(fast.coefficients(back), fast.coefficients(chunk))  # the same integers
        # each coefficient within half a step; the orthonormal inverse keeps the error's norm
        assert np.linalg.norm(back - chunk) <= 0.5 / fast.scale * np.sqrt(chunk.size)
    assert np.mean([len(t) for t in tokens]) < data[0].size  # BPE compresses: fewer tokens than values


def test_coefficients_are_the_orthonormal_dct_frequency_major(fast):
    constant = np.tile(np.linspace(-0.5, 0.5, 7), (10, 1))  # each dimension constant in time: only frequency 0
    coeff = fast.coefficients(constant)
    assert np.all(coeff[1:] == 0) and np.array_equal(coeff[0], np.around(constant[0] * np.sqrt(10) * 10))
    ramp = chunks(1, seed=3)[0]
    assert np.array_equal(fast.coefficients(ramp), np.around(dct(ramp, axis=0, norm="ortho") * 10))


def test_files_round_trip_in_the_processors_format(fast, tmp_path):
    fast.save(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "processor_config.json").read_text())
    assert {k: cfg[k] for k in ("scale", "min_token", "vocab_size", "time_horizon", "action_dim")} == {
        "scale": 10, "min_token": fast.min_token, "vocab_size": 512, "time_horizon": 10, "action_dim": 7}
    assert cfg["processor_class"] == "UniversalActionProcessor"
    again = FastTokenizer.load(tmp_path / "tok")
    data = chunks(5, seed=2)
    assert again.encode(data) == fast.encode(data)
    with pytest.raises(FileNotFoundError, match="processor_config.json missing"):
        FastTokenizer.load(tmp_path)


def test_a_sequence_that_does_not_decode_is_reported(fast):
    good, other = fast.encode(chunks(2, seed=4))
    with pytest.raises(FastDecodeError, match=r"not 10 x 7 = 70"):
        fast.decode(good[:-1] if len(good) > 1 else good + good)
    actions, ok, why = fast.decode_batch([good, good + other, other])
    assert ok.tolist() == [True, False, True] and "not 10 x 7" in why[1] and why[0] == why[2] == ""
    assert np.all(actions[1] == 0) and np.allclose(actions[0], fast.decode(good))


def test_fitting_checks_its_inputs():
    with pytest.raises(ValueError, match="vocab_size 200 leaves no merges"):
        FastTokenizer.fit(chunks(50), vocab_size=200)
    with pytest.raises(ValueError, match="one shape"):
        FastTokenizer.fit([np.zeros((10, 7)), np.zeros((8, 7))])


def test_values_below_the_fitted_range_clip_to_its_floor(fast):
    """As the reference processor: a coefficient under min_token is encoded as min_token (no invalid character)."""
    chunk = chunks(1, seed=5)[0]
    chunk[:, 0] = -40.0  # far below anything fitted
    coeff = fast.coefficients(fast.decode(fast.encode(chunk)[0]))
    assert coeff[0, 0] == fast.min_token and coeff[0, 1:].tolist() == fast.coefficients(chunk)[0, 1:].tolist()


def test_the_command_fits_a_tokenizer_on_a_datasets_chunks(tmp_path, capsys):
    """`pi0 fast-tokenizer`: every window of H frames inside an episode, normalised by the dataset's stats."""
    pytest.importorskip("pyarrow")
    from pi0.cli.main import main
    from pi0.data.dataset import LeRobotDataset
    from pi0.robot.normalize import Normalizer
    from pi0.train.data import dataset_stats
    from tests.train.test_train import write_dataset

    ds_dir = write_dataset(tmp_path / "ds", episodes=5, frames=12, action_dim=3)
    assert main(["fast-tokenizer", "--dataset", str(ds_dir), "--horizon", "6", "--out", str(tmp_path / "tok"),
                 "--vocab-size", "300", "--stride", "2"]) == 0
    assert "FAST tokenizer fitted on 20 chunks of 6 x 3" in capsys.readouterr().out  # 5 episodes x starts 0,2,4,6
    fast = FastTokenizer.load(tmp_path / "tok")
    assert (fast.horizon, fast.action_dim, fast.vocab_size) == (6, 3, 300)
    ds = LeRobotDataset(ds_dir)
    chunk = Normalizer(None, dataset_stats(ds, "action"), action_mode="QUANTILES").actions_in(ds.column("action")[:6])
    assert np.array_equal(fast.coefficients(fast.decode(fast.encode(chunk)[0])), fast.coefficients(chunk))
    assert main(["fast-tokenizer", "--dataset", str(ds_dir), "--horizon", "13", "--out", str(tmp_path / "x")]) == 2
    assert "no episode has 13 frames" in capsys.readouterr().err


def test_a_coefficient_the_fitting_chunks_never_held_still_encodes():
    """Fitted on small chunks, asked for larger ones (a padded chunk at an episode's end, a new motion): every value
    round trips (an alphabet of the values seen, as the reference processor's, drops the others without a word)."""
    fast = FastTokenizer.fit(chunks(30) * 0.2, vocab_size=300)
    big = chunks(5, seed=9) * 1.5
    for chunk, tokens in zip(big, fast.encode(big)):
        assert np.array_equal(fast.coefficients(fast.decode(tokens)), np.maximum(fast.coefficients(chunk), fast.min_token))
