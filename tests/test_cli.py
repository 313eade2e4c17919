"""The command line as a user meets it: Hydra's --cfg/--help, and one-line errors for bad input
that exit non-zero and leave existing checkpoints untouched."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY, assert_one_line_error, tree_digest


def test_cfg_job_prints_the_composed_config(cli):
    done = cli.run("--cfg", "job", "policy.hidden_dim=64")
    assert done.returncode == 0, done.stderr
    assert "hidden_dim: 64" in done.stdout
    for section in ("policy:", "dataset:", "sampler:", "optim:", "scheduler:", "peft:", "job:", "checkpoint:"):
        assert f"\n{section}" in f"\n{done.stdout}"


def test_help_lists_groups_and_options_with_their_descriptions(cli):
    done = cli.run("--help")
    assert done.returncode == 0, done.stderr
    choices = {f"{group}={option}" for group, option in re.findall(r"^  (\w+)=(\w+) ", done.stdout, re.M)}
    assert {"policy=mlp", "policy=act", "sampler=feistel", "job=slurm", "job=hf", "dataset=hub", "peft=lora"} <= choices
    assert "A small MLP: state + pooled camera image" in done.stdout  # the option's YAML comment
    assert re.search(r"^  steps +Total optimizer steps of the run", done.stdout, re.M)  # the field's docstring
    assert re.search(r"^  policy\.hidden_dim +Width of the hidden layers", done.stdout, re.M)
    act = cli.run("--help", "policy=act")
    assert re.search(r"^  policy\.kl_weight ", act.stdout, re.M)


def _corrupt_copy(trained_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "corrupt"
    shutil.copytree(trained_run / "checkpoints", run_dir / "checkpoints", symlinks=True)
    (run_dir / "checkpoints" / "000020" / "pretrained_model" / "model.safetensors").write_bytes(b"\x00garbage")
    return run_dir


def _old_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "old_dataset"
    shutil.copytree(Path(__file__).parent / "data" / "lerobot_v3_tiny", root)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["codebase_version"] = "v1.6"
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root


BAD_INPUTS = {
    "unknown group option": (["policy=no_such_policy"], "no option 'no_such_policy'"),
    "unknown key": (["no_such_key=1"], "unknown config key 'no_such_key'"),
    "value of the wrong type": (["steps=many"], "steps=many"),
    "negative batch size": (["batch_size=-4"], "batch_size must be > 0"),
    "zero steps": (["steps=0"], "steps must be > 0"),
    "unknown policy field": (["+policy.no_such_field=1"], "unknown policy field"),
    "resume path missing": (["resume=/no/such/run"], "does not exist"),
    "malformed hub resume spec": (["resume=hub:not a repo"], "bad hub spec"),
    "push without a repo": (["hub.push_checkpoints=true"], "hub.repo_id"),
    "dataset root missing": (["dataset=local", "dataset.repo_id=user/data", "dataset.root=/no/such/dataset"],
                             "holds no LeRobot dataset"),
    "steps not beyond the checkpoint on resume": (["resume=auto", "steps=20"], "not beyond the checkpoint's step 20"),
    "exactness-breaking change on resume": (["resume=auto", "steps=30", "seed=7"], "resume.allow_changes=true"),
    "policy shape change on resume": (["resume=auto", "steps=30", "policy.hidden_dim=32"], "do not fit this policy"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_with_one_line_and_leaves_checkpoints_alone(cli, trained_run, tmp_path, case):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run_dir / "checkpoints", symlinks=True)
    before = tree_digest(run_dir / "checkpoints")
    overrides, expected = BAD_INPUTS[case]

    done = cli.run(*TINY, f"hydra.run.dir={run_dir}", *overrides)

    assert_one_line_error(done, expected)
    assert tree_digest(run_dir / "checkpoints") == before


def test_corrupt_checkpoint_is_a_one_line_error(cli, trained_run, tmp_path):
    run_dir = _corrupt_copy(trained_run, tmp_path)
    before = tree_digest(run_dir / "checkpoints")
    done = cli.run(*TINY, "steps=30", f"hydra.run.dir={run_dir}", "resume=auto")
    assert_one_line_error(done, "model.safetensors is corrupt")
    assert tree_digest(run_dir / "checkpoints") == before


def test_unsupported_dataset_version_is_a_one_line_error(cli, tmp_path):
    root = _old_dataset(tmp_path)
    done = cli.run(*TINY, "dataset=local", "dataset.repo_id=user/old", f"dataset.root={root}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, "v1.6")


def test_resume_allow_changes_accepts_an_exactness_breaking_change(cli, trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run_dir / "checkpoints", symlinks=True)
    done = cli.run(f"hydra.run.dir={run_dir}", "resume=auto", "steps=25", "seed=7", "resume.allow_changes=true")
    assert done.returncode == 0, done.stderr
    config = json.loads((run_dir / "checkpoints" / "000025" / "pretrained_model" / "train_config.json").read_text())
    assert config["seed"] == 7


def test_local_lerobot_dataset_trains(cli, tmp_path):
    """`dataset.repo_id=… dataset.root=…` trains on any local LeRobot dataset (here LeRobot's own)."""
    root = Path(__file__).parent / "data" / "lerobot_v3_tiny"
    done = cli.run("steps=4", "batch_size=4", "eval.enabled=false", "dataset.repo_id=lerobot_ref/tiny",
                   f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "run" / "checkpoints" / "000004" / "pretrained_model" / "config.json").read_text())
    assert config["input_features"]["observation.image"] == {"type": "VISUAL", "shape": [3, 32, 32]}
    assert config["output_features"]["action"] == {"type": "ACTION", "shape": [2]}


@pytest.mark.parametrize("repo_id, valid", [("user/name", True), ("lerobot/pusht_v3.0", True), ("user/na--me", False),
                                            ("user/.name", False), ("user/a/b", False), ("user name/x", False)])
def test_one_repo_id_rule_for_datasets_hub_repos_and_resume_specs(repo_id, valid):
    from robotrain.config import parse
    from robotrain.errors import UserError
    from robotrain.resume import parse_hub_spec

    def accepted(check) -> bool:
        try:
            check()
            return True
        except UserError:
            return False

    base = {"policy": {"type": "mlp"}, "dataset": {"repo_id": "user/data", "root": None}}
    assert accepted(lambda: parse({**base, "dataset": {"repo_id": repo_id, "root": None}})) == valid
    assert accepted(lambda: parse({**base, "hub": {"repo_id": repo_id}})) == valid
    assert accepted(lambda: parse_hub_spec(f"hub:{repo_id}")) == valid
