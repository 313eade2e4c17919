"""Dataset statistics as LeRobot computes and stores them (the algorithm of LeRobot's
compute_stats.py, so that the stats robotrain writes match LeRobot's): per-episode stats of
vectors and of sampled camera frames, their aggregation into dataset stats, and their stored
forms (``meta/stats.json``, v2.1's ``meta/episodes_stats.jsonl``, and the
``stats/<feature>/<stat>`` columns of v3.0's episodes parquet).

Numpy only: reading and writing the files that hold them is `robotrain.data.metadata`'s and
`robotrain.data.writing`'s job.

Deviation from LeRobot (on purpose): image ``std``. LeRobot 0.4.4 squares uint8 pixels in
uint8, which overflows and makes the stored image std wrong (fixed upstream later, lerobot PR
#3697). We square in int64, so our image std is the true one; every other statistic matches
LeRobot 0.4.4 bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
QUANTILE_KEYS = tuple(f"q{int(q * 100):02d}" for q in QUANTILES)
STAT_KEYS = ("min", "max", "mean", "std", "count", *QUANTILE_KEYS)
NUM_QUANTILE_BINS = 5000  # LeRobot's histogram resolution for quantiles


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


def vector_stats(data: np.ndarray) -> dict[str, np.ndarray]:
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


def image_stats(images_chw: np.ndarray) -> dict[str, np.ndarray]:
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


def fold_stats(stats_list: Sequence[Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Dataset stats as LeRobot's writer builds them: each episode folded into the running total
    in turn, whose float rounding can differ from `aggregate_stats` over all episodes at once."""
    stats = stats_list[0]
    for episode_stats in stats_list[1:]:
        stats = aggregate_stats([stats, episode_stats])
    return stats


def stats_from_json(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """`meta/stats.json` (or one episode's stats in v2.1's episodes_stats.jsonl), parsed, as arrays."""
    return {feature: {stat: np.array(v) for stat, v in per.items()} for feature, per in raw.items()}


def stats_to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """The form `meta/stats.json` stores: nested lists."""
    return {k: {s: v.tolist() for s, v in per.items()} for k, per in stats.items()}


def episode_stats_from_table(table: pa.Table) -> list[dict[str, dict[str, np.ndarray]]]:
    """Each episode's stats from the `stats/<feature>/<stat>` columns of v3.0's episodes parquet."""
    names = [n for n in table.column_names if n.startswith("stats/")]
    return [_episode_stats_from_row(row) for row in table.select(names).to_pylist()]


def _episode_stats_from_row(row: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """`{"stats/<feature>/<stat>": value}` -> `{feature: {stat: array}}` (feature names may hold dots)."""
    stats: dict[str, dict[str, np.ndarray]] = {}
    for name, value in row.items():
        feature, stat = name[len("stats/"):].rsplit("/", 1)
        if value is not None:
            stats.setdefault(feature, {})[stat] = np.array(value)
    return stats


def episode_stats_columns(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One episode's stats as the `stats/<feature>/<stat>` columns of its episodes-parquet row."""
    return {f"stats/{k}/{s}": v for k, per in stats.items() for s, v in per.items()}
