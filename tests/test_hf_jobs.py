"""`job=hf`: runs dispatched to Hugging Face Jobs through the real huggingface_hub client,
against the emulator, which runs each job's command on this machine."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, assert_one_line_error, error_lines

SECRET = "s3cr3t-value-that-must-never-leak"


@pytest.fixture
def jobs_cli(cli, hub, robotrain_cache):
    hub.reset()
    cli.env.update(hub.env)
    cli.env["MY_SECRET"] = SECRET
    yield cli
    hub.stop_jobs()


@pytest.fixture
def new_jobs(hub):
    """The jobs submitted since the test started (the emulator keeps earlier ones)."""
    before = {job["id"] for job in hub.jobs()}
    return lambda: [job for job in hub.jobs() if job["id"] not in before]


def hf_args(*extra: str) -> list[str]:
    # The job needs the dataset cache too: a plain env var, forwarded with job.env.
    return ["job=hf", "job.image=robotrain:test", "job.flavor=cpu-upgrade", "job.timeout=10m",
            "job.secrets=[HF_TOKEN,MY_SECRET]", 'job.tags=["team=robots",nightly]', *extra]


def test_followed_job_streams_its_logs_and_succeeds(jobs_cli, new_jobs, robotrain_cache, tmp_path):
    done = jobs_cli.run(*hf_args(f"+job.env.ROBOTRAIN_CACHE={robotrain_cache}"), *TINY, "steps=5",
                        f"hydra.run.dir={tmp_path / 'submit'}")
    assert done.returncode == 0, done.stderr
    assert "robotrain: submitted hf job" in done.stdout
    assert "mlp trained to step 5" in done.stdout  # the job's own output, streamed here
    assert "finished" in done.stdout.splitlines()[-1]

    (job,) = new_jobs()
    assert job["image"] == "robotrain:test" and job["flavor"] == "cpu-upgrade" and job["timeout"] == 600
    assert job["command"][:3] == ["python", "-m", "robotrain"]
    assert "job.target=local" in job["command"] and "steps=5" in job["command"]
    assert sorted(job["secrets"]) == ["HF_TOKEN", "MY_SECRET"]
    assert job["labels"]["team"] == "robots" and job["labels"]["nightly"] == "true"
    assert job["stage"] == "COMPLETED"


def test_detached_job_returns_at_once_with_how_to_follow_and_cancel(jobs_cli, new_jobs, tmp_path):
    done = jobs_cli.run(*hf_args("job.detach=true", "+job.env.ROBOTRAIN_CACHE=/nonexistent"), *TINY,
                        "steps=100000", f"hydra.run.dir={tmp_path / 'submit'}")
    assert done.returncode == 0, done.stderr
    (job,) = new_jobs()
    job_id = job["id"]
    assert f"hf jobs logs {job_id}" in done.stdout and f"hf jobs cancel {job_id}" in done.stdout


def test_a_job_can_be_cancelled(hub):
    hub.reset()
    state = hub.run_json("""
        import json
        from robotrain.config import HfJob
        from robotrain.dispatch import Point, submit
        job = HfJob(image="img", env={"ROBOTRAIN_CACHE": "/nonexistent"})
        (handle,) = submit([Point(["steps=100000"], None)], job)
        handle.cancel()
        outcome = handle.wait(poll_s=0.1)
        print(json.dumps({"ok": outcome.ok, "error": str(outcome.error)}))
    """)
    assert state["ok"] is False and "CANCELED" in state["error"]


def test_failed_job_fails_the_command(jobs_cli, new_jobs, tmp_path):
    done = jobs_cli.run(*hf_args("+job.env.ROBOTRAIN_CACHE=/nonexistent"), "policy.chunk_size=0",
                        f"hydra.run.dir={tmp_path / 'submit'}")
    # chunk_size=0 is caught here, before submission: nothing is submitted at all
    assert done.returncode == 2 and new_jobs() == []
    done = jobs_cli.run(*hf_args("+job.env.ROBOTRAIN_CACHE=/nonexistent"), "dataset=local",
                        "dataset.repo_id=user/x", "dataset.root=/no/such/dataset", f"hydra.run.dir={tmp_path / 's2'}")
    assert done.returncode == 1 and "failed" in error_lines(done.stderr)[-1]
    assert new_jobs()[0]["stage"] == "ERROR"


def test_secret_values_never_appear_in_logs_files_or_the_submitted_spec(jobs_cli, hub, robotrain_cache, tmp_path):
    done = jobs_cli.run(*hf_args(f"+job.env.ROBOTRAIN_CACHE={robotrain_cache}"), *TINY, "steps=3",
                        f"hydra.run.dir={tmp_path / 'submit'}")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert SECRET not in str(hub.jobs()) and SECRET not in hub.log_path.read_text()
    for path in (tmp_path / "submit").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_missing_secret_is_one_line_and_submits_nothing(jobs_cli, new_jobs, tmp_path):
    done = jobs_cli.run("job=hf", "job.image=img", "job.secrets=[NOT_SET_ANYWHERE]", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(done, "NOT_SET_ANYWHERE")
    assert new_jobs() == []


def test_remote_dispatch_downloads_nothing_on_the_submitting_machine(jobs_cli, hub, new_jobs, tmp_path):
    # The job itself is kept offline, so any download in the log would be the submitter's.
    mark = hub.mark()
    done = jobs_cli.run(*hf_args("job.detach=true", "+job.env.HF_HUB_OFFLINE=1"), *TINY,
                        "resume=hub:user/pushed-e2e@10", f"hydra.run.dir={tmp_path / 'submit'}")
    assert done.returncode == 0, done.stderr
    hub.wait_for_job(new_jobs()[0]["id"], ["COMPLETED", "ERROR"], timeout=120)
    assert hub.downloads(since=mark) == []
    assert not (tmp_path / "submit" / "checkpoints").exists()


def test_ctrl_c_while_following_detaches_and_the_job_keeps_running(jobs_cli, hub, new_jobs, tmp_path):
    import signal

    # As a foreground command gets it: a suite started in the background (`cmd &` in a script)
    # inherits SIGINT ignored, and so would the child, which Ctrl-C then could not reach.
    proc = jobs_cli.popen(*hf_args("+job.env.ROBOTRAIN_CACHE=/nonexistent"), "steps=100000",
                          f"hydra.run.dir={tmp_path / 'submit'}",
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "submitted hf job" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    (job,) = new_jobs()
    assert proc.returncode == 0, stderr
    assert f"detached from job {job['id']}" in stderr and f"hf jobs cancel {job['id']}" in stderr
    assert job["stage"] in ("SCHEDULING", "RUNNING")


def test_sweep_submits_one_hf_job_per_point(jobs_cli, new_jobs, robotrain_cache, tmp_path):
    done = jobs_cli.run("-m", *hf_args(f"+job.env.ROBOTRAIN_CACHE={robotrain_cache}"), *TINY, "steps=2", "seed=0,1",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = new_jobs()
    assert len(jobs) == 2 and all(job["stage"] == "COMPLETED" for job in jobs)
    assert sorted("seed=0" in job["command"] for job in jobs) == [False, True]
