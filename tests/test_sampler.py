"""Specification of `robotrain.data.sampler`: deterministic, seekable, episode-aware order."""

import itertools
import json
import tracemalloc

import numpy as np
import pytest

from robotrain.data.sampler import (
    EpisodeAwareSampler,
    GlobalBatchSampler,
    feistel_keys,
    feistel_permute,
)
from robotrain.errors import UserError

PERMUTATIONS = ["randperm", "feistel"]
# Uneven episodes with a gap between the second and third, and one episode (length 2) too short
# to keep any frame once 1 + 2 frames are dropped.
FROM = [0, 7, 25, 27, 40]
TO = [7, 20, 27, 40, 41]


def valid_frames(drop_first: int, drop_last: int) -> list[int]:
    return [f for a, b in zip(FROM, TO) for f in range(a + drop_first, b - drop_last)]


def make(permutation="randperm", drop_first=0, drop_last=0, **kwargs) -> EpisodeAwareSampler:
    return EpisodeAwareSampler(
        FROM,
        TO,
        permutation=permutation,
        drop_n_first_frames=drop_first,
        drop_n_last_frames=drop_last,
        **kwargs,
    )


def epoch_order(sampler: EpisodeAwareSampler, epoch: int) -> list[int]:
    n = len(sampler)
    return sampler.frames_at(np.arange(epoch * n, (epoch + 1) * n)).tolist()


@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("drops", [(0, 0), (1, 2)])
def test_every_valid_frame_comes_exactly_once_per_epoch(permutation, drops):
    sampler = make(permutation, *drops)
    expected = valid_frames(*drops)
    assert len(sampler) == len(expected)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == expected


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_dropped_first_and_last_frames_are_never_drawn(permutation):
    sampler = make(permutation, drop_first=2, drop_last=3)
    drawn = set(sampler.frames_at(np.arange(10 * len(sampler))).tolist())
    dropped = {f for a, b in zip(FROM, TO) for f in [*range(a, a + 2), *range(b - 3, b)]}
    assert drawn.isdisjoint(dropped)
    assert drawn == set(valid_frames(2, 3))


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_without_shuffle_frames_come_in_dataset_order(permutation):
    sampler = make(permutation, drop_first=1, drop_last=1, shuffle=False)
    assert list(sampler) == valid_frames(1, 1)
    assert list(sampler) == valid_frames(1, 1)


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_different_epochs_give_different_orders(permutation):
    sampler = make(permutation)
    assert epoch_order(sampler, 0) != epoch_order(sampler, 1)


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_same_seed_and_epoch_give_same_order_in_fresh_instances(permutation):
    first, second = make(permutation, seed=7), make(permutation, seed=7)
    second.set_epoch(3)
    list(itertools.islice(iter(first), 5))  # iteration state must not leak into the order
    assert epoch_order(first, 3) == epoch_order(second, 3) == list(second)


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_different_seeds_give_different_orders(permutation):
    assert epoch_order(make(permutation, seed=0), 0) != epoch_order(make(permutation, seed=1), 0)


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_iteration_then_moves_on_to_the_next_epoch(permutation):
    sampler = make(permutation, seed=3)
    assert list(sampler) == epoch_order(sampler, 0)
    assert sampler.epoch == 1
    assert list(sampler) == epoch_order(sampler, 1)


@pytest.mark.parametrize("permutation", PERMUTATIONS)
@pytest.mark.parametrize("drops", [(0, 0), (1, 2)])
def test_resume_from_state_dict_yields_exactly_the_remainder(permutation, drops):
    rng = np.random.default_rng(0)
    for _ in range(20):
        epoch, cut = int(rng.integers(0, 5)), int(rng.integers(0, len(make(permutation, *drops))))
        original = make(permutation, *drops, seed=11)
        original.set_epoch(epoch)
        it = iter(original)
        head = list(itertools.islice(it, cut))
        state = json.loads(json.dumps(original.state_dict()))
        resumed = make(permutation, *drops, seed=11)
        resumed.load_state_dict(state)
        assert head + list(resumed) == epoch_order(original, epoch)
        assert list(resumed) == epoch_order(original, epoch + 1)


def test_set_epoch_to_the_restored_epoch_keeps_the_restored_position():
    original = make(seed=5)
    original.set_epoch(2)
    list(itertools.islice(iter(original), 10))
    resumed = make(seed=5)
    resumed.load_state_dict(original.state_dict())
    resumed.set_epoch(2)
    assert list(resumed) == epoch_order(original, 2)[10:]


def test_state_dict_is_json_serialisable_and_names_its_settings():
    state = make("feistel", drop_first=1, seed=4).state_dict()
    assert json.loads(json.dumps(state)) == state
    assert {"seed", "epoch", "position", "permutation", "shuffle", "drop_n_first_frames",
            "drop_n_last_frames", "num_samples"} <= state.keys()


@pytest.mark.parametrize(
    "other",
    [
        {"seed": 1},
        {"permutation": "feistel"},
        {"shuffle": False},
        {"drop_first": 1},
        {"drop_last": 1},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_state_of_an_incompatible_sampler_is_refused(other):
    state = make(seed=0).state_dict()
    with pytest.raises(UserError):
        make(**{"seed": 0, **other}).load_state_dict(state)


def test_state_of_a_different_dataset_is_refused():
    state = EpisodeAwareSampler([0], [10]).state_dict()
    with pytest.raises(UserError, match="num_samples"):
        EpisodeAwareSampler([0], [11]).load_state_dict(state)


@pytest.mark.parametrize("n", [*range(1, 70), 255, 256, 257, 1000, 4097])
def test_feistel_is_a_bijection(n):
    for seed, epoch in [(0, 0), (1, 0), (0, 5)]:
        out = feistel_permute(np.arange(n), n, feistel_keys(seed, epoch))
        assert np.array_equal(np.sort(out), np.arange(n))


def test_feistel_at_1e12_frames_seeks_and_draws_without_per_frame_memory():
    episodes, length = 10**6, 10**6
    start = np.arange(episodes, dtype=np.int64) * length
    end = start + length
    tracemalloc.start()
    try:
        sampler = EpisodeAwareSampler(start, end, permutation="feistel", drop_n_first_frames=1)
        sampler.seek(3 * len(sampler) + 123_456_789_012)
        drawn = np.fromiter(itertools.islice(iter(sampler), 5000), dtype=np.int64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(sampler) == episodes * (length - 1)
    assert peak < 64 * 2**20
    assert np.unique(drawn).size == drawn.size
    assert np.all(drawn % length != 0)  # the dropped first frame of every episode
    assert drawn.tolist() == sampler.frames_at(3 * len(sampler) + 123_456_789_012
                                               + np.arange(5000)).tolist()


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_frames_at_spans_the_epoch_boundary(permutation):
    sampler = make(permutation, drop_first=1)
    n = len(sampler)
    across = sampler.frames_at(np.arange(n - 4, n + 4)).tolist()
    assert across == epoch_order(sampler, 0)[-4:] + epoch_order(sampler, 1)[:4]
    assert [sampler.frame_at(p) for p in range(n - 4, n + 4)] == across


@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_ranks_batches_concatenate_to_the_single_process_global_batch(permutation):
    sampler = make(permutation, seed=2)
    single = iter(GlobalBatchSampler(sampler, 12))
    ranks = [iter(GlobalBatchSampler(sampler, 4, num_processes=3, rank=r)) for r in range(3)]
    for _ in range(10):  # 120 positions cross three epochs of 36 frames
        assert next(single) == next(ranks[0]) + next(ranks[1]) + next(ranks[2])


def test_global_batches_cover_each_epoch_without_overlap_or_gap():
    sampler = make(seed=9)
    ranks = [GlobalBatchSampler(sampler, 3, num_processes=2, rank=r) for r in range(2)]
    steps = 2 * len(sampler) // 6  # 36 frames per epoch: two epochs, no partial batch
    stream = [f for step in range(steps) for r in ranks for f in r.batch(step)]
    assert stream == epoch_order(sampler, 0) + epoch_order(sampler, 1)


def test_resume_on_a_different_world_size_continues_the_global_order():
    sampler = make("feistel", seed=1)
    before = GlobalBatchSampler(sampler, 4, num_processes=2)  # global batch 8
    steps_done = 5
    start = before.position_after(steps_done)
    reference = iter(GlobalBatchSampler(sampler, 8, start_position=0))
    expected = [f for batch in itertools.islice(reference, steps_done + 4) for f in batch]
    after = [iter(GlobalBatchSampler(sampler, 2, num_processes=4, rank=r, start_position=start))
             for r in range(4)]
    resumed = [f for _ in range(4) for it in after for f in next(it)]
    assert resumed == expected[steps_done * 8:]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"permutation": "sobol"},
        {"drop_n_first_frames": -1},
        {"drop_n_last_frames": -2},
        {"drop_n_first_frames": 10, "drop_n_last_frames": 10},
        {"episode_to": [7, 20]},
        {"episode_from": [], "episode_to": []},
        {"episode_from": [0, 5], "episode_to": [10, 15]},
        {"episode_from": [5], "episode_to": [3]},
        {"episode_from": [0.0], "episode_to": [3.0]},
    ],
    ids=["permutation", "neg_first", "neg_last", "drops_leave_nothing", "mismatched",
         "no_episodes", "overlap", "reversed", "float"],
)
def test_invalid_arguments_raise_a_one_line_user_error(kwargs):
    args = {"episode_from": FROM, "episode_to": TO, **kwargs}
    with pytest.raises(UserError) as err:
        EpisodeAwareSampler(args.pop("episode_from"), args.pop("episode_to"), **args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"num_processes": 0}, {"rank": 2},
                                    {"start_position": -1}])
def test_invalid_global_batch_arguments_raise_user_error(kwargs):
    args = {"batch_size": 4, "num_processes": 2, **kwargs}
    with pytest.raises(UserError):
        GlobalBatchSampler(make(), args.pop("batch_size"), **args)


def test_episodes_may_be_listed_out_of_order():
    sampler = EpisodeAwareSampler([20, 0], [30, 10], shuffle=False)
    assert sorted(sampler) == [*range(0, 10), *range(20, 30)]
