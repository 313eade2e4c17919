"""Specification of reading LeRobot v3.0/v2.1 and writing v3.0 (robotrain.data.metadata,
statistics, reading, writing).

`tests/data/lerobot_v3_tiny` was written by LeRobot 0.4.4 itself (LeRobotDataset.create +
add_frame + save_episode + finalize). Its content is a formula (see `state`, `action`, `image`
below), so every value read can be checked exactly, and the writer can be checked against the
files LeRobot wrote for the same content.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from robotrain.data.metadata import load_meta
from robotrain.data.reading import LeRobotDataset
from robotrain.data.statistics import aggregate_stats
from robotrain.data.writing import write_dataset
from robotrain.errors import UserError

REFERENCE = Path(__file__).parent / "data" / "lerobot_v3_tiny"
REPO_ID = "lerobot_ref/tiny"
LENGTHS = [20, 25, 30, 35, 40]
STARTS = np.cumsum([0] + LENGTHS)[:-1]
TASKS = ["pick up the red cube", "push the blue block to the left", "open the drawer"]
USER_FEATURES = ("observation.state", "action", "observation.image")
DATA_FILE = "data/chunk-000/file-000.parquet"
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"


# ---- the content formula -------------------------------------------------------------------


def state(e: int, t: np.ndarray | int) -> np.ndarray:
    t = np.asarray(t)[..., None]
    return np.sin(0.2 * t + 0.5 * e + np.arange(4)).astype(np.float32)


def action(e: int, t: np.ndarray | int) -> np.ndarray:
    s = state(e, t)  # float32 arithmetic, as the generating script did
    return np.stack([s[..., 0] + 2 * s[..., 1], s[..., 2] - s[..., 3] + np.float32(0.1)], axis=-1)


def image(e: int, t: np.ndarray | int) -> np.ndarray:
    """uint8 (..., 32, 32, 3)."""
    t = np.asarray(t)[..., None, None, None]
    h, w, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((10 * e + 3 * t + h + 2 * w + 80 * c) % 256).astype(np.uint8)


def image_tensor(e: int, t: int) -> torch.Tensor:
    return torch.from_numpy(image(e, t)).permute(2, 0, 1).float().div(255)


def formula_episodes():
    for e, length in enumerate(LENGTHS):
        t = np.arange(length)
        yield {"observation.state": state(e, t), "action": action(e, t), "observation.image": image(e, t),
               "task": TASKS[e % 3]}


def reference_info() -> dict:
    return json.loads((REFERENCE / "meta" / "info.json").read_text())


def user_features() -> dict:
    return {k: v for k, v in reference_info()["features"].items() if k in USER_FEATURES}


def assert_same_items(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_same_frames(a: LeRobotDataset, b: LeRobotDataset) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        assert_same_items(a[i], b[i])


@pytest.fixture(scope="module")
def reference() -> LeRobotDataset:
    return LeRobotDataset(REPO_ID, root=REFERENCE)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("written") / "dataset"
    write_dataset(root, repo_id="robotrain/test", fps=10, features=user_features(),
                  episodes=formula_episodes(), robot_type=reference_info()["robot_type"])
    return root


# ---- reading the LeRobot-written reference -------------------------------------------------


def test_every_reference_frame_matches_the_content_formula(reference):
    assert len(reference) == 150
    for e, length in enumerate(LENGTHS):
        for t in range(length):
            item = reference[int(STARTS[e]) + t]
            assert torch.equal(item["observation.state"], torch.from_numpy(state(e, t)))
            assert torch.equal(item["action"], torch.from_numpy(action(e, t)))
            assert torch.equal(item["observation.image"], image_tensor(e, t))
            assert item["timestamp"] == torch.tensor(t / 10, dtype=torch.float32)
            assert (item["frame_index"], item["episode_index"], item["index"]) == (t, e, STARTS[e] + t)
            assert item["task_index"] == e % 3 and item["task"] == TASKS[e % 3]


def test_items_have_lerobot_keys_dtypes_and_shapes(reference):
    item = reference[0]
    assert list(item) == [*reference_info()["features"], "task"]
    spec = {
        "observation.state": ((4,), torch.float32), "action": ((2,), torch.float32),
        "observation.image": ((3, 32, 32), torch.float32), "timestamp": ((), torch.float32),
        "frame_index": ((), torch.int64), "episode_index": ((), torch.int64),
        "index": ((), torch.int64), "task_index": ((), torch.int64),
    }
    assert {k: (tuple(item[k].shape), item[k].dtype) for k in spec} == spec
    assert 0.0 <= item["observation.image"].min() and item["observation.image"].max() <= 1.0


def test_reference_metadata_and_episode_boundaries(reference):
    meta = reference.meta
    assert (meta.codebase_version, meta.fps, meta.robot_type) == ("v3.0", 10, "lerobot_ref_dummy")
    assert meta.tasks == TASKS
    assert meta.episode_index.tolist() == [0, 1, 2, 3, 4]
    assert meta.episode_from.tolist() == STARTS.tolist()
    assert meta.episode_to.tolist() == (STARTS + LENGTHS).tolist()
    assert meta.episode_from.dtype == meta.episode_to.dtype == np.int64
    assert (meta.num_frames, meta.num_episodes, meta.camera_keys) == (150, 5, ["observation.image"])


def test_reference_stats_are_read_from_stats_json(reference):
    stats = reference.meta.stats
    raw = json.loads((REFERENCE / "meta" / "stats.json").read_text())
    assert set(stats) == set(raw) == set(reference_info()["features"])
    for feature, per in raw.items():
        assert set(stats[feature]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
        for name, value in per.items():
            np.testing.assert_array_equal(stats[feature][name], np.array(value))
    all_states = np.concatenate([state(e, np.arange(n)) for e, n in enumerate(LENGTHS)])
    np.testing.assert_array_equal(stats["observation.state"]["min"], all_states.min(0))
    np.testing.assert_array_equal(stats["observation.state"]["max"], all_states.max(0))
    assert stats["observation.image"]["mean"].shape == (3, 1, 1)
    assert stats["index"]["count"].tolist() == [150]


# ---- delta_timestamps ----------------------------------------------------------------------


def test_delta_timestamps_clamp_to_the_episode_and_flag_padding(reference):
    deltas = {"action": [k / 10 for k in range(10)], "observation.state": [-0.2, -0.1, 0.0],
              "observation.image": [-0.1, 0.0]}
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=deltas)
    # Episode 1 (global 20..44): its first frame looks back past the start...
    first = ds[20]
    assert first["observation.state_is_pad"].tolist() == [True, True, False]
    assert torch.equal(first["observation.state"], torch.from_numpy(state(1, np.array([0, 0, 0]))))
    assert first["observation.image_is_pad"].tolist() == [True, False]
    assert torch.equal(first["observation.image"], torch.stack([image_tensor(1, 0), image_tensor(1, 0)]))
    # ...and frame 20 of 25 looks ahead past its end: targets 20..29, the last 5 clamp to frame 24.
    late = ds[40]
    assert late["action_is_pad"].tolist() == [False] * 5 + [True] * 5
    assert torch.equal(late["action"], torch.from_numpy(action(1, np.minimum(np.arange(20, 30), 24))))
    assert late["action"].shape == (10, 2) and late["action_is_pad"].dtype == torch.bool
    assert late["index"] == 40 and late["task"] == TASKS[1]


def test_delta_timestamps_keep_lerobot_key_order(reference):
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps={"action": [0.0, 0.1]})
    assert list(ds[0]) == [*reference_info()["features"], "action_is_pad", "task"]


def test_delta_timestamps_off_the_frame_grid_are_refused():
    with pytest.raises(UserError, match=r"multiples of 1/10") as err:
        LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps={"action": [0.0, 0.05]})
    assert "\n" not in str(err.value)


def test_delta_timestamps_for_an_unknown_feature_are_refused():
    with pytest.raises(UserError, match="not a feature"):
        LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps={"observation.velocity": [0.0]})


# ---- episode subsets and worker processes --------------------------------------------------


def test_episode_subset_holds_only_those_episodes(reference):
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, episodes=[3, 1], delta_timestamps={"action": [-0.1, 0.0]})
    assert len(ds) == 25 + 35 and ds.num_episodes == 2
    assert [int(ds[i]["index"]) for i in range(len(ds))] == list(range(20, 45)) + list(range(75, 110))
    item = ds[25]  # first frame of episode 3
    assert (item["episode_index"], item["frame_index"]) == (3, 0)
    assert item["action_is_pad"].tolist() == [True, False]
    assert torch.equal(item["action"], torch.from_numpy(action(3, np.array([0, 0]))))


def test_unknown_episodes_are_refused():
    with pytest.raises(UserError, match=r"episodes \[7\]"):
        LeRobotDataset(REPO_ID, root=REFERENCE, episodes=[1, 7])


def test_dataset_pickles_without_its_frames(reference):
    blob = pickle.dumps(reference)
    assert len(blob) < 50_000  # metadata only; the frames are re-read in the receiving process
    clone = pickle.loads(blob)
    assert_same_items(clone[77], reference[77])


def test_dataloader_workers_return_the_same_batches(reference):
    loader = torch.utils.data.DataLoader(reference, batch_size=50, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(150))
    assert torch.equal(batches[1]["observation.image"][3], reference[53]["observation.image"])
    assert batches[2]["task"][0] == reference[100]["task"]


# ---- the writer ----------------------------------------------------------------------------


def test_written_dataset_reads_back_the_reference_frames(written, reference):
    assert_same_frames(LeRobotDataset(REPO_ID, root=written), reference)


def test_written_info_json_equals_lerobots(written):
    assert json.loads((written / "meta" / "info.json").read_text()) == reference_info()


def test_written_files_have_lerobots_columns_and_arrow_types(written):
    for rel in (DATA_FILE, EPISODES_FILE, "meta/tasks.parquet"):
        ours, theirs = pq.read_schema(written / rel), pq.read_schema(REFERENCE / rel)
        # str() of a type includes list child names ("element"), which LeRobot's files use.
        assert [(f.name, str(f.type)) for f in ours] == [(f.name, str(f.type)) for f in theirs], rel
    for rel in (EPISODES_FILE, "meta/tasks.parquet"):
        assert pq.read_schema(written / rel).metadata == pq.read_schema(REFERENCE / rel).metadata, rel
    hf = [json.loads(pq.read_schema(root / DATA_FILE).metadata[b"huggingface"]) for root in (written, REFERENCE)]
    assert hf[0]["info"] == hf[1]["info"]  # LeRobot's random "fingerprint" is not written
    assert pq.read_metadata(written / DATA_FILE).num_row_groups == 5  # a row group per episode, like LeRobot


def test_written_tasks_and_episode_rows_equal_lerobots(written):
    tasks = [pq.read_table(root / "meta/tasks.parquet").to_pylist() for root in (written, REFERENCE)]
    assert tasks[0] == tasks[1]
    ours = pq.read_table(written / EPISODES_FILE).to_pylist()
    theirs = pq.read_table(REFERENCE / EPISODES_FILE).to_pylist()
    not_stats = [k for k in theirs[0] if not k.startswith("stats/")]
    assert [{k: r[k] for k in not_stats} for r in ours] == [{k: r[k] for k in not_stats} for r in theirs]


def test_written_stats_equal_lerobots_except_image_std(written):
    """Every statistic (per episode and aggregated, quantiles included) equals LeRobot 0.4.4's,
    but the image std: LeRobot 0.4.4 squares uint8 pixels in uint8 (overflow), we don't."""
    ours = pq.read_table(written / EPISODES_FILE).to_pylist()
    theirs = pq.read_table(REFERENCE / EPISODES_FILE).to_pylist()
    for our_row, their_row in zip(ours, theirs):
        for key in (k for k in their_row if k.startswith("stats/") and k != "stats/observation.image/std"):
            np.testing.assert_allclose(our_row[key], their_row[key], rtol=1e-9, atol=0, err_msg=key)
    our_stats = json.loads((written / "meta" / "stats.json").read_text())
    their_stats = json.loads((REFERENCE / "meta" / "stats.json").read_text())
    assert set(our_stats) == set(their_stats)
    for feature, per in their_stats.items():
        assert set(our_stats[feature]) == set(per)
        for name in (n for n in per if (feature, n) != ("observation.image", "std")):
            np.testing.assert_allclose(our_stats[feature][name], per[name], rtol=1e-9, atol=0,
                                       err_msg=f"{feature}/{name}")


def test_written_image_std_is_the_true_pixel_std(written):
    pixels = np.concatenate([image(e, np.arange(n)) for e, n in enumerate(LENGTHS)]).reshape(-1, 3) / 255.0
    ours = json.loads((written / "meta" / "stats.json").read_text())["observation.image"]["std"]
    np.testing.assert_allclose(np.array(ours).reshape(3), pixels.std(axis=0), rtol=1e-9)


def test_writer_rolls_data_files_and_chunks_at_the_size_limit(tmp_path, reference):
    root = tmp_path / "split"
    meta = write_dataset(root, repo_id="robotrain/split", fps=10, features=user_features(),
                         episodes=formula_episodes(), chunks_size=2, data_files_size_in_mb=0.001)
    files = sorted(str(p.relative_to(root)) for p in root.glob("data/*/*.parquet"))
    assert files == ["data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
                     "data/chunk-001/file-000.parquet", "data/chunk-001/file-001.parquet",
                     "data/chunk-002/file-000.parquet"]
    assert meta.episode_data_files == files
    assert_same_frames(LeRobotDataset(REPO_ID, root=root), reference)


def test_written_folder_has_the_usual_permissions(written):
    umask = os.umask(0)
    os.umask(umask)
    assert written.stat().st_mode & 0o777 == 0o777 & ~umask  # not tempfile's private 0700


def test_writer_refuses_a_non_empty_root(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        write_dataset(tmp_path / "taken", repo_id="a/b", fps=10, features=user_features(), episodes=formula_episodes())
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_writer_leaves_nothing_behind_when_it_fails_midway(tmp_path):
    def two_then_crash():
        episodes = formula_episodes()
        yield next(episodes)
        yield next(episodes)
        raise RuntimeError("simulated crash while producing episode 2")

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(tmp_path / "ds", repo_id="a/b", fps=10, features=user_features(), episodes=two_then_crash())
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_arrays_that_do_not_match_the_features(tmp_path):
    bad = next(formula_episodes())
    bad["action"] = bad["action"][:, :1]
    with pytest.raises(UserError, match=r"'action' has shape \(20, 1\), expected \(20, 2\)"):
        write_dataset(tmp_path / "ds", repo_id="a/b", fps=10, features=user_features(), episodes=[bad])
    assert list(tmp_path.iterdir()) == []


# ---- v2.1 ----------------------------------------------------------------------------------


def write_v21(root: Path) -> None:
    """A v2.1 dataset of the formula content, laid out as LeRobot 0.3 wrote them."""
    features = reference_info()["features"]
    info = {"codebase_version": "v2.1", "robot_type": "lerobot_ref_dummy", "total_episodes": 5,
            "total_frames": 150, "total_tasks": 3, "total_videos": 0, "total_chunks": 1, "chunks_size": 1000,
            "fps": 10, "splits": {"train": "0:5"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": None, "features": features}
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": [TASKS[e % 3]], "length": n}) + "\n" for e, n in enumerate(LENGTHS)))
    (root / "data" / "chunk-000").mkdir(parents=True)
    for e, n in enumerate(LENGTHS):
        pq.write_table(v21_episode_table(e, n), root / "data" / "chunk-000" / f"episode_{e:06d}.parquet")
    # v2.1 episode stats had no quantiles; take LeRobot's min/max/mean/std/count per episode.
    rows = pq.read_table(REFERENCE / EPISODES_FILE).to_pylist()
    lines = []
    for e, row in enumerate(rows):
        stats: dict = {}
        for key, value in row.items():
            if key.startswith("stats/") and key.rsplit("/", 1)[1] in ("min", "max", "mean", "std", "count"):
                feature, stat = key[len("stats/"):].rsplit("/", 1)
                stats.setdefault(feature, {})[stat] = value
        lines.append(json.dumps({"episode_index": e, "stats": stats}) + "\n")
    (root / "meta" / "episodes_stats.jsonl").write_text("".join(lines))


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def v21_episode_table(e: int, n: int) -> pa.Table:
    t = np.arange(n)
    images = [{"bytes": png(img), "path": f"frame_{i:06d}.png"} for i, img in enumerate(image(e, t))]
    return pa.table({
        # variable-length lists, to read the other arrow list encoding too
        "observation.state": pa.array(state(e, t).tolist(), pa.list_(pa.float32())),
        "action": pa.array(action(e, t).tolist(), pa.list_(pa.float32())),
        "observation.image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "timestamp": pa.array((t / 10).astype(np.float32)),
        "frame_index": pa.array(t, pa.int64()),
        "episode_index": pa.array(np.full(n, e), pa.int64()),
        "index": pa.array(STARTS[e] + t, pa.int64()),
        "task_index": pa.array(np.full(n, e % 3), pa.int64()),
    })


def test_v21_dataset_reads_the_same_frames_as_v30(tmp_path, reference):
    write_v21(tmp_path / "v21")
    v21 = LeRobotDataset(REPO_ID, root=tmp_path / "v21")
    assert v21.meta.codebase_version == "v2.1"
    assert v21.meta.episode_from.tolist() == STARTS.tolist() and v21.meta.tasks == TASKS
    assert_same_frames(v21, reference)


def test_v21_stats_are_aggregated_from_episode_stats(tmp_path, reference):
    write_v21(tmp_path / "v21")
    stats = load_meta(tmp_path / "v21").stats
    ref = reference.meta.stats
    for feature in ref:
        assert set(stats[feature]) == {"min", "max", "mean", "std", "count"}
        np.testing.assert_array_equal(stats[feature]["count"], ref[feature]["count"])
        np.testing.assert_array_equal(stats[feature]["min"], ref[feature]["min"])
        np.testing.assert_array_equal(stats[feature]["max"], ref[feature]["max"])
        # LeRobot's stats.json folds episodes in one at a time, from float32 episode stats;
        # v2.1 aggregates all at once from JSON (float64): equal up to float32 rounding.
        np.testing.assert_allclose(stats[feature]["mean"], ref[feature]["mean"], rtol=1e-7)
        np.testing.assert_allclose(stats[feature]["std"], ref[feature]["std"], rtol=1e-7)


def test_v30_without_stats_json_aggregates_the_episode_stats(tmp_path, reference):
    root = copy_reference(tmp_path)
    (root / "meta" / "stats.json").unlink()
    stats = load_meta(root).stats
    assert set(stats) == set(reference.meta.stats)
    for feature, per in reference.meta.stats.items():
        assert set(stats[feature]) == set(per)
        for name, value in per.items():  # all at once vs LeRobot's one episode at a time
            np.testing.assert_allclose(stats[feature][name], value, rtol=1e-7, err_msg=f"{feature}/{name}")


def test_aggregated_stats_match_stats_of_all_frames():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3)) for n in (5, 9, 2)]
    merged = aggregate_stats([{"x": {"min": p.min(0), "max": p.max(0), "mean": p.mean(0), "std": p.std(0),
                                     "count": np.array([len(p)])}} for p in parts])["x"]
    everything = np.concatenate(parts)
    np.testing.assert_allclose(merged["mean"], everything.mean(0))
    np.testing.assert_allclose(merged["std"], everything.std(0))
    assert merged["count"].tolist() == [16]


# ---- refusals ------------------------------------------------------------------------------


def copy_reference(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(REFERENCE, root)
    return root


def edit_info(root: Path, **changes) -> None:
    info = json.loads((root / "meta" / "info.json").read_text())
    info.update(changes)
    (root / "meta" / "info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("version", ["v2.0", "v1.6"])
def test_unsupported_codebase_version_is_refused_with_the_fix(tmp_path, version):
    root = copy_reference(tmp_path)
    edit_info(root, codebase_version=version)
    with pytest.raises(UserError) as err:
        load_meta(root)
    message = str(err.value)
    assert f"codebase_version '{version}'" in message and "v3.0 and v2.1" in message and "convert" in message
    assert "\n" not in message


def test_missing_info_json_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"no meta/info.json in .*not a LeRobot dataset"):
        LeRobotDataset(REPO_ID, root=tmp_path)


def test_video_feature_without_episode_video_columns_is_refused(tmp_path):
    root = copy_reference(tmp_path)
    features = reference_info()["features"]
    features["observation.images.wrist"] = {"dtype": "video", "shape": [32, 32, 3],
                                            "names": ["height", "width", "channels"]}
    edit_info(root, features=features)
    with pytest.raises(UserError, match=r"meta/episodes lacks the columns .*wrist/from_timestamp.* re-download") as err:
        LeRobotDataset(REPO_ID, root=root)
    assert "\n" not in str(err.value)


def test_missing_data_file_is_refused(tmp_path):
    root = copy_reference(tmp_path)
    (root / DATA_FILE).unlink()
    with pytest.raises(UserError, match=r"no data/chunk-000/file-000.parquet in .*re-download"):
        LeRobotDataset(REPO_ID, root=root)


def test_writer_refuses_a_video_feature_that_is_not_rgb(tmp_path):
    features = {"cam": {"dtype": "video", "shape": [8, 8, 1], "names": ["height", "width", "channels"]}}
    with pytest.raises(UserError, match=r"video feature 'cam' needs shape \[height, width, 3\]"):
        write_dataset(tmp_path / "ds", repo_id="a/b", fps=10, features=features, episodes=[])


DELTAS = {"action": [-0.1, 0.0, 0.1, 0.2], "observation.image": [-0.1, 0.0]}


@pytest.mark.parametrize("image_cache_mb", [2048, 0])
def test_get_batch_equals_collated_items(image_cache_mb):
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS, image_cache_mb=image_cache_mb)
    indices = [0, 19, 20, 149, 75, 19, -1]  # episode starts and ends, a repeat, a negative index
    batch = ds.get_batch(indices)
    expected = torch.utils.data.default_collate([ds[i] for i in indices])
    assert list(batch) == list(expected)
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
        else:
            assert batch[key] == value, key


def test_cached_images_equal_freshly_decoded_ones():
    cached = LeRobotDataset(REPO_ID, root=REFERENCE)
    uncached = LeRobotDataset(REPO_ID, root=REFERENCE, image_cache_mb=0)
    for i in (3, 3, 77):  # the second read of 3 comes from the cache
        assert torch.equal(cached[i]["observation.image"], uncached[i]["observation.image"])


def test_get_batch_out_of_range_is_an_index_error(reference):
    with pytest.raises(IndexError):
        reference.get_batch([0, 150])
