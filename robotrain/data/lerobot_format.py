"""Read and write LeRobot datasets on local disk, with pyarrow and no LeRobot install.

Supported
- Reading codebase ``v3.0`` (``meta/info.json``, ``meta/stats.json``, ``meta/tasks.parquet``,
  ``meta/episodes/chunk-*/file-*.parquet``, ``data/chunk-*/file-*.parquet``; any number of data
  files and chunks) and ``v2.1`` (one ``data/chunk-*/episode_*.parquet`` per episode,
  ``meta/episodes.jsonl``, ``meta/tasks.jsonl``, ``meta/episodes_stats.jsonl``).
- Feature dtypes: float/int/bool scalars and 1-D vectors (any arrow list encoding),
  ``image`` features stored as embedded PNG/JPEG bytes (``struct<bytes: binary, path: string>``),
  and ``video`` features stored as MP4 files (v3.0: ``videos/<key>/chunk-*/file-*.mp4`` holding
  several episodes, each starting at its ``videos/<key>/from_timestamp``; v2.1:
  ``videos/chunk-*/<key>/episode_*.mp4``), decoded by ``robotrain.data.video``.
- ``LeRobotDataset[i]`` returns what LeRobot 0.6.1's ``LeRobotDataset[i]`` returns: float features
  as float32 tensors (scalars for shape ``[1]``), ints as int64, images as float32 (C, H, W) in
  [0, 1], ``task`` as a string, and for each ``delta_timestamps`` key the stacked frames plus a
  ``<key>_is_pad`` mask, with out-of-episode frames clamped to the episode's first/last frame.
- Writing codebase ``v3.0`` with images embedded in the data parquet (LeRobot's
  ``use_videos=False`` layout) or video cameras as AV1 MP4 (``use_videos=True``), file names,
  arrow types, info.json and per-episode statistics as LeRobot writes them.

Not supported (each is a one-line ``UserError``): codebase versions other than v3.0 and v2.1
(convert with LeRobot's conversion scripts), images stored as file paths instead of embedded
bytes, depth-map videos, and, for the writer only, features of more than one dimension other than cameras.

Deviations from LeRobot (on purpose), and one note
- Image ``std`` statistics: LeRobot 0.4.4 squares uint8 pixels in uint8, which overflows and
  makes the stored image std wrong (fixed upstream later, lerobot PR #3697). We square in int64,
  so our image std is the true one; every other statistic matches LeRobot 0.4.4 bit for bit.
- An episode's ``tasks`` list is in order of first appearance (LeRobot uses ``list(set(...))``,
  whose order is arbitrary when an episode has several tasks).
- The data parquet's "huggingface" schema metadata has LeRobot's ``info`` but not its random
  ``fingerprint`` (a cache key of the ``datasets`` library that readers do not need).
- The writer keeps all episode metadata in one ``meta/episodes/chunk-000/file-000.parquet``
  (LeRobot rolls that file over at ``data_files_size_in_mb`` too, i.e. after ~10^5 episodes).
- Note: with an ``episodes`` subset, ``len(ds)`` and ``ds[i]`` cover those episodes only (as LeRobot
  does); ``meta`` still describes the whole dataset, and ``meta.stats`` are the whole dataset's.

Memory: parquet is compressed, so reading decodes each data file once (``pq.read_table`` with
``memory_map=True``) into arrow buffers; every column is then converted once to numpy views of
those buffers (zero-copy when a column is a single chunk). ``__getitem__`` only indexes numpy
arrays and decodes the images it returns. DataLoader workers started with ``fork`` (the Linux
default) share those buffers copy-on-write; when pickled (``spawn``), the dataset sends only its
metadata and each worker decodes the data files again on its first item.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from robotrain.data.video import (
    DEFAULT_DECODER_CACHE_MB,
    DEFAULT_DECODER_CACHE_SIZE,
    DecoderCache,
    VideoColumn,
    VideoEncoder,
    check_backend,
    check_device,
    encoder_info,
    frames_shape,
    pick_codec,
    require_file,
    video_keys,
)
from robotrain.errors import UserError
from robotrain.fsutil import fsync_dir, fsync_tree

CODEBASE_VERSION = "v3.0"
SUPPORTED_VERSIONS = ("v3.0", "v2.1")

# The bookkeeping features LeRobot adds to every dataset, in LeRobot's order.
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
CAMERA_DTYPES = ("image", "video")
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
QUANTILE_KEYS = tuple(f"q{int(q * 100):02d}" for q in QUANTILES)
STAT_KEYS = ("min", "max", "mean", "std", "count", *QUANTILE_KEYS)
NUM_QUANTILE_BINS = 5000  # LeRobot's histogram resolution for quantiles

V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_CHUNKS_SIZE = 1000
DEFAULT_DATA_FILES_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILES_SIZE_IN_MB = 200

_CONVERT_HINT = "convert it with LeRobot's conversion script (lerobot/datasets/v30/convert_dataset_v21_to_v30.py)"


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetMeta:
    """Everything about a dataset except its frames. Episode arrays are sorted by episode index."""

    root: Path
    repo_id: str | None
    codebase_version: str
    fps: int
    robot_type: str | None
    features: dict[str, dict[str, Any]]  # info.json form: {"dtype", "shape", "names"}
    stats: dict[str, dict[str, np.ndarray]]  # feature -> min/max/mean/std/count[/q01..q99]
    tasks: list[str]  # task string by task_index
    episode_index: np.ndarray  # int64 (E,)
    episode_from: np.ndarray  # int64 (E,), global index of the episode's first frame
    episode_to: np.ndarray  # int64 (E,), exclusive
    episode_data_files: list[str] = field(default_factory=list)  # data parquet of each episode, relative
    # Per video camera: (MP4 of each episode, relative; the episode's start time in that file, s).
    episode_videos: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # meta/info.json as read

    @property
    def num_frames(self) -> int:
        return int((self.episode_to - self.episode_from).sum())

    @property
    def num_episodes(self) -> int:
        return len(self.episode_index)

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] in CAMERA_DTYPES]

    @property
    def video_keys(self) -> list[str]:
        return video_keys(self.features)

    def episode_position(self, episode: int) -> int:
        """Position of `episode` in the episode arrays (they need not be contiguous)."""
        pos = int(np.searchsorted(self.episode_index, episode))
        if pos >= len(self.episode_index) or self.episode_index[pos] != episode:
            raise KeyError(episode)
        return pos


def load_meta(root: str | Path, repo_id: str | None = None) -> DatasetMeta:
    """Read the metadata of the LeRobot dataset at `root` (codebase v3.0 or v2.1)."""
    root = Path(root)
    info = _read_json(root / "meta" / "info.json", root)
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise UserError(
            f"dataset at {root} has codebase_version {version!r}; robotrain reads v3.0 and v2.1 — {_CONVERT_HINT}"
        )
    features = info.get("features")
    if not isinstance(features, dict) or "fps" not in info:
        raise UserError(f"{root / 'meta' / 'info.json'} lacks 'features' or 'fps'; it is not a LeRobot info.json")
    lacking = [k for k in DEFAULT_FEATURES if k not in features]
    if lacking:
        raise UserError(f"{root / 'meta' / 'info.json'} lacks LeRobot's features {lacking}; re-download the dataset")
    loader = _load_v30_meta if version == "v3.0" else _load_v21_meta
    tasks, episodes, stats = loader(root, info)
    return DatasetMeta(
        root=root,
        repo_id=repo_id,
        codebase_version=version,
        fps=int(info["fps"]),
        robot_type=info.get("robot_type"),
        features=features,
        stats=stats,
        tasks=tasks,
        episode_index=episodes["episode_index"],
        episode_from=episodes["from"],
        episode_to=episodes["to"],
        episode_data_files=episodes["data_files"],
        episode_videos=episodes["videos"],
        info=info,
    )


def _read_json(path: Path, root: Path) -> Any:
    if not path.is_file():
        raise UserError(f"no {path.relative_to(root)} in {root}: not a LeRobot dataset folder (or a partial download)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-download the dataset") from None


def _read_jsonl(path: Path, root: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"no {path.relative_to(root)} in {root}: the v2.1 dataset is incomplete; re-download it")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_parquet(path: Path, root: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise UserError(f"no {path.relative_to(root)} in {root}: the dataset is incomplete; re-download it")
    if columns is not None:
        missing = [c for c in columns if c not in pq.read_schema(path, memory_map=True).names]
        if missing:
            raise UserError(f"{path} lacks columns {missing} that info.json lists; re-download the dataset")
    return pq.read_table(path, columns=columns, memory_map=True)


def _load_v30_meta(root: Path, info: dict) -> tuple[list[str], dict[str, Any], dict]:
    tasks = _read_tasks_parquet(root / "meta" / "tasks.parquet", root)
    paths = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not paths:
        raise UserError(f"no meta/episodes/chunk-*/file-*.parquet in {root}: the dataset is incomplete; re-download it")
    table = pa.concat_tables([_read_parquet(p, root) for p in paths], promote_options="default")
    required = ("episode_index", "dataset_from_index", "dataset_to_index", "data/chunk_index", "data/file_index")
    if any(name not in table.column_names for name in required):
        raise UserError(f"{root}/meta/episodes lacks some of the columns {list(required)}; re-download the dataset")
    cols = {name: table.column(name).to_numpy().astype(np.int64) for name in (
        "episode_index", "dataset_from_index", "dataset_to_index", "data/chunk_index", "data/file_index")}
    order = np.argsort(cols["episode_index"], kind="stable")
    data_files = [
        info.get("data_path", V30_DATA_PATH).format(chunk_index=int(c), file_index=int(f))
        for c, f in zip(cols["data/chunk_index"][order], cols["data/file_index"][order])
    ]
    episodes = {
        "episode_index": cols["episode_index"][order],
        "from": cols["dataset_from_index"][order],
        "to": cols["dataset_to_index"][order],
        "data_files": data_files,
        "videos": _v30_episode_videos(root, info, table, order),
    }
    stats_path = root / "meta" / "stats.json"
    if stats_path.is_file():
        stats = _stats_from_json(_read_json(stats_path, root))
    else:  # LeRobot writes stats.json; without it, aggregate the per-episode stats it also writes
        stats = aggregate_stats([_episode_stats_from_row(row) for row in _stats_rows(table)])
    return tasks, episodes, stats


def _v30_episode_videos(root: Path, info: dict, table: pa.Table, order: np.ndarray) -> dict[str, tuple]:
    """Each video camera's file and start time per episode, from the episodes parquet."""
    videos = {}
    template = info.get("video_path") or V30_VIDEO_PATH
    for key in video_keys(info["features"]):
        names = [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
        if any(name not in table.column_names for name in names):
            raise UserError(f"{root}/meta/episodes lacks the columns {names} of video feature {key!r}; "
                            "re-download the dataset")
        chunk, file, start = (table.column(n).to_numpy()[order] for n in names)
        files = [template.format(video_key=key, chunk_index=int(c), file_index=int(f)) for c, f in zip(chunk, file)]
        videos[key] = (files, start.astype(np.float64))
    return videos


def _read_tasks_parquet(path: Path, root: Path) -> list[str]:
    table = _read_parquet(path, root)
    # The task string is pandas' index column: "__index_level_0__" when unnamed, else its name.
    pandas_md = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    candidates = [c for c in pandas_md.get("index_columns", []) if isinstance(c, str)] + ["task"]
    name = next((c for c in candidates if c in table.column_names), None)
    if name is None or "task_index" not in table.column_names:
        raise UserError(f"{path} has no task strings and task_index column; re-download the dataset")
    return _tasks_by_index(table.column("task_index").to_pylist(), table.column(name).to_pylist(), path)


def _tasks_by_index(indices: list[int], tasks: list[str], path: Path) -> list[str]:
    by_index = dict(zip(indices, tasks))
    if sorted(by_index) != list(range(len(by_index))):
        raise UserError(f"{path} has task_index values {sorted(by_index)}, expected 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def _stats_rows(table: pa.Table) -> list[dict[str, Any]]:
    names = [n for n in table.column_names if n.startswith("stats/")]
    return table.select(names).to_pylist()


def _episode_stats_from_row(row: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """`{"stats/<feature>/<stat>": value}` -> `{feature: {stat: array}}` (feature names may hold dots)."""
    stats: dict[str, dict[str, np.ndarray]] = {}
    for name, value in row.items():
        feature, stat = name[len("stats/"):].rsplit("/", 1)
        if value is not None:
            stats.setdefault(feature, {})[stat] = np.array(value)
    return stats


def _stats_from_json(raw: dict) -> dict[str, dict[str, np.ndarray]]:
    return {feature: {stat: np.array(v) for stat, v in per.items()} for feature, per in raw.items()}


def _load_v21_meta(root: Path, info: dict) -> tuple[list[str], dict[str, Any], dict]:
    meta = root / "meta"
    task_rows = _read_jsonl(meta / "tasks.jsonl", root)
    tasks = _tasks_by_index([r["task_index"] for r in task_rows], [r["task"] for r in task_rows], meta / "tasks.jsonl")
    rows = sorted(_read_jsonl(meta / "episodes.jsonl", root), key=lambda r: r["episode_index"])
    lengths = np.array([r["length"] for r in rows], dtype=np.int64)
    # v2.1 has no frame ranges on disk: LeRobot derives them from lengths, in episode order.
    to = np.cumsum(lengths)
    chunks_size = int(info.get("chunks_size", DEFAULT_CHUNKS_SIZE))
    data_path = info.get("data_path", V21_DATA_PATH)
    video_path = info.get("video_path") or V21_VIDEO_PATH
    episodes = {
        "episode_index": np.array([r["episode_index"] for r in rows], dtype=np.int64),
        "from": to - lengths,
        "to": to,
        "data_files": [
            data_path.format(episode_chunk=r["episode_index"] // chunks_size, episode_index=r["episode_index"])
            for r in rows
        ],
        # v2.1 keeps one MP4 per episode and camera, starting at time 0.
        "videos": {
            key: ([video_path.format(episode_chunk=r["episode_index"] // chunks_size, video_key=key,
                                     episode_index=r["episode_index"]) for r in rows], np.zeros(len(rows)))
            for key in video_keys(info["features"])
        },
    }
    if (meta / "stats.json").is_file():
        stats = _stats_from_json(_read_json(meta / "stats.json", root))
    elif (meta / "episodes_stats.jsonl").is_file():
        rows = _read_jsonl(meta / "episodes_stats.jsonl", root)
        stats = aggregate_stats([_stats_from_json(r["stats"]) for r in rows])
    else:
        stats = {}
    return tasks, episodes, stats


# --------------------------------------------------------------------------------------------
# Statistics (the algorithm of LeRobot's compute_stats.py, so written stats match LeRobot's)
# --------------------------------------------------------------------------------------------


def _column_stats(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Stats of each column of `batch` (N, D), as LeRobot's RunningQuantileStats fed once.

    Quantiles come from a 5000-bin histogram per column, linearly interpolated inside a bin,
    which is what LeRobot stores (not exact order statistics).
    """
    squares_in = batch
    if batch.dtype == np.bool_ or (np.issubdtype(batch.dtype, np.integer) and batch.dtype.itemsize < 8):
        squares_in = batch.astype(np.int64)  # uint8 pixels squared in uint8 overflow (LeRobot 0.4.4 bug)
    mean = np.mean(batch, axis=0)
    mean_of_squares = np.mean(squares_in**2, axis=0)
    lo, hi = np.min(batch, axis=0), np.max(batch, axis=0)
    stats = {
        "min": lo,
        "max": hi,
        "mean": mean,
        "std": np.sqrt(np.maximum(0, mean_of_squares - mean**2)),
        "count": np.array([batch.shape[0]]),
    }
    edges = [np.linspace(lo[i] - 1e-10, hi[i] + 1e-10, NUM_QUANTILE_BINS + 1) for i in range(batch.shape[1])]
    hists = [np.histogram(batch[:, i], bins=edges[i])[0] for i in range(batch.shape[1])]
    for q, key in zip(QUANTILES, QUANTILE_KEYS):
        target = q * batch.shape[0]
        stats[key] = np.array([_histogram_quantile(h, e, target) for h, e in zip(hists, edges)])
    return stats


def _histogram_quantile(hist: np.ndarray, edges: np.ndarray, target_count: float) -> float:
    cumsum = np.cumsum(hist)
    idx = np.searchsorted(cumsum, target_count)
    if idx == 0:
        return edges[0]
    if idx >= len(cumsum):
        return edges[-1]
    count_before = cumsum[idx - 1]
    count_in_bin = cumsum[idx] - count_before
    if count_in_bin == 0:
        return edges[idx]
    fraction = (target_count - count_before) / count_in_bin
    return edges[idx] + fraction * (edges[idx + 1] - edges[idx])


def _vector_stats(data: np.ndarray) -> dict[str, np.ndarray]:
    """Stats of a (T,) or (T, D) feature; (T,) features get shape-(1,) stats, like LeRobot."""
    batch = data.reshape(-1, 1) if data.ndim == 1 else data
    if batch.shape[0] < 2:  # LeRobot: too few samples for a histogram, quantiles = mean
        stats = {"min": batch.min(0), "max": batch.max(0), "mean": batch.mean(0), "std": batch.std(0)}
        stats["count"] = np.array([batch.shape[0]])
        stats.update({k: stats["mean"].copy() for k in QUANTILE_KEYS})
    else:
        stats = _column_stats(batch)
    return {k: v if k == "count" else np.asarray(v).reshape(-1) for k, v in stats.items()}


def _sample_indices(length: int) -> list[int]:
    """LeRobot's frame sampling for image stats: all frames up to 100, then ~length**0.75."""
    num = max(min(100, length), min(int(length**0.75), 10_000))
    return np.round(np.linspace(0, length - 1, num)).astype(int).tolist()


def _image_stats(images_chw: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats of uint8 (T, C, H, W) images, in [0, 1] scale and shaped (C, 1, 1)."""
    sampled = images_chw[_sample_indices(len(images_chw))]
    _, _, height, width = sampled.shape
    if max(height, width) >= 300:  # LeRobot's auto_downsample_height_width
        factor = int(width / 150) if width > height else int(height / 150)
        sampled = sampled[:, :, ::factor, ::factor]
    channels = sampled.shape[1]
    stats = _column_stats(sampled.transpose(0, 2, 3, 1).reshape(-1, channels))
    stats["count"] = np.array([len(sampled)])
    return {k: v if k == "count" else np.asarray(v).reshape(channels, 1, 1) / 255.0 for k, v in stats.items()}


def _aggregate_feature(stats_list: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Merge one feature's stats: count-weighted means, parallel variance, weighted quantiles."""
    means = np.stack([s["mean"] for s in stats_list])
    variances = np.stack([s["std"] ** 2 for s in stats_list])
    counts = np.stack([s["count"] for s in stats_list])
    total_count = counts.sum(axis=0)
    while counts.ndim < means.ndim:
        counts = np.expand_dims(counts, axis=-1)
    total_mean = (means * counts).sum(axis=0) / total_count
    total_variance = ((variances + (means - total_mean) ** 2) * counts).sum(axis=0) / total_count
    merged = {
        "min": np.min(np.stack([s["min"] for s in stats_list]), axis=0),
        "max": np.max(np.stack([s["max"] for s in stats_list]), axis=0),
        "mean": total_mean,
        "std": np.sqrt(total_variance),
        "count": total_count,
    }
    for key in QUANTILE_KEYS:  # approximate, as LeRobot: count-weighted mean of per-part quantiles
        if all(key in s for s in stats_list):
            merged[key] = (np.stack([s[key] for s in stats_list]) * counts).sum(axis=0) / total_count
    return merged


def aggregate_stats(stats_list: Sequence[Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Merge per-episode stats into dataset stats (the union of features), as LeRobot does."""
    keys = list(dict.fromkeys(k for stats in stats_list for k in stats))
    return {k: _aggregate_feature([dict(s[k]) for s in stats_list if k in s]) for k in keys}


# --------------------------------------------------------------------------------------------
# Reading frames
# --------------------------------------------------------------------------------------------


def _array_to_numpy(arr: pa.Array, name: str) -> np.ndarray:
    """One arrow chunk -> numpy, zero-copy for null-free numeric data; lists are flattened."""
    if arr.null_count:
        raise UserError(f"column {name!r} has {arr.null_count} missing values; LeRobot datasets have none")
    while pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = arr.flatten()  # flatten() honours slice offsets, .values does not
    if pa.types.is_boolean(arr.type) or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr.to_numpy(zero_copy_only=False)
    return arr.to_numpy(zero_copy_only=True)


def _output_dtype(values: np.ndarray) -> np.dtype:
    # LeRobot goes through torch.tensor(python value): floats become float32, ints int64.
    if np.issubdtype(values.dtype, np.floating):
        return np.dtype(np.float32)
    if np.issubdtype(values.dtype, np.integer):
        return np.dtype(np.int64)
    return values.dtype


def _column_to_numpy(column: pa.ChunkedArray, name: str, shape: Sequence[int]) -> np.ndarray:
    """A whole column as (N, *shape) numpy, or (N,) for shape [1] features (LeRobot scalars)."""
    pieces = [_array_to_numpy(chunk, name) for chunk in column.chunks]
    values = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0)
    values = values.astype(_output_dtype(values), copy=False)
    item_shape = () if list(shape) == [1] else tuple(shape)
    if values.size != len(column) * math.prod(item_shape):
        raise UserError(f"column {name!r} does not hold shape {list(shape)} per frame as info.json says")
    return values.reshape(len(column), *item_shape)


@dataclass
class _ImageColumn:
    """Encoded images of one feature: per arrow chunk, the byte buffer and row offsets into it."""

    offsets: list[np.ndarray]
    data: list[np.ndarray]
    row_chunk: np.ndarray  # frame row -> chunk
    row_local: np.ndarray  # frame row -> row inside the chunk

    @classmethod
    def from_column(cls, column: pa.ChunkedArray, name: str) -> _ImageColumn:
        offsets, data, row_chunk, row_local = [], [], [], []
        for i, chunk in enumerate(column.chunks):
            binary = chunk.flatten()[chunk.type.get_field_index("bytes")] if pa.types.is_struct(chunk.type) else chunk
            if binary.null_count or chunk.null_count:
                raise UserError(
                    f"image column {name!r} holds file paths instead of embedded bytes; robotrain reads only "
                    "images embedded in the parquet, as LeRobot writes them — re-create the dataset with LeRobot"
                )
            off_type = np.int64 if pa.types.is_large_binary(binary.type) else np.int32
            _, off_buf, data_buf = binary.buffers()
            offsets.append(np.frombuffer(off_buf, dtype=off_type)[binary.offset: binary.offset + len(binary) + 1])
            data.append(np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8))
            row_chunk.append(np.full(len(binary), i, dtype=np.int32))
            row_local.append(np.arange(len(binary), dtype=np.int64))
        return cls(offsets, data, _concat(row_chunk, np.int32), _concat(row_local, np.int64))

    @classmethod
    def concat(cls, parts: list[_ImageColumn]) -> _ImageColumn:
        offsets, data, row_chunk, base = [], [], [], 0
        for part in parts:
            offsets += part.offsets
            data += part.data
            row_chunk.append(part.row_chunk + base)
            base += len(part.offsets)
        return cls(offsets, data, _concat(row_chunk, np.int32), _concat([p.row_local for p in parts], np.int64))

    def take(self, rows: np.ndarray) -> _ImageColumn:
        return _ImageColumn(self.offsets, self.data, self.row_chunk[rows], self.row_local[rows])

    def pixels(self, row: int) -> np.ndarray:
        """Frame `row` decoded, (H, W, C) as stored."""
        chunk, local = self.row_chunk[row], self.row_local[row]
        start, stop = self.offsets[chunk][local], self.offsets[chunk][local + 1]
        with Image.open(io.BytesIO(self.data[chunk][start:stop])) as img:
            pixels = np.array(img)
        return pixels[:, :, None] if pixels.ndim == 2 else pixels


class _DecodedImages:
    """Decoded frames of one image feature, kept after their first decode when they fit a
    memory budget (decoding a PNG costs far more than a training step spends per sample).

    The cache fills lazily, so opening a dataset stays instant; in forked DataLoader workers
    each worker fills its own copy."""

    def __init__(self, column: _ImageColumn, shape: Sequence[int], budget_bytes: int):
        self.column = column
        n = len(column.row_chunk)
        self.cache: np.ndarray | None = None
        if n * math.prod(shape) <= budget_bytes:
            self.cache = np.empty((n, *shape), dtype=np.uint8)
            self.cached = np.zeros(n, dtype=bool)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Frames at `rows` (any shape) as uint8 (*rows.shape, H, W, C)."""
        flat = rows.reshape(-1)
        if self.cache is None:
            frames = np.stack([self.column.pixels(int(r)) for r in flat])
            return frames.reshape(*rows.shape, *frames.shape[1:])
        for r in np.unique(flat[~self.cached[flat]]):
            pixels = self.column.pixels(int(r))
            if pixels.shape != self.cache.shape[1:] or pixels.dtype != np.uint8:
                raise UserError(f"an image is {pixels.shape} {pixels.dtype}, not {self.cache.shape[1:]} uint8 "
                                "as info.json says; fix the dataset's features")
            self.cache[r] = pixels
            self.cached[r] = True
        return self.cache[rows]


def _camera_tensor(pixels_chw: torch.Tensor, uint8: bool) -> torch.Tensor:
    """(..., C, H, W) pixels: uint8 as they are, or float32 in [0, 1] (torchvision's ToTensor;
    `to_float` does the same later, on the training device)."""
    return pixels_chw if uint8 or pixels_chw.dtype != torch.uint8 else to_float(pixels_chw)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 camera frames -> float32 in [0, 1], exactly as LeRobot converts them."""
    return pixels.float().div_(255)


def _concat(pieces: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.empty(0, dtype)


@dataclass
class _Frames:
    """The selected frames, sorted by global index: numpy columns and encoded image columns."""

    arrays: dict[str, np.ndarray]
    images: dict[str, _ImageColumn]
    row_start: dict[int, int]  # episode index -> row of its first frame
    decoded: dict[str, _DecodedImages] = field(default_factory=dict)
    first_row: np.ndarray | None = None  # row -> first row of its episode
    end_row: np.ndarray | None = None  # row -> one past the last row of its episode
    videos: dict[str, VideoColumn] = field(default_factory=dict)
    decoders: DecoderCache | None = None  # this process's open video files
    tolerance_s: float = 1e-4

    def __len__(self) -> int:
        return len(self.arrays["index"])

    def get(self, key: str, rows: int | np.ndarray, uint8: bool = False) -> Any:
        """Feature `key` at a row (one frame) or an array of rows (stacked along its shape);
        camera frames (C, H, W), float32 in [0, 1] or, with `uint8`, as stored."""
        if key in self.videos:
            return _camera_tensor(self.videos[key].take(np.asarray(rows), self.decoders, self.tolerance_s), uint8)
        if key in self.decoded:
            pixels = np.moveaxis(self.decoded[key].take(np.asarray(rows)), -1, -3)
            return _camera_tensor(torch.from_numpy(np.ascontiguousarray(pixels)), uint8)
        values = self.arrays[key][rows]
        if values.dtype == object:  # string features
            return values.tolist() if isinstance(rows, np.ndarray) else values
        return torch.from_numpy(np.array(values))  # copy: arrow-backed views are read-only

    def index_episodes(self, meta: DatasetMeta, image_budget_bytes: int) -> None:
        """Per-row episode bounds (for chunk queries) and the image caches."""
        episodes, lengths = np.unique(self.arrays["episode_index"], return_counts=True)
        first = np.array([self.row_start[int(e)] for e in episodes], dtype=np.int64)
        order = np.argsort(first)
        first, lengths = first[order], lengths[order]
        self.first_row = np.repeat(first, lengths)
        self.end_row = np.repeat(first + lengths, lengths)
        for key, column in self.images.items():
            self.decoded[key] = _DecodedImages(column, meta.features[key]["shape"], image_budget_bytes)
            image_budget_bytes -= 0 if self.decoded[key].cache is None else self.decoded[key].cache.nbytes
        position = np.searchsorted(meta.episode_index, self.arrays["episode_index"])  # row -> episode position
        time = self.arrays["timestamp"].astype(np.float64)  # LeRobot: float32 timestamp + float64 offset
        for key, (files, starts) in meta.episode_videos.items():
            names, file_of_episode = np.unique(np.array(files, dtype=object), return_inverse=True)
            self.videos[key] = VideoColumn(
                key, meta.root, [str(n) for n in names], file_of_episode[position], starts[position] + time,
                self.arrays["episode_index"], frames_shape(meta.features[key]))


def _load_frames(meta: DatasetMeta, positions: np.ndarray) -> _Frames:
    """Decode the data files of the episodes at `positions` into numpy columns (once)."""
    keys = [k for k in meta.features if meta.features[k]["dtype"] != "video"]  # videos are not in the parquet
    wanted = set(meta.episode_index[positions].tolist())
    files = list(dict.fromkeys(meta.episode_data_files[p] for p in positions))
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in keys if meta.features[k]["dtype"] not in CAMERA_DTYPES}
    images: dict[str, list[_ImageColumn]] = {k: [] for k in keys if meta.features[k]["dtype"] == "image"}
    for rel in files:
        table = _read_parquet(meta.root / rel, meta.root, columns=keys)  # only the features info.json lists
        episode_col = _column_to_numpy(table.column("episode_index"), "episode_index", [1])
        keep = np.isin(episode_col, list(wanted))
        if not keep.all():  # a subset: copy only the wanted rows
            table = table.filter(pa.array(keep))
        for k in arrays:
            arrays[k].append(_column_to_numpy(table.column(k), k, meta.features[k]["shape"]))
        for k in images:
            images[k].append(_ImageColumn.from_column(table.column(k), k))
    merged = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in arrays.items()}
    frames = _Frames(merged, {k: _ImageColumn.concat(v) for k, v in images.items()}, {})
    return _sort_and_check(frames, meta, positions)


def _sort_and_check(frames: _Frames, meta: DatasetMeta, positions: np.ndarray) -> _Frames:
    """Order rows by global index and check they are exactly the episodes' frame ranges."""
    index = frames.arrays["index"]
    if len(index) > 1 and np.any(index[1:] < index[:-1]):
        order = np.argsort(index, kind="stable")
        frames.arrays = {k: v[order] for k, v in frames.arrays.items()}
        frames.images = {k: v.take(order) for k, v in frames.images.items()}
        index = frames.arrays["index"]
    by_start = positions[np.argsort(meta.episode_from[positions], kind="stable")]
    expected = np.concatenate([np.arange(meta.episode_from[p], meta.episode_to[p]) for p in by_start] or [[]])
    if not np.array_equal(index, expected.astype(np.int64)):
        raise UserError(
            f"data files of {meta.root} do not hold the frames its episode metadata lists "
            f"({len(index)} frames read, {len(expected)} expected); re-download the dataset"
        )
    starts = np.cumsum([0] + [int(meta.episode_to[p] - meta.episode_from[p]) for p in by_start])
    frames.row_start = {int(meta.episode_index[p]): int(s) for p, s in zip(by_start, starts)}
    return frames


def _delta_indices(
    delta_timestamps: Mapping[str, Sequence[float]] | None, meta: DatasetMeta, tolerance_s: float
) -> dict[str, np.ndarray]:
    """Check `delta_timestamps` (keys exist, multiples of 1/fps) and turn them into frame offsets."""
    if not delta_timestamps:
        return {}
    fps = meta.fps
    for key, deltas in delta_timestamps.items():
        if key not in meta.features:
            raise UserError(
                f"delta_timestamps key {key!r} is not a feature of {meta.root}; choose from {list(meta.features)}"
            )
        bad = [d for d in deltas if abs(d * fps - round(d * fps)) / fps > tolerance_s]
        if bad:
            raise UserError(
                f"delta_timestamps[{key!r}] has {bad}, not multiples of 1/{fps} s (±{tolerance_s} s); "
                f"use multiples of {1 / fps:g}"
            )
        if len(deltas) == 0:
            raise UserError(f"delta_timestamps[{key!r}] is empty; give at least one offset, e.g. [0.0]")
    return {key: np.array([round(d * fps) for d in deltas], dtype=np.int64) for key, deltas in delta_timestamps.items()}


class LeRobotDataset(torch.utils.data.Dataset):
    """Frames of a LeRobot dataset (v3.0 or v2.1), item for item as LeRobot 0.6.1 returns them.

    The constructor takes LeRobot's arguments: `root` is the local folder (None: the dataset
    `repo_id` in `$HF_LEROBOT_HOME`, downloaded once if absent); `episodes` selects a subset
    (by episode index); `delta_timestamps` maps a feature to time offsets in seconds (multiples
    of 1/fps within `tolerance_s`): that feature is then returned stacked over the offsets, with
    `<key>_is_pad` True where the offset leaves the episode (the value there repeats the
    episode's first or last frame); `video_backend` decodes video cameras (`torchcodec`, the
    default, or `pyav`).

    Keyword-only, robotrain's: `return_uint8` returns camera frames as uint8 (C, H, W) instead
    of float32 in [0, 1] — for image cameras too, where LeRobot converts those to float always;
    `image_cache_mb` keeps decoded embedded images up to that size; `decoder_cache_size` /
    `decoder_cache_mb` bound the open video decoders per process; `video_device`: "cuda" (or
    "cuda:N") decodes video on that GPU with torchcodec (frames returned there; no DataLoader
    workers then, CUDA does not survive their fork); `meta`: the metadata if the
    caller has read it already (`load_meta`), so that it is not read twice.

    Reading a batch: `get_batch(indices)` returns the collated batch directly, and
    `__getitems__(indices)` (which `torch.utils.data.DataLoader` calls with a batch's indices)
    returns the list of items; both decode each video file once per batch, in time order.
    """

    def __init__(
        self,
        repo_id: str,
        root: str | Path | None = None,
        episodes: list[int] | None = None,
        delta_timestamps: dict[str, list[float]] | None = None,
        tolerance_s: float = 1e-4,
        video_backend: str | None = None,
        *,
        return_uint8: bool = False,
        image_cache_mb: float = 2048,
        decoder_cache_size: int = DEFAULT_DECODER_CACHE_SIZE,
        decoder_cache_mb: float = DEFAULT_DECODER_CACHE_MB,
        video_device: str = "cpu",
        meta: DatasetMeta | None = None,
    ):
        super().__init__()
        if meta is None:
            if root is None:
                from robotrain.data.fetch import download

                root = download(repo_id, None)
            meta = load_meta(root, repo_id)
        self.meta = meta
        self.root = self.meta.root
        self.repo_id = repo_id
        self.tolerance_s = tolerance_s
        self.delta_timestamps = delta_timestamps
        self.delta_indices = _delta_indices(delta_timestamps, self.meta, tolerance_s)
        self.episodes = None if episodes is None else sorted(set(int(e) for e in episodes))
        self._positions = self._episode_positions(self.episodes)
        self.return_uint8 = return_uint8
        self.image_cache_mb = image_cache_mb
        self.video_backend = check_backend(video_backend) if self.meta.video_keys else video_backend
        self._check_video_files()
        self.decoder_cache = (decoder_cache_size, int(decoder_cache_mb * 2**20), check_device(video_device, self.video_backend))
        self._frames: _Frames | None = None
        self._num_frames = len(self._data())

    def _episode_positions(self, episodes: list[int] | None) -> np.ndarray:
        if episodes is None:
            return np.arange(self.meta.num_episodes)
        known = set(self.meta.episode_index.tolist())
        unknown = [e for e in episodes if e not in known]
        if unknown:
            raise UserError(
                f"episodes {unknown} are not in {self.root} (it has episode indices "
                f"{int(self.meta.episode_index.min())}..{int(self.meta.episode_index.max())})"
            )
        return np.array([self.meta.episode_position(e) for e in episodes], dtype=np.int64)

    def _check_video_files(self) -> None:
        """Every MP4 the selected episodes need exists (a stat per file; nothing is decoded)."""
        for key, (files, _) in self.meta.episode_videos.items():
            for rel in dict.fromkeys(files[p] for p in self._positions):
                require_file(self.root / rel, key)

    @property
    def fps(self) -> int:
        return self.meta.fps

    @property
    def num_frames(self) -> int:
        return self._num_frames

    @property
    def num_episodes(self) -> int:
        return len(self._positions)

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        return self.meta.features

    @property
    def episode_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """`(from, to)` of each selected episode in this dataset's own index space (`to`
        exclusive): what `ds[i]` indexes, and so what a sampler must draw from."""
        frames = self._data()
        episodes = self.meta.episode_index[self._positions]
        lengths = self.meta.episode_to[self._positions] - self.meta.episode_from[self._positions]
        starts = np.array([frames.row_start[int(e)] for e in episodes], dtype=np.int64)
        return starts, starts + lengths

    def __len__(self) -> int:
        return self._num_frames

    def _data(self) -> _Frames:
        if self._frames is None:  # first use, or unpickled in a worker: read the data files here, once
            self._frames = _load_frames(self.meta, self._positions)
            self._frames.index_episodes(self.meta, int(self.image_cache_mb * 2**20))
            if self.meta.video_keys:
                self._frames.decoders = DecoderCache(self.video_backend, *self.decoder_cache)
                self._frames.tolerance_s = self.tolerance_s
        return self._frames

    def __getstate__(self) -> dict[str, Any]:
        # Send metadata only; the frames are rebuilt from disk on first use in the new process.
        return {**self.__dict__, "_frames": None}

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """Frame `idx`, as LeRobot's `LeRobotDataset[idx]` returns it."""
        return self._query(self._rows(np.asarray(int(idx))))

    def get_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Frames `indices` as one batch: what `default_collate([ds[i] for i in indices])`
        returns, built with array indexing instead of per-frame Python."""
        return self._query(self._rows(np.asarray(indices, dtype=np.int64)))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """`[ds[i] for i in indices]`, read as one batch (video files decoded once each)."""
        batch = self.get_batch(indices)
        return [{key: value[i] for key, value in batch.items()} for i in range(len(indices))]

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        if np.any((idx < -self._num_frames) | (idx >= self._num_frames)):
            raise IndexError(f"frame {idx} out of range for a dataset of {self._num_frames} frames")
        return idx % self._num_frames

    def _query(self, rows: np.ndarray) -> dict[str, Any]:
        """Features at `rows` (a 0-d array for one frame); `delta_timestamps` features are read at
        `row + offset`, clamped into the row's episode, with `<key>_is_pad` marking the clamped
        ones — LeRobot's _get_query_indices, in row space (an episode's rows are contiguous)."""
        frames = self._data()
        item: dict[str, Any] = {}
        pads: dict[str, torch.Tensor] = {}
        for key in self.features:
            offsets = self.delta_indices.get(key)
            if offsets is None:
                item[key] = frames.get(key, rows, self.return_uint8)
                continue
            target = rows[..., None] + offsets
            first, end = frames.first_row[rows][..., None], frames.end_row[rows][..., None]
            pads[f"{key}_is_pad"] = torch.from_numpy((target < first) | (target >= end))
            clamped = np.clip(target, first, end - 1)
            if key in frames.videos and len(offsets) == 1:
                clamped = clamped[..., 0]  # LeRobot squeezes a one-frame video query to (C, H, W)
            item[key] = frames.get(key, clamped, self.return_uint8)
        item.update(pads)
        task_index = frames.arrays["task_index"][rows]
        item["task"] = self.meta.tasks[int(task_index)] if rows.ndim == 0 else [self.meta.tasks[int(t)] for t in task_index]
        return item

    def __repr__(self) -> str:
        return (
            f"LeRobotDataset(root={str(self.root)!r}, codebase_version={self.meta.codebase_version!r}, "
            f"episodes={self.num_episodes}, frames={self.num_frames}, features={list(self.features)})"
        )


# --------------------------------------------------------------------------------------------
# Writing v3.0
# --------------------------------------------------------------------------------------------


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
            **{f"stats/{k}/{s}": v for k, per in stats.items() for s, v in per.items()},
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
                stats[key] = _image_stats(chw)
            else:
                stats[key] = _vector_stats(arrays[key])
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
        stats = self.episode_stats[0]
        for episode_stats in self.episode_stats[1:]:  # LeRobot folds in one episode at a time
            stats = aggregate_stats([stats, episode_stats])
        _write_json({k: {s: v.tolist() for s, v in per.items()} for k, per in stats.items()}, meta / "stats.json")
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
