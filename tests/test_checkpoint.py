"""Checkpoints: LeRobot's layout, file for file and key for key, and atomic saves that a
kill -9 at any instant cannot break."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from robotrain import checkpoint, checkpoint_layout as layout
from robotrain.errors import UserError
from tests.conftest import REPO_ROOT
from tests.tiny_checkpoints import Tiny

REFERENCE = Path(__file__).parent / "data" / "lerobot_act_checkpoint"
RNG_KEYS = {"py_rng_state", "py_rng_version", "np_rng_state_values", "np_rng_state_index",
            "np_rng_has_gauss", "np_rng_cached_gaussian", "torch_rng_state"}


def keys_and_metadata(path: Path) -> tuple[list[str], dict | None]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys()), f.metadata()


def test_step_folders_and_last_symlink_follow_lerobot(trained_run):
    checkpoints = trained_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["000010", "000020", "last"]
    assert os.readlink(checkpoints / "last") == "000020"  # relative


def test_step_folder_name_pads_to_the_total_steps():
    assert layout.step_folder_name(5, 100) == "000005"
    assert layout.step_folder_name(5, 12_345_678) == "00000005"


def test_pretrained_model_has_lerobots_files(trained_run):
    folder = trained_run / "checkpoints" / "000020" / "pretrained_model"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "config.json", "model.safetensors", "train_config.json",
        "policy_preprocessor.json", "policy_preprocessor_step_3_normalizer_processor.safetensors",
        "policy_postprocessor.json", "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
    ])


def test_config_json_starts_with_type_then_features(trained_run):
    config = json.loads((trained_run / "checkpoints" / "000020" / "pretrained_model" / "config.json").read_text())
    reference = json.loads((REFERENCE / "pretrained_model" / "config.json").read_text())
    assert list(config)[:4] == list(reference)[:4] == ["type", "n_obs_steps", "input_features", "output_features"]
    assert config["type"] == "mlp"
    assert config["input_features"]["observation.state"] == {"type": "STATE", "shape": [4]}


def test_model_safetensors_holds_only_the_state_dict(trained_run):
    from robotrain import policies

    folder = trained_run / "checkpoints" / "000020" / "pretrained_model"
    keys, metadata = keys_and_metadata(folder / "model.safetensors")
    policy = policies.from_pretrained(folder)
    assert sorted(keys) == sorted(policy.state_dict())
    assert metadata is None
    assert not any(k.endswith((".mean", ".std")) for k in keys)  # stats live in the processor files


def test_processor_files_match_lerobots_pipeline(trained_run):
    folder = trained_run / "checkpoints" / "000020" / "pretrained_model"
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        ours = json.loads((folder / name).read_text())
        theirs = json.loads((REFERENCE / "pretrained_model" / name).read_text())
        assert [s["registry_name"] for s in ours["steps"]] == [s["registry_name"] for s in theirs["steps"]]
        assert [s.get("state_file") for s in ours["steps"]] == [s.get("state_file") for s in theirs["steps"]]
    keys, _ = keys_and_metadata(folder / "policy_preprocessor_step_3_normalizer_processor.safetensors")
    for feature in ("observation.state", "observation.image", "action", "timestamp", "index"):
        for stat in ("mean", "std", "min", "max", "count", "q01", "q99"):
            assert f"{feature}.{stat}" in keys


def test_training_state_has_lerobots_files_and_keys(trained_run):
    folder = trained_run / "checkpoints" / "000020" / "training_state"
    assert {"training_step.json", "optimizer_state.safetensors", "optimizer_param_groups.json",
            "scheduler_state.json", "rng_state.safetensors", "sampler_state.json"} == {p.name for p in folder.iterdir()}
    keys, _ = keys_and_metadata(folder / "optimizer_state.safetensors")
    assert keys and all(re.fullmatch(r"state/\d+/(exp_avg|exp_avg_sq|step)", k) for k in keys)
    groups = json.loads((folder / "optimizer_param_groups.json").read_text())
    reference_groups = json.loads((REFERENCE / "training_state" / "optimizer_param_groups.json").read_text())
    assert set(reference_groups[0]) <= set(groups[0])  # plus initial_lr, which a scheduler adds
    rng_keys, _ = keys_and_metadata(folder / "rng_state.safetensors")
    assert set(rng_keys) == RNG_KEYS


def test_training_step_records_what_an_elastic_resume_needs(trained_run):
    info = json.loads((trained_run / "checkpoints" / "000020" / "training_state" / "training_step.json").read_text())
    assert info == {"step": 20, "num_processes": 1, "batch_size": 8, "global_batch_size": 8, "sample_position": 160}
    sampler = json.loads((trained_run / "checkpoints" / "000020" / "training_state" / "sampler_state.json").read_text())
    assert sampler["seed"] == 0 and sampler["epoch"] * sampler["num_samples"] + sampler["position"] >= 0


def test_latest_ignores_temporary_and_incomplete_folders(trained_run, tmp_path):
    import shutil

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(trained_run / "checkpoints", checkpoints, symlinks=True)
    (checkpoints / ".tmp-000030-123" / "training_state").mkdir(parents=True)
    (checkpoints / "000040").mkdir()
    assert layout.latest(checkpoints).name == "000020"


def test_prune_keeps_the_newest_and_the_protected(trained_run, tmp_path):
    import shutil

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(trained_run / "checkpoints", checkpoints, symlinks=True)
    shutil.copytree(checkpoints / "000020", checkpoints / "000030")
    deleted = checkpoint.prune(checkpoints, keep_last=1, protect=frozenset({"000010"}))
    assert [p.name for p in deleted] == ["000020"]
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["000010", "000030"]


def test_corrupt_optimizer_state_is_refused_before_anything_is_restored(tmp_path):
    saved = Tiny(tmp_path / "checkpoints")
    saved.train_step()
    folder = saved.manager.save(1)
    (folder / "training_state" / "optimizer_state.safetensors").write_bytes(b"not safetensors")
    fresh = Tiny(tmp_path / "other")
    weights, lr_before, rng_before = fresh.model.weight.detach().clone(), fresh.scheduler.state_dict(), torch.get_rng_state()
    with pytest.raises(UserError, match="corrupt"):
        fresh.manager.load(folder)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(fresh.model.weight, weights) and fresh.scheduler.state_dict() == lr_before
    assert fresh.position.step == 0


def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    """Every part is read and checked before any is loaded: a model of another size is refused
    by the optimizer's check, after the weights were read, before they were loaded."""
    saved = Tiny(tmp_path / "checkpoints", size=3)
    saved.train_step()
    folder = saved.manager.save(1)
    other = Tiny(tmp_path / "other", size=2)
    other.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    weights = other.model.weight.detach().clone()
    with pytest.raises(UserError, match="optimizer covers 2 parameters in 1 groups"):
        other.manager.load(folder)
    assert torch.equal(other.model.weight, weights) and other.position.step == 0


def test_a_part_joins_by_registration(tmp_path):
    """A new stateful part (EMA weights, say) is saved and loaded by registering it."""
    class Counter:
        def __init__(self, value: int):
            self.value = value

        def state_dict(self) -> dict:
            return {"value": self.value}

        def load_state_dict(self, state: dict) -> None:
            self.value = state["value"]

    saved = Tiny(tmp_path / "checkpoints")
    saved.manager.register({"counter": checkpoint.Json(Counter(7), "training_state/counter.json")})
    folder = saved.manager.save(3)
    assert json.loads((folder / "training_state" / "counter.json").read_text()) == {"value": 7}
    fresh, counter = Tiny(tmp_path / "other"), Counter(0)
    fresh.manager.register({"counter": checkpoint.Json(counter, "training_state/counter.json")})
    fresh.manager.load(folder)
    assert counter.value == 7 and fresh.position.step == 3 and fresh.position.sample_position == 6


SAVER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from robotrain import checkpoint_layout as layout
    from tests.tiny_checkpoints import Tiny
    torch.manual_seed(0)
    latest = layout.latest(Path(sys.argv[1]))
    step = int(latest.name) if latest else 0
    while True:
        step += 1
        tiny = Tiny(Path(sys.argv[1]), size=512, total_steps=10**6, train_config={"step": step})
        tiny.train_step()
        tiny.manager.save(step)
        print(step, flush=True)
""")


def _loads(folder: Path) -> None:
    Tiny(folder.parent, size=512).manager.load(folder)


@pytest.mark.slow
def test_kill_during_saving_always_leaves_a_loadable_latest(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    rng = random.Random(0)
    for trial in range(12):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(checkpoints)], stdout=subprocess.PIPE, text=True,
                                cwd=REPO_ROOT)
        first_saved = int(proc.stdout.readline())  # at least one save of this trial finished
        time.sleep(rng.uniform(0, 0.3))  # a random instant, mostly inside a save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = layout.latest(checkpoints)
        assert latest is not None and int(latest.name) >= first_saved, f"trial {trial}: lost a finished save"
        _loads(latest)
        assert json.loads((latest / "pretrained_model" / "train_config.json").read_text())["step"] == int(latest.name)
