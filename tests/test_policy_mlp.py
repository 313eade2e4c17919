"""The MLP policy and the policy base: LeRobot's pretrained_model folder round-trips, stats
stay out of the weights, and actions are queued chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robotrain import policies
from robotrain.config import SYNTHETIC_REPO_ID, parse
from robotrain.data import synthetic
from robotrain.data.reading import LeRobotDataset
from robotrain.eval.synthetic import observation_to_batch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = synthetic.ensure_dataset(synthetic.SyntheticSpec(4, 0, 16), tmp_path_factory.mktemp("ds") / "d")
    return LeRobotDataset(SYNTHETIC_REPO_ID, root=root, delta_timestamps={"action": [i / synthetic.FPS for i in range(10)]})


def make_policy(dataset, **fields):
    cfg = parse({"policy": {"type": "mlp", "hidden_dim": 32, **fields},
                 "dataset": {"repo_id": "robotrain/synthetic_reach", "root": None}})
    torch.manual_seed(0)
    return policies.make(cfg.policy, dataset.meta.features, dataset.meta.stats)


def observation(n: int):
    env = synthetic.ReachEnv(n, image_size=16)
    return observation_to_batch(env.reset(np.random.default_rng(0)), torch.device("cpu"))


def test_features_are_inferred_from_the_dataset(dataset):
    policy = make_policy(dataset)
    assert policy.config.input_features == {
        "observation.state": {"type": "STATE", "shape": [4]},
        "observation.image": {"type": "VISUAL", "shape": [3, 16, 16]},
    }
    assert policy.config.output_features == {"action": {"type": "ACTION", "shape": [2]}}


def test_save_and_load_round_trip_gives_identical_actions(dataset, tmp_path):
    policy = make_policy(dataset)
    policy.save_pretrained(tmp_path / "pretrained_model")
    loaded = policies.from_pretrained(tmp_path / "pretrained_model")
    obs = observation(3)
    assert torch.equal(policy.predict_action_chunk(obs), loaded.predict_action_chunk(obs))


def test_stats_are_not_in_the_state_dict(dataset):
    assert all("mean" not in k and "std" not in k for k in make_policy(dataset).state_dict())


def test_select_action_replays_n_action_steps_of_each_chunk(dataset):
    policy = make_policy(dataset, n_action_steps=3).eval()
    obs = observation(2)
    chunk = policy.predict_action_chunk(obs)
    actions = [policy.select_action(obs) for _ in range(3)]
    assert all(torch.equal(actions[i], chunk[:, i]) for i in range(3))
    assert len(policy._queue) == 0
    policy.select_action(observation(2))  # a fresh prediction once the queue is empty
    assert len(policy._queue) == 2


def test_loss_ignores_padded_targets(dataset):
    policy = make_policy(dataset)
    policy.reports_per_sample_loss = True  # as a mixture's training turns it on
    _, ends = dataset.episode_bounds
    batch = torch.utils.data.default_collate([dataset[int(i) - 1] for i in ends])  # last frames: padded chunks
    assert batch["action_is_pad"].any()
    loss, metrics = policy(batch)
    # Per-sample losses (a mixture's per-member loss averages them) weigh into the loss by valid entries.
    valid = (~batch["action_is_pad"]).sum(1).float()
    per_sample = metrics["per_sample_loss"]
    assert per_sample.shape == valid.shape and (per_sample * valid).sum() / valid.sum() == pytest.approx(loss.item(), rel=1e-5)
    batch["action"] = batch["action"] + 100.0 * batch["action_is_pad"].unsqueeze(-1)
    assert torch.equal(policy(batch)[0], loss)


def test_unknown_policy_type_lists_the_choices():
    from robotrain.errors import UserError

    with pytest.raises(UserError, match="choose one of: .*mlp"):
        policies.policy_class("nope")
