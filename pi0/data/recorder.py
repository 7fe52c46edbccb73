"""Recording episodes as they happen, into a LeRobot v3 dataset: frames gathered per episode by the control loop,
each finished episode written by a background thread, so that recording never stalls the robot."""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pi0.data.dataset import DatasetError
from pi0.data.writer import LeRobotDatasetWriter

log = logging.getLogger("pi0.record")

# what every recorded frame carries beside the robot's own features
RECORDED = {
    "intervention": {"dtype": "bool", "shape": (1,), "names": None},  # the action came from a person / an expert
    "next.done": {"dtype": "bool", "shape": (1,), "names": None},  # the episode's last frame
    "next.success": {"dtype": "bool", "shape": (1,), "names": None},  # the task solved (False where unknown)
    "chunk_index": {"dtype": "int64", "shape": (1,), "names": None},  # which action chunk of the episode
    "latency_s": {"dtype": "float32", "shape": (1,), "names": None},  # that chunk's inference seconds
}


class Recorder:
    """A LeRobot v3 dataset recorded frame by frame. `add(frame, task)` from the control loop (no I/O: the frame is
    kept in memory), `end_episode(success)` hands the episode to a background writer through a bounded queue; when
    the queue is full the episode is dropped and counted (`dropped_episodes`), never waited for. Every episode is
    written in files of its own with meta/ rewritten after it, so a killed process loses at most the episode in
    progress (and the ones still queued) and leaves a dataset LeRobot 0.6.1 opens; recording into an existing
    dataset of the same features appends to it.

    features: the robot's features as LeRobot names them (`observation.images.*` video [H, W, 3], vectors); the
    `RECORDED` ones are added. info: how it was recorded, kept in meta/info.json's "pi0_record" (one entry per
    session that wrote into the dataset)."""

    def __init__(self, root: str | os.PathLike, *, fps: int, features: dict[str, dict[str, Any]],
                 robot_type: str | None = None, max_queue: int = 4, info: dict[str, Any] | None = None):
        clash = sorted(set(features) & set(RECORDED))
        if clash:
            raise DatasetError(f"features {clash} are the recorder's own: name the robot's features otherwise")
        self.root = Path(root)
        self.features = {**features, **RECORDED}
        self.writer = LeRobotDatasetWriter(self.root, fps=fps, features=self.features, robot_type=robot_type,
                                           per_episode=True, append=(self.root / "meta" / "info.json").exists())
        # one entry per recording session that wrote into the dataset
        self.writer.extra_info["pi0_record"] = [*self.writer.extra_info.get("pi0_record", []), dict(info or {})]
        self.frames: list[dict[str, Any]] = []
        self.task: str | None = None
        self.recorded_episodes = self.dropped_episodes = self.dropped_frames = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._write, name="pi0-recorder", daemon=True)
        self._thread.start()

    def add(self, frame: dict[str, Any], task: str, *, intervention: bool = False, chunk_index: int = 0,
            latency_s: float = 0.0) -> None:
        """One control step: the robot's features (LeRobot's names) and the action executed."""
        if self.task is not None and task != self.task:
            raise ValueError(f"an episode has one task: this one is {self.task!r}, the frame says {task!r} "
                             "(end_episode() first)")
        self.task = task
        self.frames.append({**frame, "intervention": [bool(intervention)], "chunk_index": [int(chunk_index)],
                            "latency_s": [float(latency_s)]})

    def end_episode(self, success: bool | None = None) -> bool:
        """The episode ends here (`success`: whether the task was solved, None if not known). Returns whether it was
        queued for writing (False: no frames, or the writer is behind and it was dropped)."""
        frames, task = self.frames, self.task
        self.frames, self.task = [], None
        if not frames:
            return False
        episode = {k: np.stack([np.asarray(f[k]) for f in frames]) for k in frames[0]}
        n = len(frames)
        episode["next.done"] = (np.arange(n) == n - 1)[:, None]
        episode["next.success"] = np.full((n, 1), False) if not success else (np.arange(n) == n - 1)[:, None]
        try:
            self._queue.put_nowait((episode, task))
            return True
        except queue.Full:
            self.dropped_episodes += 1
            self.dropped_frames += n
            log.warning("recorder: the writer is behind (%d episodes queued); episode of %d frames dropped (%d so "
                        "far)", self._queue.maxsize, n, self.dropped_episodes)
            return False

    def _write(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                episode, task = item
                self.writer.add_episode(episode, task)
                self.recorded_episodes += 1
            except Exception as e:  # noqa: BLE001 - reported by close(); the robot keeps moving
                self.error = e
                log.error("recorder: episode not written: %s", e)
            finally:
                self._queue.task_done()

    def close(self, success: bool | None = None) -> dict[str, Any]:
        """End the episode in progress (if any), write what is queued, stop the writer. Returns the counts."""
        self.end_episode(success)
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise DatasetError(f"{self.root}: recording failed: {self.error}") from self.error
        return {"root": str(self.root), "episodes": self.recorded_episodes, "dropped_episodes": self.dropped_episodes,
                "dropped_frames": self.dropped_frames, "total_episodes": len(self.writer.episodes)}
