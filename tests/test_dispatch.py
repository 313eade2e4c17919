"""Dispatch without a cluster: the command a job runs, the world a SLURM task sees, and
JobConfig's one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from robotrain.config import JobConfig, LocalJob, SlurmJob, parse_job
from robotrain.dispatch import Point, with_resume_auto
from robotrain.distributed import first_host, world_env_from_slurm
from robotrain.errors import UserError
from tests.conftest import assert_one_line_error


def test_job_command_repeats_the_overrides_as_a_local_run_in_its_own_dir():
    point = Point(["job=slurm", "optim.lr=3e-4", "job.target=slurm"], Path("/runs/sweep/3"))
    assert point.argv() == ["job=slurm", "optim.lr=3e-4", "job.target=local", "hydra.run.dir=/runs/sweep/3",
                            "resume.spec=auto"]


def test_job_command_keeps_a_users_resume_spec_until_a_requeue():
    point = Point(["resume.spec=hub:user/run@10"], Path("/r"))
    assert "resume.spec=hub:user/run@10" in point.argv() and "resume.spec=auto" not in point.argv()
    requeued = with_resume_auto(point.argv())
    assert "resume.spec=auto" in requeued and "resume.spec=hub:user/run@10" not in requeued


def test_hf_jobs_pick_their_own_run_dir():
    assert not any(a.startswith("hydra.run.dir=") for a in Point(["seed=1"], None).argv())


@pytest.mark.parametrize("nodelist, host", [("node07", "node07"), ("node[03-05,9]", "node03"),
                                            ("gpu[12,4]", "gpu12"), ("a1,b2", "a1")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_task_world_maps_to_torchrun_variables():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert world_env_from_slurm(env) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242 % 20000),
    }


def test_single_task_or_no_slurm_sets_no_world():
    assert world_env_from_slurm({}) == {}
    assert world_env_from_slurm({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}


def test_array_tasks_get_different_rendezvous_ports():
    base = {"SLURM_JOB_ID": "99", "SLURM_ARRAY_JOB_ID": "90", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
            "SLURM_JOB_NODELIST": "n1"}
    ports = {world_env_from_slurm({**base, "SLURM_ARRAY_TASK_ID": str(i)})["MASTER_PORT"] for i in range(3)}
    assert len(ports) == 3


def test_slurm_timeout_comes_from_timeout_when_timeout_min_is_unset():
    assert SlurmJob(timeout="2h").slurm_timeout_min == 120
    assert SlurmJob(timeout="2h", timeout_min=30).slurm_timeout_min == 30
    assert SlurmJob().slurm_timeout_min == 60


BAD_JOBS = {
    "unknown target": (["job.target=k8s"], "job.target must be local, slurm or hf"),
    "hf without image": (["job=hf"], "job.image="),
    "bad timeout": (["job=hf", "job.image=img", "job.timeout=ten minutes"], "job.timeout must look like"),
    "secret given as a value": (["job=hf", "job.image=img", 'job.secrets=["HF_TOKEN=hf_abc"]'], "NAMES"),
    "token given as a secret": (["job=hf", "job.image=img", "job.secrets=[hf_abcdefgh]"], "never values"),
    "slurm field on hf": (["job=hf", "job.image=img", "job.partition=gpu"], "job.partition is a SLURM setting"),
    "image on slurm": (["job=slurm", "job.image=img"], "job.image is an HF Jobs setting"),
    "slurm field on local": (["job.partition=gpu"], "job.partition is a SLURM setting, which job=local does not "
                             "have: add job=slurm"),
    "other target than the option's": (["job=slurm", "job.target=hf"], "job.target=hf needs job=hf"),
    "bad env name": (["job=slurm", "+job.env.bad-name=x"], "not an environment variable name"),
    "zero nodes": (["job=slurm", "job.nodes=0"], "job.nodes"),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_bad_job_config_is_one_line_and_submits_nothing(cli, tmp_path, case):
    overrides, expected = BAD_JOBS[case]
    done = cli.run(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, expected)
    assert "submitted" not in done.stdout
    assert not (tmp_path / "run" / ".submitit").exists()


def test_bad_sweep_point_is_one_line_and_runs_nothing(cli, tmp_path):
    done = cli.run("-m", "job=local,hf", "steps=1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_one_line_error(done, "sweep point #1 (job=hf steps=1): job=hf needs an image")
    assert not (tmp_path / "sweep" / "0").exists()


def test_job_config_checks_each_field_on_its_own():
    with pytest.raises(UserError, match="job.secrets"):
        JobConfig(secrets=["MY=VALUE"])


def test_job_target_alone_dispatches_with_that_targets_defaults():
    assert parse_job({"target": "slurm"}) == SlurmJob()
    assert type(parse_job({})) is LocalJob


def test_a_submitted_job_keeps_its_options_schema_and_runs_locally():
    job = parse_job({**dataclasses.asdict(SlurmJob(partition="gpu")), "target": "local"})
    assert isinstance(job, SlurmJob) and job.partition == "gpu" and not job.is_remote
