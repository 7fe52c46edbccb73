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


def pyarrow_modules():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("LeRobot datasets need pyarrow and PyAV: pip install 'pi0[train]'") from e
    return pq


def av_module():
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
        pq = pyarrow_modules()
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
        listed = np.array([e["episode_index"] for e in self.episodes], dtype=np.int64)
        in_meta = np.isin(_to_numpy(table.column("episode_index"), "episode_index").reshape(-1), listed)
        if not in_meta.all():  # frames of an episode meta/ does not list (a recorder killed between two writes)
            table = table.filter(in_meta)
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
    av = av_module()
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

# ---------------------------------------------------------------------------------------------
# Writing


