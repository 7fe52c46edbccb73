"""LeRobot's dataset format v3 (../shared/spec/lerobot_dataset_v3.md), read and written without LeRobot:
parquet through pyarrow, camera streams through PyAV (`pip install 'pi0[train]'`).

`LeRobotDataset(root_or_repo_id, action_horizon=H)` gives what LeRobot 0.6.1's loader gives with
`delta_timestamps={"action": [k / fps for k < H]}`: per frame the cameras (uint8 CHW), the state, the next H
actions (rows past the episode's end repeat its last action, `action_is_pad` marks them), the task string and
the indices. `LeRobotDatasetWriter` writes episodes in the same format (AV1 mp4 as LeRobot encodes them).
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

CODEBASE_VERSION = "v3.0"
DEFAULT_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
CAMERA_DTYPES = ("video", "image")


class DatasetError(ValueError):
    """A dataset that cannot be read as asked: the message names the file (and episode) at fault."""


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("LeRobot datasets need pyarrow and PyAV: pip install 'pi0[train]'") from e
    return pq


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("LeRobot datasets with videos need PyAV: pip install 'pi0[train]'") from e
    return av


def resolve_dataset(root_or_repo_id: str | os.PathLike) -> Path:
    """A local dataset directory; else LeRobot's cache ($HF_LEROBOT_HOME, default
    ~/.cache/huggingface/lerobot/<repo_id>); else the huggingface_hub cache of the dataset repo."""
    p = Path(root_or_repo_id).expanduser()
    if (p / "meta" / "info.json").is_file():
        return p
    tried = [str(p)]
    name = str(root_or_repo_id)
    if not p.exists() and name.count("/") == 1:
        home = Path(os.environ.get("HF_LEROBOT_HOME", Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
                                   .expanduser() / "lerobot")).expanduser()
        if (home / name / "meta" / "info.json").is_file():
            return home / name
        tried.append(str(home / name))
        from huggingface_hub import snapshot_download

        for revision in (CODEBASE_VERSION, None):
            try:
                snap = Path(snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True))
            except Exception:  # noqa: BLE001 - not in the cache under this revision
                continue
            if (snap / "meta" / "info.json").is_file():
                return snap
        tried.append(f"the huggingface_hub cache (dataset {name})")
    raise DatasetError(f"no LeRobot dataset (meta/info.json) at {', '.join(tried)}; to fetch one from the hub: "
                       f"huggingface-cli download --repo-type dataset {name} --revision {CODEBASE_VERSION}")


def _read_tables(pq, files: list[Path], what: str):
    import pyarrow as pa

    if not files:
        raise DatasetError(f"no {what} parquet files")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DatasetError(f"{f}: cannot read {what} parquet ({e})") from e
    return pa.concat_tables(tables, promote_options="default")


class LeRobotDataset:
    """A LeRobot v3 dataset, random access by global frame index.

    action_horizon (attribute `horizon`): actions per sample (LeRobot's chunk: `action[i .. i+H-1]`, clamped to
    the episode, with `action_is_pad`); None gives the frame's own action. cache_mb: decoded camera frames are kept per
    episode, least recently used dropped beyond this budget (a small dataset ends up wholly in memory).
    tolerance_s: how far a decoded frame's timestamp may lie from the one asked for (LeRobot's 1e-4)."""

    def __init__(self, root_or_repo_id: str | os.PathLike, *, action_horizon: int | None = None,
                 tolerance_s: float = 1e-4, cache_mb: float = 2048.0):
        pq = _pyarrow()
        self.root = resolve_dataset(root_or_repo_id)
        info_path = self.root / "meta" / "info.json"
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{info_path} is not valid JSON: {e}") from e
        version = str(self.info.get("codebase_version", "?"))
        if not version.startswith("v3"):
            raise DatasetError(f"{info_path}: codebase_version {version}; pi0 reads LeRobot's v3 format (convert a v2.1 "
                               "dataset with LeRobot's convert_dataset_v21_to_v30.py)")
        self.fps = int(self.info["fps"])
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        self.camera_keys = [k for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES]
        self.video_keys = [k for k in self.camera_keys if self.features[k]["dtype"] == "video"]
        self.tolerance_s = tolerance_s
        self.horizon = action_horizon
        stats_path = self.root / "meta" / "stats.json"
        self.stats: dict[str, dict[str, np.ndarray]] | None = None
        if stats_path.is_file():
            raw = json.loads(stats_path.read_text())
            self.stats = {k: {s: np.atleast_1d(np.asarray(v, dtype=np.float64)) for s, v in d.items()}
                          for k, d in raw.items() if isinstance(d, dict)}
        # tasks: a task string is looked up by position (LeRobot: tasks.iloc[task_index])
        tasks = _read_tables(pq, [self.root / "meta" / "tasks.parquet"], "meta/tasks").to_pylist()
        self.tasks = [str(t.get("task", t.get("__index_level_0__"))) for t in tasks]
        episodes = _read_tables(pq, sorted((self.root / "meta" / "episodes").glob("*/*.parquet")), "meta/episodes")
        keep = [c for c in episodes.column_names if not c.startswith("stats/")]
        self.episodes = sorted(episodes.select(keep).to_pylist(), key=lambda e: e["episode_index"])
        data_files = sorted((self.root / "data").glob("*/*.parquet"))
        table = _read_tables(pq, data_files, "data")
        for need in ("index", "episode_index", "frame_index", "timestamp", "task_index"):
            if need not in table.column_names:
                raise DatasetError(f"{self.root / 'data'}: the frames have no '{need}' column")
        self._columns: dict[str, np.ndarray] = {}
        self._images: dict[str, Any] = {}
        for name in table.column_names:
            col = table.column(name)
            if self.features.get(name, {}).get("dtype") == "image":
                self._images[name] = col  # PNG bytes, decoded on access
            elif name in self.features and self.features[name].get("dtype") not in ("string", "language"):
                self._columns[name] = _to_numpy(col, name)
        self._n = table.num_rows
        self._index_to_row = {int(v): r for r, v in enumerate(self._columns["index"])}
        if self.horizon is not None and "action" not in self._columns:
            raise DatasetError(f"{self.root}: the dataset has no 'action' feature to chunk")
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_bytes, self._cache_budget = 0, int(cache_mb * 2**20)

    # -- metadata -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    def column(self, key: str) -> np.ndarray:
        """Every frame's value of a numeric feature, [N, ...] in frame order."""
        if key not in self._columns:
            raise DatasetError(f"{self.root}: no numeric feature {key!r} (features: {sorted(self._columns)})")
        return self._columns[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.features[key]["shape"])

    def episode_of(self, idx: int) -> dict[str, Any]:
        ep_idx = int(self._columns["episode_index"][idx])
        if not 0 <= ep_idx < len(self.episodes) or self.episodes[ep_idx]["episode_index"] != ep_idx:
            raise DatasetError(f"{self.root}/meta/episodes: no metadata for episode {ep_idx} (frame {idx})")
        return self.episodes[ep_idx]

    # -- frames -------------------------------------------------------------------------------

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < self._n:
            raise IndexError(f"frame {idx} of a dataset of {self._n}")
        ep = self.episode_of(idx)
        item: dict[str, Any] = {k: v[idx] for k, v in self._columns.items()}
        task_index = int(item["task_index"])
        if not 0 <= task_index < len(self.tasks):
            raise DatasetError(f"{self.root}/meta/tasks.parquet: episode {ep['episode_index']} frame "
                               f"{int(item['frame_index'])} names task {task_index}, the file lists {len(self.tasks)}")
        item["task"] = self.tasks[task_index]
        if self.horizon is not None:
            start, end, i = ep["dataset_from_index"], ep["dataset_to_index"], int(item["index"])
            wanted = [i + k for k in range(self.horizon)]
            rows = [self._index_to_row[min(max(q, start), end - 1)] for q in wanted]
            item["action"] = self._columns["action"][rows]
            item["action_is_pad"] = np.array([q < start or q >= end for q in wanted])
        for key in self.camera_keys:
            item[key] = self._camera(key, idx, ep)
        return item

    def _camera(self, key: str, idx: int, ep: dict[str, Any]) -> np.ndarray:
        if key in self._images:
            cell = self._images[key][idx].as_py()
            return _decode_png(cell, f"{self.root}/data ({key}, episode {ep['episode_index']}, frame {idx})")
        frames = self._episode_frames(key, ep)
        return frames[idx - self._index_to_row[ep["dataset_from_index"]]]

    def video_path(self, key: str, ep: dict[str, Any]) -> Path:
        template = self.info.get("video_path") or "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        return self.root / template.format(video_key=key, chunk_index=ep[f"videos/{key}/chunk_index"],
                                           file_index=ep[f"videos/{key}/file_index"])

    def _episode_frames(self, key: str, ep: dict[str, Any]) -> np.ndarray:
        """Every frame of one episode's stretch of the camera's mp4, uint8 [N, 3, H, W], matched to the rows'
        timestamps (+ the episode's from_timestamp) within tolerance_s, as LeRobot's PyAV decoder does."""
        cache_key = (key, int(ep["episode_index"]))
        if cache_key in self._cache:
            self._cache.move_to_end(cache_key)
            return self._cache[cache_key]
        first = self._index_to_row[ep["dataset_from_index"]]
        ts = self._columns["timestamp"][first: first + ep["length"]].astype(np.float64)
        offset = float(ep[f"videos/{key}/from_timestamp"])
        frames = decode_frames(self.video_path(key, ep), ts + offset, self.tolerance_s,
                               f"episode {ep['episode_index']}")
        self._cache[cache_key] = frames
        self._cache_bytes += frames.nbytes
        while self._cache_bytes > self._cache_budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return frames


def _to_numpy(col, name: str) -> np.ndarray:
    import pyarrow as pa

    col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return np.stack([np.asarray(v, dtype=np.float32) for v in col.to_pylist()])
    return col.to_numpy(zero_copy_only=False)


def _decode_png(cell: Any, where: str) -> np.ndarray:
    from PIL import Image

    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise DatasetError(f"{where}: the image cell holds no bytes")
    try:
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises several types for damaged data
        raise DatasetError(f"{where}: the image cannot be decoded ({e})") from e
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def decode_frames(path: Path, timestamps: np.ndarray, tolerance_s: float, what: str) -> np.ndarray:
    """The frames of `path` nearest to each timestamp (seconds), uint8 [N, 3, H, W]; a frame farther than
    tolerance_s, a missing file or undecodable data is a DatasetError naming the file and `what`."""
    av = _av()
    if not path.is_file():
        raise DatasetError(f"{path}: missing video ({what})")
    first, last = float(timestamps.min()), float(timestamps.max())
    decoded: list[np.ndarray] = []
    times: list[float] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(max(0, round(first / stream.time_base) - 1), backward=True, any_frame=False, stream=stream)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                if t >= first - tolerance_s:
                    decoded.append(frame.to_ndarray(format="rgb24").transpose(2, 0, 1))
                    times.append(t)
                if t >= last:
                    break
    except av.error.FFmpegError as e:
        raise DatasetError(f"{path}: {what}: the video cannot be decoded ({e})") from e
    if not decoded:
        raise DatasetError(f"{path}: {what}: no frame decoded between {first:.4f} s and {last:.4f} s")
    times_a = np.asarray(times)
    nearest = np.abs(timestamps[:, None] - times_a[None, :]).argmin(1)
    off = np.abs(times_a[nearest] - timestamps)
    if (off >= tolerance_s).any():
        bad = int(np.argmax(off >= tolerance_s))
        raise DatasetError(f"{path}: {what}: no frame within {tolerance_s} s of {timestamps[bad]:.4f} s (frame {bad}; "
                           f"nearest {times_a[nearest[bad]]:.4f} s): a damaged or truncated video")
    return np.ascontiguousarray(np.stack([decoded[j] for j in nearest]))


# ---------------------------------------------------------------------------------------------
# Statistics (meta/stats.json)

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


# ---------------------------------------------------------------------------------------------
# Writing


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
            av = _av()
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

        pq = _pyarrow()
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
        pq = _pyarrow()
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
    av = _av()
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image_hwc), format="rgb24")
