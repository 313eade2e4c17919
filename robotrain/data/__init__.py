"""Datasets: where they come from (`prepare`; Hub downloads in `fetch`), the LeRobot format
(`metadata`, `statistics`, frames read by `reading` and written by `writing`, cameras stored as
video in `video`), the order frames are drawn in (`sampler`), batches (`loader`), and the
embedded task (`synthetic`)."""

from __future__ import annotations

from pathlib import Path

from robotrain.config import DatasetConfig
from robotrain.data.fetch import download, lerobot_home
from robotrain.errors import UserError

__all__ = ["download", "lerobot_home", "load_meta", "open_dataset", "open_for_training", "prepare", "prepare_all"]


def prepare(cfg: DatasetConfig) -> Path:
    """Make the dataset available on local disk (generating the synthetic one) and return its root.

    In a multi-process run only the main process calls this before a barrier; the others
    then open the same folder."""
    from robotrain.data import synthetic

    if cfg.is_synthetic:
        spec = synthetic.SyntheticSpec(cfg.synthetic.num_episodes, cfg.synthetic.seed, cfg.synthetic.image_size,
                                       cfg.synthetic.video)
        return synthetic.ensure_dataset(spec, Path(cfg.root).expanduser() if cfg.root else None)
    if cfg.root is None:
        return download(cfg.repo_id, cfg.revision)
    root = Path(cfg.root).expanduser()
    if not (root / "meta" / "info.json").is_file():
        raise UserError(f"dataset.root={root} holds no LeRobot dataset (no meta/info.json); check the path")
    return root


def prepare_all(cfg: DatasetConfig) -> list[Path]:
    """`prepare` the dataset, or each member of a mixture (their roots, in order)."""
    if not cfg.is_mixture:
        return [prepare(cfg)]
    roots = []
    for i, member in enumerate(cfg.datasets):
        try:
            roots.append(prepare(cfg.member(i)))
        except UserError as err:
            raise UserError(f"dataset.datasets[{i}] ({member.repo_id}): {err}") from None
    return roots


def open_for_training(cfg: DatasetConfig, sampler_cfg, policy_cfg, seed: int, roots: list[Path], device="cpu"):
    """(dataset, sampler) as the policy `policy_cfg` reads them (its action chunk and history), from
    the `roots` that `prepare_all` returned. A mixture, or one dataset with a rename_map, is read
    through `robotrain.data.mixture`."""
    from robotrain import policies

    if cfg.is_mixture or cfg.rename_map:
        return _open_mixture(cfg, sampler_cfg, policy_cfg, seed, roots, device)
    meta = load_meta(roots[0], cfg.repo_id)
    delta_timestamps = policies.with_dataset_features(policy_cfg, meta.features).delta_timestamps(meta.fps)
    dataset = open_dataset(cfg, meta, delta_timestamps, device=device)
    return dataset, _episode_sampler(dataset, sampler_cfg, policy_cfg, seed)


def _open_mixture(cfg: DatasetConfig, sampler_cfg, policy_cfg, seed: int, roots: list[Path], device):
    """(MixtureDataset, MixtureSampler) of `cfg`'s members (or of its one dataset, renamed), read
    as `policy_cfg` needs (see robotrain.data.mixture)."""
    from robotrain import policies
    from robotrain.data.mixture import Member, MixtureDataset, MixtureSampler, common_features, mixture_meta

    sources = [cfg.member(k) for k in range(len(cfg.datasets))] if cfg.is_mixture else [cfg]
    weights = [m.weight for m in cfg.datasets] if cfg.is_mixture else [1.0]
    members = []
    for k, (source, root) in enumerate(zip(sources, roots)):
        name = f"dataset.datasets[{k}] ({source.repo_id})" if cfg.is_mixture else f"dataset {source.repo_id}"
        members.append(Member.of(name, load_meta(root, source.repo_id), source.rename_map or {}))
    resolved = policies.with_dataset_features(policy_cfg, members[0].features)
    needed = [*resolved.input_features, *resolved.output_features]
    meta = mixture_meta(members, common_features(members, needed, resolved.image_resize()))
    datasets, samplers = [], []
    for k, (source, member) in enumerate(zip(sources, members)):
        deltas = {member.original(key): v for key, v in resolved.delta_timestamps(member.meta.fps).items()}
        datasets.append(open_dataset(source, member.meta, deltas, device=device))
        samplers.append(_episode_sampler(datasets[-1], sampler_cfg, policy_cfg, seed, member=k))
    dataset = MixtureDataset(datasets, members, meta)
    return dataset, MixtureSampler(samplers, weights, dataset.offsets, seed=seed, shuffle=sampler_cfg.shuffle)


def _episode_sampler(dataset, sampler_cfg, policy_cfg, seed: int, member: int | None = None):
    """The dataset's episode-aware order; a mixture member's is seeded apart from the others'."""
    from robotrain.data.sampler import EpisodeAwareSampler, derived_seed

    return EpisodeAwareSampler(
        *dataset.episode_bounds, seed=seed if member is None else derived_seed(seed, f"mixture member {member}"),
        shuffle=sampler_cfg.shuffle, permutation=sampler_cfg.permutation,
        drop_n_first_frames=sampler_cfg.drop_n_first_frames,
        # A policy may ask for more (LeRobot's Diffusion: its action horizon reaches past the end).
        drop_n_last_frames=max(sampler_cfg.drop_n_last_frames, getattr(policy_cfg, "drop_n_last_frames", 0)),
    )


def load_meta(root: Path, repo_id: str | None = None):
    """The dataset's metadata (info, episodes, tasks, stats), read once per run and shared."""
    from robotrain.data.metadata import load_meta

    return load_meta(root, repo_id)


def open_dataset(cfg: DatasetConfig, meta, delta_timestamps: dict[str, list[float]], device="cpu"):
    """The dataset `meta` describes (from `load_meta`), as `cfg` selects it, for training: camera
    frames stay uint8 until the training device (`loader.to_device`); video is decoded on the
    CPU, or on `device` (the training device) with `dataset.video_device=cuda`."""
    from robotrain.data.reading import LeRobotDataset

    return LeRobotDataset(
        cfg.repo_id, meta.root, episodes=cfg.episodes, delta_timestamps=delta_timestamps,
        tolerance_s=cfg.tolerance_s, video_backend=cfg.video_backend, return_uint8=True,
        image_cache_mb=cfg.image_cache_mb, decoder_cache_size=cfg.video_decoder_cache,
        decoder_cache_mb=cfg.video_decoder_cache_mb, video_device=device if cfg.video_device == "cuda" else "cpu",
        meta=meta,
    )


def __getattr__(name: str):
    # `robotrain.data.LeRobotDataset`, the public home, imported on first use: reading the
    # package (config, dispatch) must not pull in pyarrow and the video decoders.
    if name == "LeRobotDataset":
        from robotrain.data.reading import LeRobotDataset

        return LeRobotDataset
    raise AttributeError(f"module 'robotrain.data' has no attribute {name!r}")
