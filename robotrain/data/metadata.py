"""LeRobot dataset metadata on local disk: the layout (codebase versions, path templates, the
bookkeeping features LeRobot adds to every dataset) and reading a dataset's ``meta/`` folder
into a `DatasetMeta`, with pyarrow and no LeRobot install.

Reads codebase ``v3.0`` (``meta/info.json``, ``meta/stats.json``, ``meta/tasks.parquet``,
``meta/episodes/chunk-*/file-*.parquet``; data in ``data/chunk-*/file-*.parquet``, any number
of data files and chunks; video cameras in ``videos/<key>/chunk-*/file-*.mp4`` holding several
episodes, each starting at its ``videos/<key>/from_timestamp``) and ``v2.1`` (one
``data/chunk-*/episode_*.parquet`` per episode, ``meta/episodes.jsonl``, ``meta/tasks.jsonl``,
``meta/episodes_stats.jsonl``, ``videos/chunk-*/<key>/episode_*.mp4``). Other codebase
versions are refused with a one-line ``UserError`` (convert them with LeRobot's conversion
scripts), as are folders that lack a file or column the metadata needs.

Statistics are decoded and aggregated by `robotrain.data.statistics`; frames are read by
`robotrain.data.reading`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from robotrain.data.statistics import aggregate_stats, episode_stats_from_table, stats_from_json
from robotrain.data.video import video_keys
from robotrain.errors import UserError

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

V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_CHUNKS_SIZE = 1000

_CONVERT_HINT = "convert it with LeRobot's conversion script (lerobot/datasets/v30/convert_dataset_v21_to_v30.py)"


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


def read_parquet(path: Path, root: Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet file of the dataset at `root`, memory-mapped; a missing file, or a missing one of
    `columns`, is a one-line error that names it."""
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
    table = pa.concat_tables([read_parquet(p, root) for p in paths], promote_options="default")
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
        stats = stats_from_json(_read_json(stats_path, root))
    else:  # LeRobot writes stats.json; without it, aggregate the per-episode stats it also writes
        stats = aggregate_stats(episode_stats_from_table(table))
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
    table = read_parquet(path, root)
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
        stats = stats_from_json(_read_json(meta / "stats.json", root))
    elif (meta / "episodes_stats.jsonl").is_file():
        rows = _read_jsonl(meta / "episodes_stats.jsonl", root)
        stats = aggregate_stats([stats_from_json(r["stats"]) for r in rows])
    else:
        stats = {}
    return tasks, episodes, stats
