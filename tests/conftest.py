import os
import warnings

# Under pytest-xdist (`make test` runs a few workers) the cores are shared out: each worker, and every process it
# starts, gets cores / workers threads (OpenMP threads spinning on more threads than cores slow everything down
# several-fold). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
import torch  # noqa: E402

import pi0

# A compiled kernel that hits Dynamo's recompile limit silently runs eager ops from then on: in tests, an error
torch._dynamo.config.fail_on_recompile_limit_hit = True

# dtype "auto" is bf16 on CPUs with native bf16 and fp32 elsewhere, so a test that lets it choose checks only the
# side of the CPU it runs on. Here no test may let it choose unseen: outside the tests marked `auto_dtype`,
# PI0_NATIVE_BF16 holds a value that makes "auto" raise (in this process and the ones it starts), and every marked
# test runs twice, as on a CPU with native bf16 and as on one without (PI0_NATIVE_BF16=1 and =0).
UNPINNED = "unpinned: this test lets dtype 'auto' choose; pin a dtype or mark the test auto_dtype"


def pytest_configure(config):
    os.environ["PI0_NATIVE_BF16"] = UNPINNED  # for module- and session-scoped fixtures too (under pytest only)
    config.addinivalue_line("markers", "auto_dtype: lets dtype 'auto' choose: runs with PI0_NATIVE_BF16=1 and =0")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("auto_dtype"):
        metafunc.parametrize("native_bf16_side", ["bf16", "fp32"], indirect=True)


@pytest.fixture(autouse=True)
def native_bf16_side(request, monkeypatch):
    """PI0_NATIVE_BF16 for one test: 1 or 0 for `auto_dtype` tests, else the value that makes "auto" raise."""
    side = getattr(request, "param", None)
    monkeypatch.setenv("PI0_NATIVE_BF16", {"bf16": "1", "fp32": "0", None: UNPINNED}[side])
    return side

warnings.filterwarnings("ignore", message="SigLIP width .* records no head count")


def make_noise(cfg: pi0.Pi0Config, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))


def make_obs(cfg: pi0.Pi0Config, batch: int, valid, masked=(), seed: int = 0) -> pi0.Observation:
    """A synthetic observation whose rows have `valid[b]` prompt tokens (the rest padding, id 0) and
    whose (camera, row) pairs in `masked` are masked."""
    obs = pi0.sample_observation(cfg, batch_size=batch, num_valid_tokens=max(valid), seed=seed)
    for b, n in enumerate(valid):
        obs.token_masks[b, n:] = False
        obs.tokens[b, n:] = 0
    for cam, row in masked:
        obs.image_masks[cam][row] = False
    return obs


@pytest.fixture(scope="session", params=["tiny", "tiny-pi05"])
def tiny_model(request):
    return pi0.build_model(pi0.size_config(request.param), seed=3)


def train_tokenizer(path, vocab_size: int = 300) -> str:
    """A small SentencePiece model trained on the fly, with PaliGemma's special ids (pad 0, eos 1, bos 2)
    and "\\n" as a symbol, to check the prompt formatting rules without the real 4 MB tokenizer."""
    import sentencepiece as spm

    words = ("pick up the red cup put the block in the bowl open close drawer move left right arm gripper "
             "task state action fold towel stack cubes push button").split()
    rng = __import__("random").Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(8)) + f" {rng.randint(0, 255)}" for _ in range(2000)]
    sentences += [f"Task: {rng.choice(words)} {rng.choice(words)}, State: {rng.randint(0, 255)} {rng.randint(0, 255)};\nAction: "
                  for _ in range(500)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(path), vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, user_defined_symbols=["\n", ":", ",", ";"], character_coverage=1.0, minloglevel=2,
        hard_vocab_limit=False,
    )
    return str(path) + ".model"


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("sp") / "paligemma_tokenizer")


def write_policy_checkpoint(directory, preset_name: str, tokenizer: str, layout: str = "openpi", seed: int = 0,
                            robot_dim: int = 8, action_dim: int = 7, stats: bool = True):
    """A tiny checkpoint as a user has it: weights, config.json, the tokenizer beside them, and openpi
    norm stats under assets/<asset_id>/."""
    import json
    import shutil
    from pathlib import Path

    import numpy as np

    d = Path(directory)
    pi0.save_model(pi0.build_model(pi0.size_config(preset_name), seed=seed), d, layout=layout)
    shutil.copy(tokenizer, d / "paligemma_tokenizer.model")
    if stats:
        rng = np.random.default_rng(seed)
        def st(n):
            q01 = rng.uniform(-2, -1, n)
            return {"mean": rng.normal(0, 1, n).tolist(), "std": rng.uniform(0.5, 2, n).tolist(),
                    "q01": q01.tolist(), "q99": (q01 + rng.uniform(1, 3, n)).tolist()}
        (d / "assets" / "robot").mkdir(parents=True)
        (d / "assets" / "robot" / "norm_stats.json").write_text(
            json.dumps({"norm_stats": {"state": st(robot_dim), "actions": st(action_dim)}}))
    return d


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `pi0` command a test starts: the test's own, without compiled kernels (each new process
    would spend ~10 s probing them; the engine's tests check them in process, test_bench_json_reports_every_field
    and the README's commands through the command line), plus `extra`."""
    return {**os.environ, "PI0_COMPILE": "0", **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, port: int, timeout_s: float) -> None:
    """Until GET /healthz answers 200 (the server process must stay alive meanwhile)."""
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the server did not come up"
        time.sleep(0.5)
