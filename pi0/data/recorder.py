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
        self._open: dict[Any, tuple[str, list[dict[str, Any]]]] = {}  # episodes in progress: key -> (task, frames)
        self.recorded_episodes = self.dropped_episodes = self.dropped_frames = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._write, name="pi0-recorder", daemon=True)
        self._thread.start()

    def add(self, frame: dict[str, Any], task: str, *, intervention: bool = False, chunk_index: int = 0,
            latency_s: float = 0.0, key: Any = None) -> None:
        """One control step: the robot's features (LeRobot's names) and the action executed. key: which episode in
        progress it belongs to, where several are recorded at once (a server's connections)."""
        task0, frames = self._open.setdefault(key, (task, []))
        if task != task0:
            raise ValueError(f"an episode has one task: this one is {task0!r}, the frame says {task!r} "
                             "(end_episode() first)")
        frames.append({**frame, "intervention": [bool(intervention)], "chunk_index": [int(chunk_index)],
                       "latency_s": [float(latency_s)]})

    def end_episode(self, success: bool | None = None, key: Any = None) -> bool:
        """The episode ends here (`success`: whether the task was solved, None if not known). Returns whether it was
        queued for writing (False: no frames, or the writer is behind and it was dropped)."""
        task, frames = self._open.pop(key, (None, []))
        if not frames:
            return False
        n = len(frames)
        try:
            self._queue.put_nowait((frames, task, bool(success)))  # stacked by the writer, not by the robot's loop
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
                frames, task, success = item
                n = len(frames)
                episode = {k: np.stack([np.asarray(f[k]) for f in frames]) for k in frames[0]}
                episode["next.done"] = (np.arange(n) == n - 1)[:, None]
                episode["next.success"] = np.full((n, 1), False) if not success else (np.arange(n) == n - 1)[:, None]
                self.writer.add_episode(episode, task)
                self.recorded_episodes += 1
            except Exception as e:  # noqa: BLE001 - reported by close(); the robot keeps moving
                self.error = e
                log.error("recorder: episode not written: %s", e)
            finally:
                self._queue.task_done()

    def close(self, success: bool | None = None) -> dict[str, Any]:
        """End the episodes in progress (if any), write what is queued, stop the writer. Returns the counts."""
        for key in list(self._open):
            self.end_episode(success, key)
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise DatasetError(f"{self.root}: recording failed: {self.error}") from self.error
        return {"root": str(self.root), "episodes": self.recorded_episodes, "dropped_episodes": self.dropped_episodes,
                "dropped_frames": self.dropped_frames, "total_episodes": len(self.writer.episodes)}


class ObservationRecorder:
    """A `Recorder` for a robot's own observation dicts, its features taken from the first one: every image (a 3-D
    uint8 array, HWC or CHW) as `observation.images.<its key's last part>` (HWC), the numeric vectors concatenated in
    key order as `observation.state`, "prompt" as the task; the action's width from the first action (`action`),
    and, where whole chunks are recorded (a server), the chunk flattened as `action.chunk`. A frame of another shape
    than the first is not recorded (counted in `mismatched`), never raised into the caller's loop."""

    SKIP = ("prompt", "task", "rtc", "episode_done", "episode_success")  # request fields that are no robot features

    def __init__(self, root: str | os.PathLike, *, fps: int, robot_type: str | None = None, max_queue: int = 4,
                 info: dict[str, Any] | None = None):
        self.root, self.fps, self.robot_type, self.max_queue, self.info = Path(root), fps, robot_type, max_queue, info
        self.recorder: Recorder | None = None
        self.layout: tuple[list[tuple[str, str]], list[str]] | None = None  # (images: key -> feature, state keys)
        self.mismatched = 0
        self.error: Exception | None = None  # the recording could not start (another dataset in `root`, say)

    def _features(self, obs: dict[str, Any], action: np.ndarray, chunk: np.ndarray | None) -> None:
        images, state, feats = [], [], {}
        for key, value in obs.items():
            if not isinstance(key, str) or key in self.SKIP:
                continue
            a = np.asarray(value)
            if a.dtype == np.uint8 and a.ndim == 3 and 3 in (a.shape[0], a.shape[-1]):
                name = "observation.images." + key.replace("/", ".").split(".")[-1]
                feats[name] = {"dtype": "video", "shape": _hwc(a).shape, "names": ["height", "width", "channels"]}
                images.append((key, name))
            elif a.dtype.kind in "uif" and a.ndim <= 1:
                state.append(key)
        if state:
            width = sum(np.asarray(obs[k]).size for k in state)
            feats["observation.state"] = {"dtype": "float32", "shape": (width,), "names": None}
        feats["action"] = {"dtype": "float32", "shape": (action.size,), "names": None}
        if chunk is not None:
            feats["action.chunk"] = {"dtype": "float32", "shape": (chunk.size,), "names": None}
        self.layout = (images, state)
        self.recorder = Recorder(self.root, fps=self.fps, features=feats, robot_type=self.robot_type,
                                 max_queue=self.max_queue, info={**(self.info or {}), "keys": {k: n for k, n in images}
                                                                 | {"observation.state": state}})

    def add(self, obs: dict[str, Any], action: np.ndarray, *, chunk: np.ndarray | None = None, chunk_index: int = 0,
            latency_s: float = 0.0, intervention: bool = False, key: Any = None) -> bool:
        """One step (or one request): the observation, the action executed (or the chunk's first) and, optionally,
        the whole chunk returned. Returns whether it was recorded."""
        if self.error is not None:
            return False
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        chunk = None if chunk is None else np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self.recorder is None:
            try:
                self._features(obs, action, chunk)
            except Exception as e:  # noqa: BLE001 - said once; the caller's loop goes on without recording
                self.error = e
                log.error("recording into %s cannot start: %s", self.root, e)
                return False
        images, state = self.layout
        try:
            frame = {name: _hwc(np.asarray(obs[k])) for k, name in images}
            if state:
                frame["observation.state"] = np.concatenate([np.asarray(obs[k], np.float32).reshape(-1) for k in state])
            frame["action"] = action
            if chunk is not None:
                frame["action.chunk"] = chunk
            feats = self.recorder.features
            if any(np.shape(v) != tuple(feats[k]["shape"]) for k, v in frame.items()):
                raise ValueError("another shape")
            task = obs.get("prompt", obs.get("task", ""))  # openpi's name for the instruction, or LeRobot's
            task = task.decode() if isinstance(task, bytes) else str(task)
        except (KeyError, ValueError, TypeError):
            self.mismatched += 1
            return False
        self.recorder.add(frame, task, intervention=intervention, chunk_index=chunk_index, latency_s=latency_s, key=key)
        return True

    def end_episode(self, success: bool | None = None, key: Any = None) -> bool:
        return False if self.recorder is None else self.recorder.end_episode(success, key)

    def close(self) -> dict[str, Any]:
        out = self.recorder.close() if self.recorder is not None else {"root": str(self.root), "episodes": 0}
        return {**out, "mismatched": self.mismatched, "error": None if self.error is None else str(self.error)}


def _hwc(a: np.ndarray) -> np.ndarray:
    return a if a.shape[-1] == 3 else a.transpose(1, 2, 0)
