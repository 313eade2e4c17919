"""Training on a weighted mixture of LeRobot datasets (robotrain.data.mixture): the order, the
batches, the features and stats, and whole runs through the CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from robotrain.config import DatasetConfig, MixtureMember, SamplerConfig
from robotrain.data import open_for_training
from robotrain.data.mixture import MixtureSampler, block_quotas
from robotrain.data.sampler import EpisodeAwareSampler, GlobalBatchSampler
from robotrain.data.writing import write_dataset
from robotrain.errors import UserError
from robotrain.policies.mlp import MLPConfig
from tests.conftest import assert_one_line_error, tree_digest
from tests.test_resume import assert_same_final_state

CAMERA = {"dtype": "image", "shape": [16, 16, 3], "names": ["height", "width", "channels"]}


def write_member(root: Path, member: int, *, episodes: int = 3, length: int = 12, fps: int = 10,
                 camera: str = "observation.image", state_dim: int = 2, extra: str | None = None,
                 video: bool = False) -> Path:
    """A small LeRobot v3.0 dataset whose state says which member and frame a sample is:
    state = [member, global frame index, ...], the camera filled with the member's number."""
    features = {"observation.state": {"dtype": "float32", "shape": [state_dim], "names": None},
                "action": {"dtype": "float32", "shape": [2], "names": None},
                camera: {**CAMERA, "dtype": "video" if video else "image"}}
    if extra:
        features[extra] = {"dtype": "float32", "shape": [1], "names": None}

    def episode(e: int) -> dict:
        index = np.arange(e * length, (e + 1) * length, dtype=np.float32)
        state = np.zeros((length, state_dim), np.float32)
        state[:, 0], state[:, 1] = member, index
        data = {"observation.state": state, "action": np.stack([index, index + 0.5], 1).astype(np.float32),
                camera: np.full((length, 16, 16, 3), 40 * member, np.uint8), "task": f"task of member {member}"}
        if extra:
            data[extra] = np.ones((length, 1), np.float32)
        return data

    write_dataset(root, repo_id=f"test/member{member}", fps=fps, features=features,
                  episodes=(episode(e) for e in range(episodes)))
    return root


def mixture_cfg(roots: list[Path], weights: list[float], **kwargs) -> DatasetConfig:
    members = [MixtureMember(repo_id=f"test/member{k}", weight=w, root=str(r)) for k, (r, w) in
               enumerate(zip(roots, weights))]
    return DatasetConfig(repo_id=None, root=None, datasets=members, **kwargs)


def open_mixture(roots, weights, seed=0, policy=None, **kwargs):
    cfg = mixture_cfg(roots, weights, **kwargs)
    return open_for_training(cfg, SamplerConfig(), policy or MLPConfig(), seed, roots)


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("members")
    return [write_member(base / "m0", 0, episodes=3, length=12),
            write_member(base / "m1", 1, episodes=2, length=20, fps=20),
            write_member(base / "m2", 2, episodes=4, length=7, video=True)]


def _samplers(sizes: list[int], seed: int = 0) -> list[EpisodeAwareSampler]:
    return [EpisodeAwareSampler([0], [n], seed=seed + k) for k, n in enumerate(sizes)]


@pytest.mark.parametrize("weights, expected", [([2.0, 1.0], [2, 1]), ([0.37, 0.63], [37, 63]), ([1.0], [1]),
                                               ([1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1])])
def test_block_quotas_are_the_weights_exact_ratios(weights, expected):
    quotas = block_quotas(weights)
    scale = quotas[0] // expected[0]
    assert quotas == [q * scale for q in expected]


def test_block_quotas_of_irregular_weights_are_close_and_keep_every_member():
    weights = [1e-9, *np.random.default_rng(0).uniform(0.1, 5.0, size=99).tolist()]
    quotas = block_quotas(weights)
    assert sum(quotas) == 1 << 20 and min(quotas) >= 1
    shares = np.array(quotas) / sum(quotas)
    assert np.abs(shares[1:] - np.array(weights[1:]) / sum(weights)).max() < 2 / (1 << 20)


def test_members_supply_their_weights_share_and_each_member_walks_its_own_order():
    members = _samplers([50, 7, 300])
    sampler = MixtureSampler(members, [2.0, 1.0, 1.0], [0, 50, 57], seed=3)
    positions = np.arange(3 * sampler.block_size)
    member, stream = sampler.members_at(positions)
    counts = Counter(member.tolist())
    assert [counts[k] / len(positions) for k in range(3)] == [0.5, 0.25, 0.25]
    for k in range(3):  # each member's stream positions are used once each, in blocks
        assert sorted(stream[member == k].tolist()) == list(range(counts[k]))
    frames = sampler.frames_at(positions)
    assert np.array_equal(frames[member == 1], 50 + members[1].frames_at(stream[member == 1]))
    # A batch is a mix, not a run of one member: the first 64 positions hold all three.
    assert set(member[:64].tolist()) == {0, 1, 2}


def test_every_member_draws_what_its_own_sampler_draws_at_its_stream_positions():
    """Feistel members are permuted together in one vectorized pass: it must give each member's own order."""
    members = [EpisodeAwareSampler([0, 40], [30, 97], seed=1, permutation="feistel", drop_n_first_frames=2),
               EpisodeAwareSampler([0], [5], seed=2, permutation="randperm"),
               EpisodeAwareSampler([0, 10, 13], [10, 13, 1000], seed=3, permutation="feistel"),
               EpisodeAwareSampler([0], [50], seed=4, shuffle=False)]
    sampler = MixtureSampler(members, [3.0, 1.0, 2.0, 1.0], [0, 100, 200, 1200], seed=9)
    positions = np.concatenate([np.arange(5000), np.arange(10**7, 10**7 + 3000)])
    member, stream = sampler.members_at(positions)
    expected = np.empty_like(stream)
    for k, own in enumerate(members):
        expected[member == k] = sampler.offsets[k] + own.frames_at(stream[member == k])
    assert np.array_equal(sampler.frames_at(positions), expected)


def test_the_order_is_a_pure_function_of_seed_and_position():
    def sampler(seed):
        return MixtureSampler(_samplers([50, 7, 300]), [2.0, 1.0, 1.0], [0, 50, 57], seed=seed)

    far = np.arange(10**9, 10**9 + 500)
    a, b = sampler(3), sampler(3)
    assert np.array_equal(a.frames_at(far), b.frames_at(far[::-1])[::-1])  # any order of asking, any seek
    assert np.array_equal(a.frames_at(np.arange(1000)), np.concatenate([b.frames_at(np.arange(k, k + 100))
                                                                         for k in range(0, 1000, 100)]))
    assert not np.array_equal(a.frames_at(np.arange(1000)), sampler(4).frames_at(np.arange(1000)))


def test_resume_at_another_world_size_draws_the_same_global_batches():
    sampler = MixtureSampler(_samplers([50, 7, 300]), [2.0, 1.0, 1.0], [0, 50, 57], seed=3)
    two = [GlobalBatchSampler(sampler, 4, num_processes=2, rank=r) for r in range(2)]
    one = GlobalBatchSampler(sampler, 8, start_position=two[0].position_after(5))
    for step in range(5, 9):
        assert one.batch(step - 5) == two[0].batch(step) + two[1].batch(step)


def test_state_refuses_another_mixture_or_one_dataset():
    sampler = MixtureSampler(_samplers([50, 7]), [2.0, 1.0], [0, 50], seed=3)
    sampler.seek(123)
    state = json.loads(json.dumps(sampler.state_dict()))
    same = MixtureSampler(_samplers([50, 7]), [2.0, 1.0], [0, 50], seed=3)
    same.load_state_dict(state)
    with pytest.raises(UserError, match="weights"):
        MixtureSampler(_samplers([50, 7]), [1.0, 1.0], [0, 50], seed=3).check_state_dict(state)
    with pytest.raises(UserError, match="members"):
        MixtureSampler(_samplers([50, 8]), [2.0, 1.0], [0, 50], seed=3).check_state_dict(state)
    with pytest.raises(UserError, match="mixture of datasets"):
        _samplers([50])[0].check_state_dict(state)
    with pytest.raises(UserError, match="one dataset"):
        same.check_state_dict(_samplers([50])[0].state_dict())


def test_batches_come_from_their_member_renamed_in_the_order_asked(members):
    dataset, sampler = open_mixture(members, [1.0, 1.0, 1.0])
    positions = np.arange(40)
    frames = sampler.frames_at(positions)
    batch = dataset.get_batch(frames.tolist())
    member, _ = sampler.members_at(positions)
    assert batch["member"].tolist() == member.tolist()
    state = batch["observation.state"]
    assert state[:, 0].tolist() == member.tolist()  # the member wrote its number into the state
    assert state[:, 1].tolist() == batch["index"].tolist()
    pixels = batch["observation.image"][:, 0, 0, 0].int()  # member 2's camera is AV1 video: lossy
    assert ((pixels - 40 * torch.from_numpy(member)).abs() <= 3).all()
    assert batch["task"] == [f"task of member {m}" for m in member.tolist()]
    # Each member's action chunk is read at its own fps (member 1 has 20, the others 10): consecutive
    # frames of the sample's own episode (action = [index, index + 0.5]), padded past its end.
    chunk = MLPConfig().chunk_size
    assert batch["action"].shape == (40, chunk, 2)
    lengths = {0: 12, 1: 20, 2: 7}
    for row in range(40):
        index, length = int(batch["index"][row]), lengths[int(member[row])]
        valid = min(chunk, length - index % length)
        assert batch["action"][row, :valid, 0].tolist() == list(range(index, index + valid))
        assert batch["action_is_pad"][row].tolist() == [False] * valid + [True] * (chunk - valid)


def test_stats_are_lerobots_aggregate_over_the_members(members):
    from robotrain.data import load_meta
    from robotrain.data.statistics import aggregate_stats

    dataset, _ = open_mixture(members, [5.0, 1.0, 1.0])
    expected = aggregate_stats([load_meta(root).stats for root in members])
    for key in ("observation.state", "action"):
        for stat in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(dataset.meta.stats[key][stat], expected[key][stat])
    frames = np.concatenate([np.arange(36), np.arange(40), np.arange(28)]).astype(np.float64)
    np.testing.assert_allclose(dataset.meta.stats["observation.state"]["mean"][1], frames.mean(), rtol=1e-6)


def test_rename_map_maps_a_members_camera_to_the_policys_name(tmp_path):
    roots = [write_member(tmp_path / "a", 0), write_member(tmp_path / "b", 1, camera="observation.images.wrist")]
    with pytest.raises(UserError, match=r"dataset.datasets\[1\] \(test/member1\) has no feature 'observation.image'"):
        open_mixture(roots, [1.0, 1.0])
    cfg = mixture_cfg(roots, [1.0, 1.0])
    cfg.datasets[1].rename_map = {"observation.images.wrist": "observation.image"}
    dataset, sampler = open_for_training(cfg, SamplerConfig(), MLPConfig(), 0, roots)
    batch = dataset.get_batch(sampler.frames_at(np.arange(16)).tolist())
    assert batch["observation.image"][:, 0, 0, 0].tolist() == [40 * m for m in batch["member"].tolist()]


def test_features_the_policy_does_not_use_are_kept_only_when_every_member_has_them(tmp_path):
    roots = [write_member(tmp_path / "a", 0, extra="observation.extra"), write_member(tmp_path / "b", 1)]
    policy = MLPConfig(input_features={"observation.state": {"type": "STATE", "shape": [2]},
                                       "observation.image": {"type": "VISUAL", "shape": [3, 16, 16]}},
                       output_features={"action": {"type": "ACTION", "shape": [2]}})
    dataset, _ = open_mixture(roots, [1.0, 1.0], policy=policy)
    assert "observation.extra" not in dataset.meta.features and "observation.extra" not in dataset.get_batch([0, 40])


@pytest.mark.parametrize("case, member_kwargs, rename, expected", [
    ("shape", {"state_dim": 3}, {}, "has 'observation.state' of shape [3]"),
    ("rename onto an existing feature", {"extra": "observation.extra"},
     {"observation.state": "observation.extra"}, "collides with its own feature 'observation.extra'"),
])
def test_incompatible_members_are_refused_naming_the_member(tmp_path, case, member_kwargs, rename, expected):
    roots = [write_member(tmp_path / "a", 0), write_member(tmp_path / "b", 1, **member_kwargs)]
    cfg = mixture_cfg(roots, [1.0, 1.0])
    cfg.datasets[1].rename_map = rename
    with pytest.raises(UserError, match=r"dataset.datasets\[1\] \(test/member1\)") as err:
        open_for_training(cfg, SamplerConfig(), MLPConfig(), 0, roots)
    assert expected in str(err.value)


def mixture_overrides(roots: list[Path], weights: list[float]) -> list[str]:
    members = ", ".join(f"{{repo_id: test/member{k}, weight: {w}, root: {r}}}" for k, (r, w) in
                        enumerate(zip(roots, weights)))
    return ["dataset=mixture", f"dataset.datasets=[{members}]"]


FAST = ["policy=mlp", "batch_size=6", "eval.enabled=false", "log_every=2", "scheduler.warmup_steps=2"]


RUN = [*FAST, "steps=8", "checkpoint.every=4", "log_samples=true"]


def global_batches(run_dir: Path, processes: int) -> dict[int, list[tuple[int, int]]]:
    """Each step's (member, index) pairs over all processes, in rank order."""
    out: dict[int, list] = {}
    for rank in range(processes):
        for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            out.setdefault(entry["step"], []).extend(zip(entry["member"], entry["index"]))
    return out


@pytest.fixture(scope="module")
def two_process_mixture(module_cli, members, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("mixture-ddp")
    done = module_cli.run(*RUN, *mixture_overrides(members, [2.0, 1.0, 1.0]), "distributed.processes=2",
                          "batch_size=3", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_a_mixture_trains_on_two_processes_logging_members_and_their_losses(two_process_mixture, members):
    batches = global_batches(two_process_mixture, 2)
    drawn = Counter(member for batch in batches.values() for member, _ in batch)
    assert sorted(batches) == list(range(1, 9)) and sum(drawn.values()) == 48 and set(drawn) == {0, 1, 2}
    logged = [json.loads(line) for line in (two_process_mixture / "metrics.jsonl").read_text().splitlines()]
    trained = [entry for entry in logged if "loss" in entry]
    assert trained and all({"member_loss/0", "member_loss/1", "member_loss/2"} <= set(entry) for entry in trained)
    config = json.loads((two_process_mixture / "checkpoints" / "000008" / "pretrained_model" /
                         "train_config.json").read_text())
    assert [(m["repo_id"], m["weight"]) for m in config["dataset"]["datasets"]] == \
        [("test/member0", 2.0), ("test/member1", 1.0), ("test/member2", 1.0)]
    # The normalization stats the processor files hold are the members' aggregate.
    from robotrain.data import load_meta
    from robotrain.data.statistics import aggregate_stats
    from robotrain.policies.base import read_processor_stats

    saved = read_processor_stats(two_process_mixture / "checkpoints" / "000008" / "pretrained_model")
    expected = aggregate_stats([load_meta(root).stats for root in members])
    for key in ("observation.state", "action"):
        np.testing.assert_allclose(saved[key]["mean"].numpy(), expected[key]["mean"], rtol=1e-6)
        np.testing.assert_allclose(saved[key]["std"].numpy(), expected[key]["std"], rtol=1e-6)


def test_a_mixture_resumes_bit_exact_on_two_processes(module_cli, members, two_process_mixture, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_mixture / "checkpoints" / "000004", run_dir / "checkpoints" / "000004")
    done = module_cli.run(*RUN, *mixture_overrides(members, [2.0, 1.0, 1.0]), "distributed.processes=2",
                          "batch_size=3", f"hydra.run.dir={run_dir}", "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_final_state(two_process_mixture, run_dir, step=8)


def test_a_mixture_resumed_on_one_process_draws_the_same_global_batches(module_cli, members, two_process_mixture,
                                                                        tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_mixture / "checkpoints" / "000004", run_dir / "checkpoints" / "000004")
    done = module_cli.run(*RUN, *mixture_overrides(members, [2.0, 1.0, 1.0]), "batch_size=6",
                          f"hydra.run.dir={run_dir}", "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, uninterrupted = global_batches(run_dir, 1), global_batches(two_process_mixture, 2)
    assert sorted(resumed) == [5, 6, 7, 8] and all(resumed[s] == uninterrupted[s] for s in resumed)


def test_resuming_with_other_weights_is_refused_unless_allowed(module_cli, members, two_process_mixture, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_mixture / "checkpoints" / "000004", run_dir / "checkpoints" / "000004")
    before = tree_digest(run_dir / "checkpoints")
    changed = mixture_overrides(members, [1.0, 1.0, 1.0])
    done = module_cli.run(*RUN, *changed, "batch_size=6", f"hydra.run.dir={run_dir}", "resume=auto")
    assert_one_line_error(done, "resume.allow_changes=true")
    assert "different dataset.datasets" in done.stderr and tree_digest(run_dir / "checkpoints") == before
    done = module_cli.run(*RUN, *changed, "batch_size=6", f"hydra.run.dir={run_dir}", "resume=auto",
                          "resume.allow_changes=true")
    assert done.returncode == 0, done.stderr[-3000:]


BAD_MIXTURES = {
    "empty list": (lambda roots: ["dataset=mixture"], "dataset.datasets is empty"),
    "weight 0": (lambda roots: mixture_overrides(roots[:2], [1.0, 0.0]), "weights must be > 0"),
    "negative weight": (lambda roots: mixture_overrides(roots[:2], [1.0, -2.0]), "weights must be > 0"),
    "duplicate member": (lambda roots: ["dataset=mixture", f"dataset.datasets=[{{repo_id: test/a, root: {roots[0]}}}, "
                                        f"{{repo_id: test/a, root: {roots[0]}}}]"], "repeats dataset.datasets[0]"),
    "missing member": (lambda roots: mixture_overrides([roots[0], roots[0].parent / "nope"], [1.0, 1.0]),
                       "dataset.datasets[1] (test/member1): dataset.root="),
    "two features renamed to one name": (
        lambda roots: [*mixture_overrides(roots[:2], [1.0, 1.0]),
                       "dataset.rename_map={observation.image: cam, observation.state: cam}"],
        "renames both 'observation.image' and 'observation.state' to 'cam'"),
    "quoted dict keys (Hydra reads them bare)": (
        lambda roots: [*mixture_overrides(roots[:2], [1.0, 1.0]), 'dataset.rename_map={"observation.image": "cam"}'],
        "'dataset.rename_map={observation.images.wrist: observation.images.cam1}'"),
    "repo_id beside datasets": (lambda roots: [*mixture_overrides(roots[:2], [1.0, 1.0]), "dataset.repo_id=user/x"],
                                "are both set"),
}


BAD_MIXTURES.update({
    "a rename onto a feature the member has": (
        lambda roots: [*mixture_overrides([roots[0], roots[3]], [1.0, 1.0]),
                       "dataset.rename_map={observation.state: observation.extra}"],
        "collides with its own feature 'observation.extra'"),
    "shapes that differ after renaming": (lambda roots: mixture_overrides([roots[0], roots[4]], [1.0, 1.0]),
                                          "has 'observation.state' of shape [3]"),
})


@pytest.fixture(scope="module")
def odd_members(members, tmp_path_factory) -> list[Path]:
    """`members`, then one with an extra feature and one with a state of size 3."""
    base = tmp_path_factory.mktemp("odd")
    return [*members, write_member(base / "extra", 1, extra="observation.extra"),
            write_member(base / "wide_state", 1, state_dim=3)]


@pytest.mark.parametrize("case", sorted(BAD_MIXTURES))
def test_bad_mixtures_are_one_line_errors_that_write_nothing(cli, odd_members, tmp_path, case):
    members = odd_members
    make, expected = BAD_MIXTURES[case]
    run_dir = tmp_path / "run"
    done = cli.run(*FAST, "steps=2", *make(members), f"hydra.run.dir={run_dir}")
    assert_one_line_error(done, expected)
    assert not (run_dir / "checkpoints").exists()


def test_v30_and_v21_members_read_alike(tmp_path):
    """LeRobot's own v3.0 dataset and the same frames laid out as v2.1, mixed: a sample reads the same
    from either member."""
    from tests.test_lerobot_format import REFERENCE, write_v21

    write_v21(tmp_path / "v21")
    dataset, _ = open_mixture([REFERENCE, tmp_path / "v21"], [1.0, 1.0])
    frames = list(range(0, 150, 7))
    batch = dataset.get_batch(frames + [150 + i for i in frames])
    assert batch["member"].tolist() == [0] * len(frames) + [1] * len(frames)
    for key in ("observation.state", "action", "action_is_pad", "observation.image", "index"):
        assert torch.equal(batch[key][: len(frames)], batch[key][len(frames):]), key


def test_a_hub_member_is_downloaded_once_by_the_main_process(module_cli, hub, members, tmp_path):
    repo = "user/mixture-member"
    hub.run_python(f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo({repo!r}, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id={repo!r}, repo_type="dataset", folder_path={str(members[1])!r})
    """)
    env = {**module_cli.env, **hub.env, "HF_LEROBOT_HOME": str(tmp_path / "lerobot")}
    mark = hub.mark()
    cli = type(module_cli)(env=env, cwd=tmp_path)
    done = cli.run(*FAST, "steps=3", "distributed.processes=2", "batch_size=3", "dataset=mixture",
                   f"dataset.datasets=[{{repo_id: test/member0, root: {members[0]}}}, {{repo_id: {repo}}}]",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    files = [d["file"] for d in hub.downloads(since=mark, repo=repo)]
    assert "data/chunk-000/file-000.parquet" in files and len(files) == len(set(files))
    assert (tmp_path / "lerobot" / repo / "meta" / "info.json").is_file()


def test_cameras_of_other_sizes_are_read_at_the_size_a_resizing_policy_resizes_them_to(tmp_path):
    """SmolVLA resizes every camera (with padding) to 512x512, here 16x16: members whose camera has
    another size are resized so in the loader, as the policy would, and its own resize is then a no-op."""
    from robotrain.policies.base import resize_with_pad
    from robotrain.policies.smolvla import SmolVLAConfig

    roots = [write_member(tmp_path / "a", 0), write_member(tmp_path / "b", 1)]
    info = json.loads((roots[1] / "meta" / "info.json").read_text())  # member 1: a 24x16 camera
    with pytest.raises(UserError, match="cameras may differ in size for a policy that resizes"):
        open_mixture([roots[0], write_wide(tmp_path / "wide", info)], [1.0, 1.0])
    wide = tmp_path / "wide"
    dataset, _ = open_mixture([roots[0], wide], [1.0, 1.0], policy=SmolVLAConfig(resize_imgs_with_padding=[16, 16]))
    assert dataset.meta.features["observation.image"]["shape"] == [16, 16, 3]
    batch = dataset.get_batch([0, 36, 1])
    assert batch["observation.image"].shape == (3, 3, 16, 16) and batch["observation.image"].dtype == torch.uint8
    original = dataset.datasets[1].get_batch([0])["observation.image"].float()
    expected = resize_with_pad(original, 16, 16, pad_value=0)
    assert (batch["observation.image"][1:2].float() - expected).abs().max() <= 0.5
    as_float = batch["observation.image"].float() / 255
    assert torch.equal(resize_with_pad(as_float, 16, 16, pad_value=0), as_float)  # the policy's resize: a no-op


def write_wide(root: Path, info: dict) -> Path:
    """A member like write_member's, with a 16 (high) x 24 (wide) camera holding a horizontal ramp."""
    features = {k: v for k, v in info["features"].items() if k in ("observation.state", "action")}
    features["observation.image"] = {**CAMERA, "shape": [16, 24, 3]}
    ramp = np.broadcast_to(np.linspace(0, 250, 24, dtype=np.float32)[None, None, :, None], (12, 16, 24, 3))
    episodes = [{"observation.state": np.zeros((12, 2), np.float32), "action": np.zeros((12, 2), np.float32),
                 "observation.image": ramp.astype(np.uint8), "task": "wide"} for _ in range(2)]
    if not (root / "meta").is_dir():
        write_dataset(root, repo_id="test/wide", fps=10, features=features, episodes=episodes)
    return root


def test_each_member_drops_the_first_and_last_frames_of_its_episodes(members):
    cfg = mixture_cfg(members, [1.0, 1.0, 1.0])
    dataset, sampler = open_for_training(cfg, SamplerConfig(drop_n_first_frames=2, drop_n_last_frames=3),
                                         MLPConfig(), 0, members)
    batch = dataset.get_batch(sampler.frames_at(np.arange(500)).tolist())
    lengths = torch.tensor([12, 20, 7])[batch["member"]]
    assert (batch["frame_index"] >= 2).all() and (batch["frame_index"] < lengths - 3).all()
    assert {int(f) for f in batch["frame_index"][batch["member"] == 2]} == {2, 3}  # 7 frames: 2 and 3 remain
