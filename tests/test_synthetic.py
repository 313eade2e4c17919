"""The embedded reach task: a deterministic generator writing LeRobot v3.0, an expert that
solves the simulator, and a cache that generates once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robotrain.config import SYNTHETIC_REPO_ID
from robotrain.data import synthetic
from robotrain.data.reading import LeRobotDataset

SPEC = synthetic.SyntheticSpec(num_episodes=6, seed=3, image_size=16)


@pytest.fixture
def dataset_root(tmp_path):
    return synthetic.ensure_dataset(SPEC, tmp_path / "ds")


def test_generated_dataset_is_lerobot_v3_with_state_image_action_and_task(dataset_root):
    info = json.loads((dataset_root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == synthetic.FPS
    assert info["features"]["observation.image"]["dtype"] == "image"
    for path in ("meta/stats.json", "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet",
                 "data/chunk-000/file-000.parquet"):
        assert (dataset_root / path).is_file()
    item = LeRobotDataset(SYNTHETIC_REPO_ID, root=dataset_root)[0]
    assert item["observation.state"].shape == (4,) and item["action"].shape == (2,)
    assert item["observation.image"].shape == (3, 16, 16)
    assert item["task"] == synthetic.TASK


def test_generation_is_a_pure_function_of_the_seed(tmp_path):
    a = synthetic.ensure_dataset(SPEC, tmp_path / "a")
    b = synthetic.ensure_dataset(SPEC, tmp_path / "b")
    c = synthetic.ensure_dataset(synthetic.SyntheticSpec(6, 4, 16), tmp_path / "c")
    data = "data/chunk-000/file-000.parquet"
    ds_a, ds_b, ds_c = (LeRobotDataset(SYNTHETIC_REPO_ID, root=p) for p in (a, b, c))
    assert len(ds_a) == len(ds_b)
    for i in range(len(ds_a)):
        for key in ("observation.state", "observation.image", "action"):
            assert (ds_a[i][key] == ds_b[i][key]).all()
    assert (a / data).read_bytes() != (c / data).read_bytes()


def test_dataset_is_generated_once_then_reused(dataset_root):
    stamp = (dataset_root / "meta" / "info.json").stat().st_mtime_ns
    assert synthetic.ensure_dataset(SPEC, dataset_root) == dataset_root
    assert (dataset_root / "meta" / "info.json").stat().st_mtime_ns == stamp


def test_default_cache_folder_is_named_after_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBOTRAIN_CACHE", str(tmp_path))
    root = synthetic.ensure_dataset(SPEC)
    assert root.is_relative_to(tmp_path) and SPEC.folder_name() in str(root)


def test_expert_solves_every_episode():
    env = synthetic.ReachEnv(200, image_size=16)
    obs = env.reset(np.random.default_rng(0))
    solved = np.zeros(200, dtype=bool)
    for _ in range(40):
        obs, success = env.step(synthetic.expert_action(obs["observation.state"]))
        solved |= success
    assert solved.all()


def test_standing_still_never_succeeds():
    env = synthetic.ReachEnv(200, image_size=16)
    env.reset(np.random.default_rng(0))
    _, success = env.step(np.zeros((200, 2), dtype=np.float32))
    assert not success.any()


def test_rendering_shows_agent_and_target_where_the_state_says():
    state = np.array([[-0.5, 0.5, 0.5, -0.5]], dtype=np.float32)
    image = synthetic.render(state, 32)[0]
    red_rows, red_cols = np.nonzero(image[..., 0] > 128)
    green_rows, green_cols = np.nonzero(image[..., 1] > 128)
    assert red_rows.mean() < 16 and red_cols.mean() < 16  # agent top-left
    assert green_rows.mean() > 16 and green_cols.mean() > 16  # target bottom-right
