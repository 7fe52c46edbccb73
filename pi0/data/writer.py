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
# SVT-AV1 (LeRobot's encoder) kills the process with SIGFPE on small frames in some builds (PyAV 15.1's: 24 x 24 px
# and below, measured); refused before the encoder sees them
MIN_VIDEO_SIDE = 26


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
                 robot_type: str | None = None, image_stats_frames: int = 100, *, per_episode: bool = False,
                 append: bool = False):
        """per_episode: each episode in files of its own (written under a temporary name, then renamed) and meta/
        rewritten (atomically) after each, so that a process killed while recording loses at most the episode in
        progress and leaves a dataset LeRobot opens. append (per_episode only): continue a dataset written that
        way, after removing the files of an episode its meta/ does not list (one a killed process left)."""
        self.root = Path(root)
        exists = (self.root / "meta" / "info.json").exists()
        if exists and not append:
            raise DatasetError(f"{self.root} already holds a dataset: write into a new directory")
        if append and not per_episode:
            raise DatasetError("appending needs per_episode files (one file per camera and episode)")
        self.fps = fps
        self.per_episode = per_episode
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
        self._earlier_image_stats: dict[str, dict[str, Any]] = {}
        self._stats_every = image_stats_frames
        self._encoders: dict[str, tuple[Any, Any]] = {}
        self._parquet = None
        self.extra_info: dict[str, Any] = {}  # fields kept in meta/info.json beside LeRobot's
        self.root.mkdir(parents=True, exist_ok=True)
        if exists:
            self._resume()

    def _resume(self) -> None:
        """The state of an existing per-episode dataset: its episodes, tasks and rows (for the stats); files of
        episodes its meta/ does not list are removed."""
        from pi0.data.dataset import LeRobotDataset

        info = json.loads((self.root / "meta" / "info.json").read_text())
        theirs = {k: (v.get("dtype"), tuple(v.get("shape", []))) for k, v in info.get("features", {}).items()}
        ours = {k: (v["dtype"], tuple(v["shape"])) for k, v in self.features.items()}
        if theirs != ours or int(info.get("fps", -1)) != self.fps:
            diff = sorted({k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)})
            raise DatasetError(f"{self.root} holds a dataset of other features or fps (fps {info.get('fps')} vs "
                               f"{self.fps}; features that differ: {diff[:6]}): record into a new directory")
        listed: set[Path] = set()
        ds = LeRobotDataset(self.root)
        self.episodes = [{k: v for k, v in e.items() if not k.startswith("stats/")} for e in ds.episodes]
        self.tasks = {task: i for i, task in enumerate(ds.tasks)}
        self.total_frames = sum(e["length"] for e in self.episodes)
        for e in self.episodes:
            listed.add(self.root / self._data_path(e["data/chunk_index"], e["data/file_index"]))
            listed.update(self.root / self._video_path(k, e[f"videos/{k}/chunk_index"], e[f"videos/{k}/file_index"])
                          for k in self.cameras)
        for f in [*(self.root / "data").rglob("*"), *(self.root / "videos").rglob("*")]:
            if f.is_file() and f not in listed:
                f.unlink()  # an episode a killed process was writing
        for k in self.vectors:
            self._rows[k].append(ds.column(k).reshape(len(ds), -1))
        earlier = json.loads((self.root / "meta" / "stats.json").read_text())
        self._earlier_image_stats = {k: earlier[k] for k in self.cameras if k in earlier}
        for k in self.cameras:
            self.features[k]["info"] = info["features"][k].get("info")
        self.extra_info = {k: v for k, v in info.items() if k.startswith("pi0_")}

    @staticmethod
    def _data_path(chunk: int, file: int) -> str:
        return f"data/chunk-{chunk:03d}/file-{file:03d}.parquet"

    @staticmethod
    def _video_path(key: str, chunk: int, file: int) -> str:
        return f"videos/{key}/chunk-{chunk:03d}/file-{file:03d}.mp4"

    def _encoder(self, key: str, height: int, width: int, path: Path | None = None):
        """The camera's encoder: one for the whole dataset, or (`path`: a temporary name) one per episode."""
        if key not in self._encoders:
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only (it prints its whole configuration)
            av = av_module()
            path = path or self.root / self._video_path(key, 0, 0)
            path.parent.mkdir(parents=True, exist_ok=True)
            container = av.open(str(path), "w", format="mp4")
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
        for k in self.cameras:
            h, w = self.features[k]["shape"][:2]
            if min(h, w) < MIN_VIDEO_SIDE:
                raise DatasetError(f"{k}: {h} x {w} px frames; AV1 video needs at least {MIN_VIDEO_SIDE} px a side here "
                                   "(smaller frames crash some builds of its encoder): record larger frames")
        for k in self.cameras + self.vectors:
            want = tuple(self.features[k]["shape"])
            got = np.asarray(frames[k]).shape
            if got != (n, *want):
                raise DatasetError(f"episode {len(self.episodes)}: {k} is {list(got)}, expected [{n}, {', '.join(map(str, want))}]")
        ep_index = len(self.episodes)
        chunk, file = divmod(ep_index, 1000) if self.per_episode else (0, 0)  # LeRobot's 1000 files a chunk
        task_index = self.tasks.setdefault(task, len(self.tasks))
        ep: dict[str, Any] = {"episode_index": ep_index, "tasks": [task], "length": n, "data/chunk_index": chunk,
                              "data/file_index": file, "dataset_from_index": self.total_frames,
                              "dataset_to_index": self.total_frames + n}
        renames: list[tuple[Path, Path]] = []
        for key in self.cameras:
            video = np.asarray(frames[key], dtype=np.uint8)
            final = self.root / self._video_path(key, chunk, file)
            partial = final.with_name(final.name + ".partial") if self.per_episode else None
            container, stream = self._encoder(key, video.shape[1], video.shape[2], partial)
            start = 0.0 if self.per_episode else self.total_frames / self.fps
            for img in video:
                for packet in stream.encode(av_frame(img)):
                    container.mux(packet)
            if self.per_episode:
                self._close_encoder(key)
                renames.append((partial, final))
            ep.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                       f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": start + n / self.fps})
            self._sampled[key].append(video[:: max(1, n // max(1, self._stats_every // 10))].transpose(0, 3, 1, 2))
        columns: dict[str, Any] = {}
        for k in self.vectors:
            v = np.asarray(frames[k], dtype=np.dtype(self.features[k]["dtype"])).reshape(n, -1)
            self._rows[k].append(v)
            # a one-value feature is a plain column, as LeRobot stores (and casts) it
            columns[k] = (pa.array(v.reshape(-1)) if self.features[k]["shape"] == [1]
                          else pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]))
        columns["timestamp"] = pa.array((np.arange(n) / self.fps).astype(np.float32))
        columns["frame_index"] = pa.array(np.arange(n, dtype=np.int64))
        columns["episode_index"] = pa.array(np.full(n, ep_index, dtype=np.int64))
        columns["index"] = pa.array(np.arange(self.total_frames, self.total_frames + n, dtype=np.int64))
        columns["task_index"] = pa.array(np.full(n, task_index, dtype=np.int64))
        table = pa.table(columns)
        if self.per_episode:
            final = self.root / self._data_path(chunk, file)
            final.parent.mkdir(parents=True, exist_ok=True)
            partial = final.with_name(final.name + ".partial")
            pq.write_table(table, str(partial), compression="snappy", use_dictionary=True)
            renames.append((partial, final))
        else:
            if self._parquet is None:
                path = self.root / self._data_path(0, 0)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._parquet = pq.ParquetWriter(str(path), table.schema, compression="snappy", use_dictionary=True)
            self._parquet.write_table(table)
        self.episodes.append(ep)
        self.total_frames += n
        if self.per_episode:  # the episode's files complete (videos first: LeRobot reads every data file), then
            # meta/ that lists it: a kill before the renames leaves only .partial files, which no reader looks at
            for partial, final in renames:
                os.replace(partial, final)
            self.write_meta()
        return ep_index

    def _close_encoder(self, key: str) -> None:
        container, stream = self._encoders.pop(key)
        for packet in stream.encode():
            container.mux(packet)
        container.close()

    def finalize(self) -> Path:
        """Flush the encoders and parquet writer; write meta/ (info, stats, tasks, episodes)."""
        if not self.episodes:
            raise DatasetError(f"{self.root}: no episodes to write")
        for key in list(self._encoders):
            self._close_encoder(key)
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        return self.write_meta()

    def write_meta(self) -> Path:
        """meta/: info, stats, tasks, episodes, each file written under a temporary name and renamed."""
        pq = pyarrow_modules()
        import pyarrow as pa

        meta = self.root / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        _atomic(meta / "episodes" / "chunk-000" / "file-000.parquet",
                lambda path: pq.write_table(pa.Table.from_pylist(self.episodes), str(path)))
        # LeRobot reads this file with pandas and looks a task up by its index: the task string (pandas metadata)
        pandas_meta = {"index_columns": ["task"], "column_indexes": [], "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None}]}
        tasks = pa.table({"task_index": pa.array(list(self.tasks.values()), pa.int64()), "task": pa.array(list(self.tasks))})
        _atomic(meta / "tasks.parquet", lambda path: pq.write_table(
            tasks.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), str(path)))
        stats = {k: vector_stats(np.concatenate(v)) for k, v in self._rows.items()}
        stats.update({k: merge_image_stats([self._earlier_image_stats[k]] if k in self._earlier_image_stats else [],
                                           self._sampled[k]) for k in self.cameras})
        index = np.arange(self.total_frames)
        ep_idx = np.concatenate([np.full(e["length"], e["episode_index"]) for e in self.episodes])
        frame_idx = np.concatenate([np.arange(e["length"]) for e in self.episodes])
        task_idx = np.concatenate([np.full(e["length"], self.tasks[e["tasks"][0]]) for e in self.episodes])
        for k, v in (("index", index), ("episode_index", ep_idx), ("frame_index", frame_idx),
                     ("timestamp", frame_idx / self.fps), ("task_index", task_idx)):
            stats[k] = vector_stats(v[:, None])
        _atomic(meta / "stats.json", lambda path: path.write_text(json.dumps(stats, indent=2)))
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type, "total_episodes": len(self.episodes),
            "total_frames": self.total_frames, "total_tasks": len(self.tasks), "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if self.cameras else None,
            "features": self.features,
            **self.extra_info,
        }
        _atomic(meta / "info.json", lambda path: path.write_text(json.dumps(info, indent=4)))
        return self.root


def _atomic(path: Path, write) -> None:
    """write(tmp) then rename onto `path`: a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def merge_image_stats(earlier: list[dict[str, Any]], sampled: list[np.ndarray]) -> dict[str, Any]:
    """Per-channel image stats of earlier stats (what an appended dataset had) and newly sampled frames, weighted
    by their counts: mean, std, min and max exactly, the quantiles as the count-weighted mean of each part's (as
    LeRobot aggregates its per-episode stats)."""
    parts = list(earlier) + ([image_stats(np.concatenate(sampled))] if sampled else [])
    if len(parts) == 1:
        return parts[0]
    n = np.array([float(np.ravel(p["count"])[0]) for p in parts])
    w = (n / n.sum())[:, None, None, None]
    arr = {k: np.stack([np.asarray(p[k], dtype=np.float64) for p in parts]) for k in parts[0] if k != "count"}
    mean = (w * arr["mean"]).sum(0)
    var = (w * (arr["std"] ** 2 + arr["mean"] ** 2)).sum(0) - mean ** 2
    out = {"min": arr["min"].min(0), "max": arr["max"].max(0), "mean": mean, "std": np.sqrt(np.maximum(var, 0.0))}
    out.update({k: (w * v).sum(0) for k, v in arr.items() if k.startswith("q")})
    res = {k: v.tolist() for k, v in out.items()}
    res["count"] = [int(n.sum())]
    return res


def av_frame(image_hwc: np.ndarray):
    av = av_module()
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image_hwc), format="rgb24")
