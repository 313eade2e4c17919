"""Reading a LeRobot dataset's frames: `LeRobotDataset` (LeRobot's constructor, items, and the
batched `get_batch` / `__getitems__`), the per-column readers that turn the data parquet into
numpy, and the cache of decoded embedded images. Metadata comes from `robotrain.data.metadata`;
video cameras are decoded by `robotrain.data.video`.

- Feature dtypes: float/int/bool scalars and 1-D vectors (any arrow list encoding),
  ``image`` features stored as embedded PNG/JPEG bytes (``struct<bytes: binary, path: string>``),
  and ``video`` features stored as MP4 files.
- ``LeRobotDataset[i]`` returns what LeRobot 0.6.1's ``LeRobotDataset[i]`` returns: float features
  as float32 tensors (scalars for shape ``[1]``), ints as int64, images as float32 (C, H, W) in
  [0, 1], ``task`` as a string, and for each ``delta_timestamps`` key the stacked frames plus a
  ``<key>_is_pad`` mask, with out-of-episode frames clamped to the episode's first/last frame.
- Not supported (each is a one-line ``UserError``): images stored as file paths instead of
  embedded bytes, and depth-map videos.
- With an ``episodes`` subset, ``len(ds)`` and ``ds[i]`` cover those episodes only (as LeRobot
  does); ``meta`` still describes the whole dataset, and ``meta.stats`` are the whole dataset's.

Memory: parquet is compressed, so reading decodes each data file once (``pq.read_table`` with
``memory_map=True``) into arrow buffers; every column is then converted once to numpy views of
those buffers (zero-copy when a column is a single chunk). ``__getitem__`` only indexes numpy
arrays and decodes the images it returns. DataLoader workers started with ``fork`` (the Linux
default) share those buffers copy-on-write; when pickled (``spawn``), the dataset sends only its
metadata and each worker decodes the data files again on its first item.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from robotrain.data.metadata import CAMERA_DTYPES, DatasetMeta, load_meta, read_parquet
from robotrain.data.video import (
    DEFAULT_DECODER_CACHE_MB,
    DEFAULT_DECODER_CACHE_SIZE,
    DecoderCache,
    VideoColumn,
    check_backend,
    check_device,
    frames_shape,
    require_file,
)
from robotrain.errors import UserError


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
        table = read_parquet(meta.root / rel, meta.root, columns=keys)  # only the features info.json lists
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
