"""The episodes the recorder tests record (and tools/make_record_fixtures.py, for LeRobot to read): frames whose
values say which episode and step they are."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from pi0.data.recorder import Recorder

SIZE = 32
FEATURES = {
    "observation.images.top": {"dtype": "video", "shape": (SIZE, SIZE, 3), "names": ["height", "width", "channels"]},
    "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
    "action": {"dtype": "float32", "shape": (4,), "names": None},
}


def frame(e: int, i: int) -> dict:
    """Frame i of episode e: a flat image (its shade encodes the frame), a state and an action that encode both."""
    return {"observation.images.top": np.full((SIZE, SIZE, 3), 10 * i + 40 * e, np.uint8),
            "observation.state": np.array([e, i, 0.5, -1], np.float32),
            "action": np.array([i, -e, 0.25, 1], np.float32)}


def record(root, episodes, frames=5, start=0, **kw) -> dict:
    rec = Recorder(root, fps=10, features=FEATURES, robot_type="test", info={"source": "test"}, **kw)
    for e in range(start, start + episodes):
        for i in range(frames):
            rec.add(frame(e, i), f"task {e % 2}", intervention=i == 2, chunk_index=i // 2, latency_s=0.01 * i)
        rec.end_episode(success=e % 2 == 0)
    return rec.close()


def killed_recording(root: Path, episodes: int = 4) -> subprocess.CompletedProcess:
    """`record(root, episodes)` in a process SIGKILLed while the third episode's files are written (complete under
    their temporary names, before the rename that would list them)."""
    repo = Path(__file__).resolve().parents[2]
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(repo)!r})
        import pi0.data.writer as writer
        from tests.data.recording import record
        replace = os.replace

        def dying_replace(src, dst):
            if str(dst).endswith("file-002.parquet"):
                os.kill(os.getpid(), signal.SIGKILL)
            return replace(src, dst)

        writer.os.replace = dying_replace
        record({str(root)!r}, {episodes})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert r.returncode == -signal.SIGKILL, r.stderr
    return r
