"""Datasets: where they come from (`load_dataset`), how they are read
(`lerobot_format`), the order frames are drawn in (`sampler`), and the embedded task
(`synthetic`)."""

from __future__ import annotations

from pathlib import Path

from robotrain.config import DatasetConfig
from robotrain.errors import UserError


def prepare(cfg: DatasetConfig) -> Path:
    """Make the dataset available on local disk (generating the synthetic one) and return its root.

    In a multi-process run only the main process calls this before a barrier; the others
    then open the same folder."""
    from robotrain.data import synthetic

    if cfg.is_synthetic:
        spec = synthetic.SyntheticSpec(cfg.synthetic.num_episodes, cfg.synthetic.seed, cfg.synthetic.image_size)
        return synthetic.ensure_dataset(spec, Path(cfg.root).expanduser() if cfg.root else None)
    root = Path(cfg.root).expanduser()
    if not (root / "meta" / "info.json").is_file():
        raise UserError(f"dataset.root={root} holds no LeRobot dataset (no meta/info.json); check the path")
    return root


def open_dataset(cfg: DatasetConfig, root: Path, delta_timestamps: dict[str, list[float]]):
    from robotrain.data.lerobot_format import LeRobotDataset

    return LeRobotDataset(
        root, cfg.repo_id, delta_timestamps=delta_timestamps, tolerance_s=cfg.tolerance_s, episodes=cfg.episodes,
        image_cache_mb=cfg.image_cache_mb,
    )
