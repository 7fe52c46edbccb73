"""Writing LeRobot v3 datasets: episodes appended as parquet rows and encoded video, with meta/info.json, tasks,
episodes and stats as LeRobot writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pi0.data.dataset import (
    CAMERA_DTYPES,
    CODEBASE_VERSION,
    DEFAULT_FEATURES,
    DatasetError,
    av_module,
    pyarrow_modules,
)

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)


def vector_stats(x: np.ndarray) -> dict[str, list]:
    """min, max, mean, std, count and q01..q99 per dimension of [N, D] values (exact quantiles, linear
    interpolation; LeRobot approximates them per episode with histograms and averages those)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = np.quantile(x, q, axis=0)
    return {k: v.tolist() for k, v in out.items()}


def image_stats(frames: np.ndarray) -> dict[str, list]:
    """Per-channel stats of uint8 [N, 3, H, W] frames in [0, 1], shaped (3, 1, 1) as LeRobot writes them."""
    x = frames.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    out = {"min": x.min(1), "max": x.max(1), "mean": x.mean(1), "std": x.std(1)}
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = np.quantile(x, q, axis=1)
    res = {k: v.reshape(3, 1, 1).tolist() for k, v in out.items()}
    res["count"] = [len(frames)]
    return res


class LeRobotDatasetWriter:
    """Writes a LeRobot v3 dataset episode by episode: `add_episode(frames, task)` then `finalize()`.

    features: name -> {"dtype": "video" | "float32" | ..., "shape": [...], "names": [...]} as LeRobot's
    `hw_to_dataset_features` gives them (cameras (H, W, 3)). Camera streams are AV1 mp4 (LeRobot's encoder
    settings: libsvtav1, yuv420p, GOP 2, CRF 30, preset 12), every episode appended to one file per camera, and
    the frames to one parquet file (one row group per episode)."""

    def __init__(self, root: str | os.PathLike, fps: int, features: dict[str, dict[str, Any]],
                 robot_type: str | None = None, image_stats_frames: int = 100):
        self.root = Path(root)
        if (self.root / "meta" / "info.json").exists():
            raise DatasetError(f"{self.root} already holds a dataset: write into a new directory")
        self.fps = fps
        self.features = {k: {**v, "shape": list(v["shape"])} for k, v in features.items()}
        for k in self.features:
            if "/" in k:
                raise DatasetError(f"feature name {k!r} contains '/': LeRobot's feature names may not")
        self.features.update({k: {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
                              for k in DEFAULT_FEATURES})
        self.cameras = [k for k, v in features.items() if v["dtype"] == "video"]
        self.vectors = [k for k, v in features.items() if v["dtype"] not in CAMERA_DTYPES]
        self.robot_type = robot_type
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        self.total_frames = 0
        self._rows: dict[str, list[np.ndarray]] = {k: [] for k in self.vectors}
        self._sampled: dict[str, list[np.ndarray]] = {k: [] for k in self.cameras}
        self._stats_every = image_stats_frames
        self._encoders: dict[str, tuple[Any, Any]] = {}
        self._parquet = None
        self.root.mkdir(parents=True, exist_ok=True)

    def _encoder(self, key: str, height: int, width: int):
        if key not in self._encoders:
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only (it prints its whole configuration)
            av = av_module()
            path = self.root / "videos" / key / "chunk-000" / "file-000.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(path), "w")
            stream = container.add_stream("libsvtav1", self.fps,
                                          options={"g": "2", "crf": "30", "preset": "12", "svtav1-params": "fast-decode=0"})
            stream.pix_fmt, stream.width, stream.height = "yuv420p", width, height
            self._encoders[key] = (container, stream)
            f = self.features[key]
            f["info"] = {"video.height": height, "video.width": width, "video.codec": "av1", "video.pix_fmt": "yuv420p",
                         "video.fps": self.fps, "video.channels": 3, "has_audio": False, "video.g": 2, "video.crf": 30,
                         "video.preset": 12, "video.fast_decode": 0, "video.video_backend": "pyav",
                         "video.extra_options": {}, "is_depth_map": False}
        return self._encoders[key]

    def add_episode(self, frames: dict[str, np.ndarray], task: str) -> int:
        """frames: per feature an array with one row per frame (cameras uint8 [N, H, W, 3]). Returns the
        episode's index."""
        import av as _unused  # noqa: F401 - fail before anything is written when PyAV is missing

        pq = pyarrow_modules()
        import pyarrow as pa

        missing = [k for k in self.cameras + self.vectors if k not in frames]
        if missing:
            raise DatasetError(f"episode {len(self.episodes)} lacks features {missing}")
        n = len(frames[self.vectors[0]] if self.vectors else frames[self.cameras[0]])
        for k in self.cameras + self.vectors:
            want = tuple(self.features[k]["shape"])
            got = np.asarray(frames[k]).shape
            if got != (n, *want):
                raise DatasetError(f"episode {len(self.episodes)}: {k} is {list(got)}, expected [{n}, {', '.join(map(str, want))}]")
        ep_index = len(self.episodes)
        task_index = self.tasks.setdefault(task, len(self.tasks))
        ep: dict[str, Any] = {"episode_index": ep_index, "tasks": [task], "length": n, "data/chunk_index": 0,
                              "data/file_index": 0, "dataset_from_index": self.total_frames,
                              "dataset_to_index": self.total_frames + n}
        for key in self.cameras:
            video = np.asarray(frames[key], dtype=np.uint8)
            container, stream = self._encoder(key, video.shape[1], video.shape[2])
            start = self.total_frames / self.fps
            for img in video:
                for packet in stream.encode(av_frame(img)):
                    container.mux(packet)
            ep.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                       f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": start + n / self.fps})
            self._sampled[key].append(video[:: max(1, n // max(1, self._stats_every // 10))].transpose(0, 3, 1, 2))
        columns: dict[str, Any] = {}
        for k in self.vectors:
            v = np.asarray(frames[k], dtype=np.dtype(self.features[k]["dtype"])).reshape(n, -1)
            self._rows[k].append(v)
            columns[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
        columns["timestamp"] = pa.array((np.arange(n) / self.fps).astype(np.float32))
        columns["frame_index"] = pa.array(np.arange(n, dtype=np.int64))
        columns["episode_index"] = pa.array(np.full(n, ep_index, dtype=np.int64))
        columns["index"] = pa.array(np.arange(self.total_frames, self.total_frames + n, dtype=np.int64))
        columns["task_index"] = pa.array(np.full(n, task_index, dtype=np.int64))
        table = pa.table(columns)
        if self._parquet is None:
            path = self.root / "data" / "chunk-000" / "file-000.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._parquet = pq.ParquetWriter(str(path), table.schema, compression="snappy", use_dictionary=True)
        self._parquet.write_table(table)
        self.episodes.append(ep)
        self.total_frames += n
        return ep_index

    def finalize(self) -> Path:
        """Flush the encoders and parquet writer; write meta/ (info, stats, tasks, episodes)."""
        pq = pyarrow_modules()
        import pyarrow as pa

        if not self.episodes:
            raise DatasetError(f"{self.root}: no episodes to write")
        for container, stream in self._encoders.values():
            for packet in stream.encode():
                container.mux(packet)
            container.close()
        self._parquet.close()
        meta = self.root / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.episodes), str(meta / "episodes" / "chunk-000" / "file-000.parquet"))
        # LeRobot reads this file with pandas and looks a task up by its index: the task string (pandas metadata)
        pandas_meta = {"index_columns": ["task"], "column_indexes": [], "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None}]}
        tasks = pa.table({"task_index": pa.array(list(self.tasks.values()), pa.int64()), "task": pa.array(list(self.tasks))})
        pq.write_table(tasks.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), str(meta / "tasks.parquet"))
        stats = {k: vector_stats(np.concatenate(v)) for k, v in self._rows.items()}
        stats.update({k: image_stats(np.concatenate(v)) for k, v in self._sampled.items()})
        index = np.arange(self.total_frames)
        ep_idx = np.concatenate([np.full(e["length"], e["episode_index"]) for e in self.episodes])
        frame_idx = np.concatenate([np.arange(e["length"]) for e in self.episodes])
        task_idx = np.concatenate([np.full(e["length"], self.tasks[e["tasks"][0]]) for e in self.episodes])
        for k, v in (("index", index), ("episode_index", ep_idx), ("frame_index", frame_idx),
                     ("timestamp", frame_idx / self.fps), ("task_index", task_idx)):
            stats[k] = vector_stats(v[:, None])
        (meta / "stats.json").write_text(json.dumps(stats, indent=2))
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type, "total_episodes": len(self.episodes),
            "total_frames": self.total_frames, "total_tasks": len(self.tasks), "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if self.cameras else None,
            "features": self.features,
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4))
        return self.root


def av_frame(image_hwc: np.ndarray):
    av = av_module()
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image_hwc), format="rgb24")
