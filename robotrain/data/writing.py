"""Writing a LeRobot codebase ``v3.0`` dataset (`write_dataset`): cameras as images embedded
in the data parquet (LeRobot's ``use_videos=False`` layout) or as AV1 MP4 (``use_videos=True``,
encoded by `robotrain.data.video`), with the file names, arrow types, info.json and
per-episode statistics (`robotrain.data.statistics`) that LeRobot writes. The layout it writes
is `robotrain.data.metadata`'s, and the result is read back with its `load_meta`.

Not supported (a one-line ``UserError``): features of more than one dimension other than cameras.

Deviations from LeRobot (on purpose)
- An episode's ``tasks`` list is in order of first appearance (LeRobot uses ``list(set(...))``,
  whose order is arbitrary when an episode has several tasks).
- The data parquet's "huggingface" schema metadata has LeRobot's ``info`` but not its random
  ``fingerprint`` (a cache key of the ``datasets`` library that readers do not need).
- All episode metadata goes in one ``meta/episodes/chunk-000/file-000.parquet`` (LeRobot rolls
  that file over at ``data_files_size_in_mb`` too, i.e. after ~10^5 episodes).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from robotrain.data.metadata import (
    CAMERA_DTYPES,
    CODEBASE_VERSION,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_FEATURES,
    V30_DATA_PATH,
    V30_EPISODES_PATH,
    V30_VIDEO_PATH,
    DatasetMeta,
    load_meta,
)
from robotrain.data.statistics import episode_stats_columns, fold_stats, image_stats, stats_to_json, vector_stats
from robotrain.data.video import VideoEncoder, encoder_info, pick_codec
from robotrain.errors import UserError
from robotrain.fsutil import fsync_dir, fsync_tree

DEFAULT_DATA_FILES_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILES_SIZE_IN_MB = 200


def _list_type(value_type: pa.DataType, size: int = -1) -> pa.DataType:
    # LeRobot's files name list children "element" (the parquet convention), not arrow's "item".
    return pa.list_(pa.field("element", value_type), size)


def _is_channels_first(ft: Mapping[str, Any]) -> bool:
    return list(ft.get("names") or [])[:1] == ["channels"]


def _prepare_features(features: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Validate user features and return info.json's features: the user's, then LeRobot's defaults."""
    out: dict[str, dict[str, Any]] = {}
    for key, ft in features.items():
        if key in DEFAULT_FEATURES or key == "task":
            raise UserError(f"feature {key!r} is added by the writer itself; remove it from `features`")
        if "/" in key:
            raise UserError(f"feature name {key!r} contains '/', which LeRobot forbids; rename it")
        dtype, shape = ft.get("dtype"), list(ft.get("shape", ()))
        if dtype in CAMERA_DTYPES:
            if len(shape) != 3:
                raise UserError(f"{dtype} feature {key!r} needs shape [height, width, channels], got {shape}")
            if dtype == "video" and (_is_channels_first(ft) or shape[2] != 3):
                raise UserError(f"video feature {key!r} needs shape [height, width, 3] (RGB), got {shape}")
        else:
            try:
                np.dtype(dtype)
            except TypeError:
                raise UserError(f"feature {key!r} has unknown dtype {dtype!r}; use e.g. 'float32' or 'int64'") from None
            if len(shape) != 1:
                raise UserError(f"feature {key!r} has shape {shape}; the writer supports 1-D vectors and images")
        out[key] = {**ft, "shape": shape}
    return {**out, **{k: dict(v) for k, v in DEFAULT_FEATURES.items()}}


def _hf_feature(ft: Mapping[str, Any]) -> dict[str, Any]:
    """The `datasets` feature LeRobot records in the parquet's "huggingface" metadata."""
    if ft["dtype"] == "image":
        return {"_type": "Image"}
    value = {"dtype": ft["dtype"], "_type": "Value"}
    if list(ft["shape"]) == [1]:
        return value
    return {"feature": value, "length": int(ft["shape"][0]), "_type": "List"}


def _arrow_type(ft: Mapping[str, Any]) -> pa.DataType:
    if ft["dtype"] == "image":
        return pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    value_type = pa.from_numpy_dtype(np.dtype(ft["dtype"]))
    return value_type if list(ft["shape"]) == [1] else _list_type(value_type, int(ft["shape"][0]))


def _data_schema(features: Mapping[str, Mapping[str, Any]]) -> pa.Schema:
    """The data parquet's schema: every feature but the videos, which live in MP4 files."""
    features = {k: ft for k, ft in features.items() if ft["dtype"] != "video"}
    hf = {"info": {"features": {k: _hf_feature(ft) for k, ft in features.items()}}}
    schema = pa.schema([(k, _arrow_type(ft)) for k, ft in features.items()])
    return schema.with_metadata({"huggingface": json.dumps(hf)})


def _encode_png(image_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # compress_level 6 is what LeRobot's image writer uses for dtype "image".
    Image.fromarray(image_hwc.squeeze(-1) if image_hwc.shape[-1] == 1 else image_hwc).save(
        buf, format="PNG", compress_level=6
    )
    return buf.getvalue()


def _column_array(ft: Mapping[str, Any], values: np.ndarray) -> pa.Array:
    """(T, ...) values -> the arrow column LeRobot writes for this feature."""
    arrow_type = _arrow_type(ft)
    if ft["dtype"] == "image":
        hwc = values.transpose(0, 2, 3, 1) if _is_channels_first(ft) else values
        pngs = pa.array([_encode_png(img) for img in hwc], type=pa.binary())
        paths = pa.array([f"frame-{t:06d}.png" for t in range(len(values))], type=pa.string())
        return pa.StructArray.from_arrays([pngs, paths], fields=list(arrow_type))
    flat = np.ascontiguousarray(values, dtype=ft["dtype"]).reshape(-1)  # e.g. float64 timestamps -> float32
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=arrow_type.value_type), type=arrow_type)
    return pa.array(flat, type=arrow_type)


def _episode_arrays(
    episode: Mapping[str, Any], user_features: Mapping[str, Mapping[str, Any]], number: int
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Validate one episode dict; return its feature arrays (cast to the declared dtypes) and per-frame tasks."""
    missing = [k for k in [*user_features, "task"] if k not in episode]
    extra = [k for k in episode if k not in user_features and k != "task"]
    if missing or extra:
        raise UserError(
            f"episode {number} has keys missing {missing} / unknown {extra}; give exactly the features plus 'task'"
        )
    arrays = {k: np.asarray(episode[k]) for k in user_features}
    length = len(next(iter(arrays.values()))) if arrays else len(episode["task"])
    for key, ft in user_features.items():
        want = (length, *ft["shape"]) if list(ft["shape"]) != [1] else (length,)
        got = arrays[key].shape
        if got != want and not (list(ft["shape"]) == [1] and got == (length, 1)):
            raise UserError(f"episode {number}: {key!r} has shape {got}, expected {want} (frames first)")
        if ft["dtype"] in CAMERA_DTYPES and arrays[key].dtype != np.uint8:
            raise UserError(f"episode {number}: camera {key!r} is {arrays[key].dtype}; give uint8 pixels (0..255)")
        if ft["dtype"] not in CAMERA_DTYPES:
            arrays[key] = arrays[key].reshape(want).astype(ft["dtype"], copy=False)
    task = episode["task"]
    tasks = [task] * length if isinstance(task, str) else [str(t) for t in task]
    if len(tasks) != length or length == 0:
        raise UserError(
            f"episode {number} has {length} frames and {len(tasks)} tasks; "
            "give a non-empty episode and one task string (or one per frame)"
        )
    return arrays, tasks


class _V30Writer:
    """Accumulates episodes into a v3.0 folder: data files as they fill, metadata at the end."""

    def __init__(self, folder: Path, fps: int, features: dict[str, dict[str, Any]], chunks_size: int, file_mb: float,
                 video_file_mb: float = DEFAULT_VIDEO_FILES_SIZE_IN_MB):
        self.folder, self.fps, self.features = folder, fps, features
        self.user_features = {k: v for k, v in features.items() if k not in DEFAULT_FEATURES}
        self.chunks_size, self.file_mb = chunks_size, file_mb
        self.schema = _data_schema(features)
        self.video_file_mb = video_file_mb
        self.videos = {k: _VideoFiles(folder, k, fps, ft["shape"], chunks_size, video_file_mb)
                       for k, ft in features.items() if ft["dtype"] == "video"}
        self.tasks: dict[str, int] = {}
        self.rows: list[dict[str, Any]] = []
        self.episode_stats: list[dict[str, dict[str, np.ndarray]]] = []
        self.total_frames = 0
        self.chunk_index, self.file_index = 0, 0
        self.file_start_frame = 0
        self.sink: pa.NativeFile | None = None
        self.writer: pq.ParquetWriter | None = None

    def add_episode(self, episode: Mapping[str, Any]) -> None:
        index = len(self.rows)
        arrays, frame_tasks = _episode_arrays(episode, self.user_features, index)
        length = len(frame_tasks)
        for task in frame_tasks:
            self.tasks.setdefault(task, len(self.tasks))
        arrays["timestamp"] = np.arange(length) / self.fps  # float64 for stats, like LeRobot's python floats
        arrays["frame_index"] = np.arange(length, dtype=np.int64)
        arrays["episode_index"] = np.full(length, index, dtype=np.int64)
        arrays["index"] = np.arange(self.total_frames, self.total_frames + length, dtype=np.int64)
        arrays["task_index"] = np.array([self.tasks[t] for t in frame_tasks], dtype=np.int64)
        stats = self._stats(arrays)
        location = self._write_data(arrays, length)
        videos = {name: value for key, files in self.videos.items() for name, value in files.add(arrays[key]).items()}
        self.rows.append({
            "episode_index": index,
            "tasks": list(dict.fromkeys(frame_tasks)),
            "length": length,
            **location,
            **videos,
            **episode_stats_columns(stats),
            "meta/episodes/chunk_index": 0,
            "meta/episodes/file_index": 0,
        })
        self.episode_stats.append(stats)
        self.total_frames += length

    def _stats(self, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        stats = {}
        for key, ft in self.features.items():
            if ft["dtype"] in CAMERA_DTYPES:  # videos: stats of the frames before lossy encoding, as LeRobot
                chw = arrays[key] if _is_channels_first(ft) else arrays[key].transpose(0, 3, 1, 2)
                stats[key] = image_stats(chw)
            else:
                stats[key] = vector_stats(arrays[key])
        return stats

    def _write_data(self, arrays: dict[str, np.ndarray], length: int) -> dict[str, int]:
        """Append one episode as a row group; start a new file when this one would pass the size limit."""
        if self.writer is not None:
            size_mb = self.sink.tell() / 1024**2
            per_frame = size_mb / max(1, self.total_frames - self.file_start_frame)
            if size_mb + per_frame * length >= self.file_mb:  # LeRobot's rule
                self._close_data_file()
                self.chunk_index, self.file_index = _next_file(self.chunk_index, self.file_index, self.chunks_size)
        if self.writer is None:
            path = self.folder / V30_DATA_PATH.format(chunk_index=self.chunk_index, file_index=self.file_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sink = pa.OSFile(str(path), "wb")
            self.writer = pq.ParquetWriter(self.sink, self.schema, compression="snappy", use_dictionary=True)
            self.file_start_frame = self.total_frames
        columns = [_column_array(ft, arrays[k]) for k, ft in self.features.items() if ft["dtype"] != "video"]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        return {
            "data/chunk_index": self.chunk_index,
            "data/file_index": self.file_index,
            "dataset_from_index": self.total_frames,
            "dataset_to_index": self.total_frames + length,
        }

    def _close_data_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer, self.sink = None, None

    def close(self) -> None:
        self._close_data_file()
        for files in self.videos.values():
            files.close()

    def finish(self, robot_type: str | None) -> None:
        if not self.rows:
            raise UserError("write_dataset got no episodes; give at least one")
        self.close()
        meta = self.folder / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        _write_episodes_parquet(self.rows, self.folder / V30_EPISODES_PATH.format(chunk_index=0, file_index=0))
        _write_tasks_parquet(list(self.tasks), meta / "tasks.parquet")
        _write_json(stats_to_json(fold_stats(self.episode_stats)), meta / "stats.json")
        _write_json(self._info(robot_type), meta / "info.json")

    def _info(self, robot_type: str | None) -> dict[str, Any]:
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": robot_type,
            "total_episodes": len(self.rows),
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.file_mb,
            "video_files_size_in_mb": self.video_file_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.rows)}"},
            "data_path": V30_DATA_PATH,
            "video_path": V30_VIDEO_PATH if self.videos else None,
            "features": {k: {**ft, "info": self.videos[k].info()} if k in self.videos else ft
                         for k, ft in self.features.items()},
        }


def _next_file(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) after this one: `chunks_size` files per chunk folder, as in LeRobot."""
    return (chunk_index + 1, 0) if file_index + 1 == chunks_size else (chunk_index, file_index + 1)


class _VideoFiles:
    """One camera's MP4 files in a v3.0 dataset being written: episodes are appended to the
    current file, and the next episode starts a new one once it holds `file_mb`. (LeRobot checks
    the size with the next episode included; one continuous encoder learns an episode's size
    only after encoding it.) `chunks_size` files per chunk folder."""

    def __init__(self, folder: Path, key: str, fps: int, shape: list[int], chunks_size: int, file_mb: float):
        self.folder, self.key, self.fps, self.chunks_size, self.file_mb = folder, key, fps, chunks_size, file_mb
        self.height, self.width = int(shape[0]), int(shape[1])
        self.codec = pick_codec()
        self.chunk_index, self.file_index = 0, 0
        self.encoder: VideoEncoder | None = None

    def add(self, frames_hwc: np.ndarray) -> dict[str, Any]:
        """Encode one episode; returns its `videos/<key>/...` columns of the episodes parquet."""
        if self.encoder is not None and self.encoder.bytes_written / 2**20 >= self.file_mb:
            self.encoder.close()
            self.encoder = None
            self.chunk_index, self.file_index = _next_file(self.chunk_index, self.file_index, self.chunks_size)
        if self.encoder is None:
            path = self.folder / V30_VIDEO_PATH.format(video_key=self.key, chunk_index=self.chunk_index,
                                                      file_index=self.file_index)
            self.encoder = VideoEncoder(path, self.fps, self.height, self.width, self.codec)
        start = self.encoder.frames
        self.encoder.add(frames_hwc)
        prefix = f"videos/{self.key}/"
        return {prefix + "chunk_index": self.chunk_index, prefix + "file_index": self.file_index,
                prefix + "from_timestamp": start / self.fps, prefix + "to_timestamp": self.encoder.frames / self.fps}

    def info(self) -> dict[str, Any]:
        return encoder_info(self.codec, self.fps, self.height, self.width)

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None


def _stat_type(value: np.ndarray) -> pa.DataType:
    """list<element: int64|double>, nested once per array dimension (image stats are 3-D)."""
    arrow_type = pa.int64() if np.issubdtype(value.dtype, np.integer) else pa.float64()
    for _ in range(value.ndim):
        arrow_type = _list_type(arrow_type)
    return arrow_type


def _write_episodes_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    columns, fields = [], []
    for name, first in rows[0].items():
        if isinstance(first, np.ndarray):
            arrow_type = _stat_type(first)
            values = [row[name].tolist() for row in rows]
        elif isinstance(first, list):
            arrow_type, values = _list_type(pa.string()), [row[name] for row in rows]
        elif isinstance(first, float):
            arrow_type, values = pa.float64(), [row[name] for row in rows]
        else:
            arrow_type, values = pa.int64(), [row[name] for row in rows]
        fields.append(pa.field(name, arrow_type))
        columns.append(pa.array(values, type=arrow_type))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(columns, schema=pa.schema(fields)), path, compression="snappy")


def _write_tasks_parquet(tasks: list[str], path: Path) -> None:
    """meta/tasks.parquet as pandas writes `DataFrame({"task_index": ...}, index=tasks)`."""
    pandas_md = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "str",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "object", "numpy_type": "str",
             "metadata": None},
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "3.1.1",  # the pandas that wrote LeRobot's reference files
    }
    schema = pa.schema([("task_index", pa.int64()), ("__index_level_0__", pa.large_string())])
    table = pa.Table.from_arrays(
        [pa.array(range(len(tasks)), pa.int64()), pa.array(tasks, pa.large_string())],
        schema=schema.with_metadata({"pandas": json.dumps(pandas_md)}),
    )
    pq.write_table(table, path, compression="snappy")


def _write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=4, ensure_ascii=False)


def _check_free(root: Path) -> None:
    if root.is_file() or (root.is_dir() and any(root.iterdir())):
        raise UserError(
            f"{root} already exists and is not empty; write_dataset never overwrites — "
            "choose a new folder or delete it"
        )


def write_dataset(
    root: str | Path,
    *,
    repo_id: str,
    fps: int,
    features: Mapping[str, Mapping[str, Any]],
    episodes: Iterable[Mapping[str, Any]],
    robot_type: str | None = None,
    chunks_size: int = DEFAULT_CHUNKS_SIZE,
    data_files_size_in_mb: float = DEFAULT_DATA_FILES_SIZE_IN_MB,
    video_files_size_in_mb: float = DEFAULT_VIDEO_FILES_SIZE_IN_MB,
) -> DatasetMeta:
    """Write `episodes` as a LeRobot v3.0 dataset at `root` and return its metadata.

    `features` is info.json's `features` for the user features (vectors: {"dtype": "float32",
    "shape": [n], "names": [...]}; images: {"dtype": "image", "shape": [H, W, 3], "names":
    ["height", "width", "channels"]}; video cameras the same with dtype "video", written as AV1
    MP4 with LeRobot's encoder settings, see `robotrain.data.video`); timestamp, frame_index, episode_index, index and
    task_index are added as LeRobot does. Each episode is `{feature: array with T rows (images
    uint8), "task": str}` (or one task string per frame). Data files roll over at
    `data_files_size_in_mb` (videos at `video_files_size_in_mb`), `chunks_size` files per chunk
    folder, as in LeRobot.

    Atomic: everything is built in a hidden temporary sibling folder, flushed, then renamed to
    `root`; a crash leaves no partial dataset at `root`. An existing non-empty `root` is refused.
    """
    root = Path(root)
    _check_free(root)
    all_features = _prepare_features(features)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared cache.
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    writer = _V30Writer(tmp, int(fps), all_features, int(chunks_size), data_files_size_in_mb, video_files_size_in_mb)
    try:
        for episode in episodes:
            writer.add_episode(episode)
        writer.finish(robot_type)
        fsync_tree(tmp)
        _publish(tmp, root)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error, not a failed encoder flush
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root.parent)
    return load_meta(root, repo_id)


def _publish(tmp: Path, root: Path) -> None:
    """Rename the finished folder to `root`: atomic, and only onto nothing or an empty folder."""
    _check_free(root)
    try:
        os.rename(tmp, root)
    except OSError:
        _check_free(root)  # someone else filled `root` meanwhile: say so in one line
        raise
