"""The Hub emulator's Jobs API (tests/hub_emulator.py, class Jobs) as the real huggingface_hub client sees it.

Every client call runs in a child process with the emulator's env (see tests/test_hub_emulator.py for why). A
snippet gets its inputs as JSON in sys.argv[1] (ARGS) and prints JSON lines with out(...). Jobs run as local
processes of the emulator; their commands are small Python programs (`python` is the emulator's interpreter).
Nothing here sleeps to synchronise: the client's wait_for_job, the admin's wait_for_job and wait_until poll.
"""

from __future__ import annotations

import hashlib
import json
import queue
import secrets
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Callable

import pytest

from tests.hub_emulator import HubEmulator, wait_until
from tests.hub_fixtures import HubHandle

pytest_plugins = ["tests.hub_fixtures"]

PRELUDE = """\
import json, sys
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
api = HfApi()
ARGS = json.loads(sys.argv[1])

def out(value):
    print(json.dumps(value), flush=True)

def finished(job_id):
    return api.wait_for_job(job_id, timeout=60, poll_interval=0.05)
"""


def client(hub: HubHandle, body: str, **args) -> object:
    """Run `body` with the real client; return the last value it printed with out()."""
    return hub.run_json(PRELUDE + textwrap.dedent(body), args=[json.dumps(args)])


def follow_client(hub: HubHandle, body: str, **args) -> tuple[subprocess.Popen, Callable[..., object]]:
    """Start `body` without waiting; next_message() returns each value it prints with out(), as it prints it."""
    proc = hub.popen_python(PRELUDE + textwrap.dedent(body), args=[json.dumps(args)])
    messages: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            messages.put(json.loads(line))
        messages.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def next_message(timeout: float = 60) -> object:
        message = messages.get(timeout=timeout)
        assert message is not None, f"client exited early:\n{proc.stderr.read()}"
        return message

    return proc, next_message


def py(code: str) -> list[str]:
    """A job command running `code` with `python`, as a robotrain job would run `python -m robotrain`."""
    return ["python", "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by whoever inherited it) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture(autouse=True)
def no_job_left_running(hub):
    yield
    hub.stop_jobs()  # a failed test must not leave a job process behind


@pytest.fixture
def quick_kill_hub(tmp_path):
    """An emulator of its own, in this process, whose cancel escalates to SIGKILL after 0.5 s."""
    emulator = HubEmulator(tmp_path / "root", job_kill_grace=0.5).start()
    try:
        yield HubHandle(emulator.url, tmp_path / "root", tmp_path / "hf_home")
    finally:
        emulator.stop()


def test_run_job_is_scheduled_then_completes_and_inspect_shows_what_was_submitted(hub):
    result = client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"], env={"GREETING": "hi"},
                          flavor="cpu-upgrade", timeout="5m")
        first = job.status.stage
        finished(job.id)
        info = api.inspect_job(job_id=job.id)
        out({"id": job.id, "first": first, "stage": info.status.stage, "image": info.docker_image,
             "command": info.command, "env": info.environment, "secrets": info.secrets, "flavor": info.flavor,
             "owner": [info.owner.name, info.owner.type], "url": info.url,
             "dated": [bool(info.created_at), bool(info.started_at), bool(info.finished_at)]})
    """, command=py("print('hello')"))
    job_id = result.pop("id")
    assert result == {"first": "SCHEDULING", "stage": "COMPLETED", "image": "python:3.12",
                      "command": py("print('hello')"), "env": {"GREETING": "hi"}, "secrets": {},
                      "flavor": "cpu-upgrade", "owner": [hub.user, "user"], "url": f"{hub.url}/jobs/user/{job_id}",
                      "dated": [True, True, True]}
    admin = hub.job(job_id)
    assert (admin["image"], admin["timeout"], admin["exit_code"], admin["message"]) == ("python:3.12", 300, 0, None)


def test_fetch_job_logs_with_follow_yields_each_line_while_the_job_runs_and_ends_with_it(hub):
    # The job prints one line, then waits for a "gate" file that the test creates once it has seen that line.
    proc, next_message = follow_client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"])
        out({"id": job.id})
        for line in api.fetch_job_logs(job_id=job.id, follow=True):
            out({"line": line})
        out({"stage": api.inspect_job(job_id=job.id).status.stage})
    """, command=py("""
        import pathlib, time
        print("before the gate", flush=True)
        while not pathlib.Path("gate").exists():
            time.sleep(0.02)
        for i in range(3):
            print(f"after {i}", flush=True)
    """))
    job_id = next_message()["id"]
    assert next_message() == {"line": "before the gate"}
    job = hub.job(job_id)
    assert job["stage"] == "RUNNING"  # the line arrived while the job was still blocked on the gate
    Path(job["workdir"], "gate").touch()
    assert [next_message() for _ in range(4)] == [{"line": f"after {i}"} for i in range(3)] + [{"stage": "COMPLETED"}]
    assert proc.wait(timeout=60) == 0


def test_fetch_job_logs_of_a_finished_job_replays_stdout_and_stderr_merged_in_order(hub):
    result = client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"])
        finished(job.id)
        out(list(api.fetch_job_logs(job_id=job.id)))
    """, command=py("""
        import sys
        print("out 1", flush=True)
        print("err 1", file=sys.stderr, flush=True)
        print("out 2", flush=True)
        sys.stdout.write("no newline at the end")
    """))
    assert result == ["out 1", "err 1", "out 2", "no newline at the end"]


def test_a_failing_command_ends_in_error_with_its_exit_code(hub):
    result = client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"])
        done = finished(job.id)
        out({"id": job.id, "stage": done.status.stage, "message": done.status.message})
    """, command=py("import sys; print('about to fail'); sys.exit(3)"))
    assert (result["stage"], result["message"]) == ("ERROR", "Job failed with exit code 3")
    assert hub.job(result["id"])["exit_code"] == 3
    assert hub.job_lines(result["id"]) == ["about to fail"]


def test_a_command_that_does_not_exist_ends_in_error(hub):
    result = client(hub, """
        done = finished(api.run_job(image="ubuntu", command=["no-such-command-here", "--flag"]).id)
        out([done.status.stage, done.status.message])
    """)
    assert result[0] == "ERROR" and "no-such-command-here" in result[1]


def test_cancel_job_sends_sigterm_then_kills_what_is_left_of_the_job(hub):
    # The job handles SIGTERM (as robotrain does to save a checkpoint) and leaves a child process behind.
    result = client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"])
        for line in api.fetch_job_logs(job_id=job.id, follow=True):
            if line == "ready":
                api.cancel_job(job_id=job.id)
        info = api.inspect_job(job_id=job.id)
        out({"id": job.id, "stage": info.status.stage})
    """, command=py("""
        import signal, subprocess, sys, time
        def on_sigterm(*_):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_sigterm)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"child {child.pid}", flush=True)
        print("ready", flush=True)
        time.sleep(600)
    """))
    assert result["stage"] == "CANCELED"
    job = hub.job(result["id"])
    lines = hub.job_lines(result["id"])
    child_pid = int(lines[0].split()[1])
    assert lines[1:] == ["ready", "got SIGTERM"]
    assert (job["exit_code"], job["message"]) == (0, "Job canceled by the user")
    assert not alive(job["pid"])
    wait_until(lambda: not alive(child_pid), 10, "the job's child process to be killed")


def test_cancel_kills_a_job_that_ignores_sigterm_after_the_grace_period(quick_kill_hub):
    hub = quick_kill_hub
    result = client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"])
        for line in api.fetch_job_logs(job_id=job.id, follow=True):
            if line == "ready":
                api.cancel_job(job_id=job.id)
        out({"id": job.id, "stage": api.inspect_job(job_id=job.id).status.stage})
    """, command=py("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """))
    job = hub.job(result["id"])
    assert (result["stage"], job["exit_code"]) == ("CANCELED", -9)
    assert not alive(job["pid"])


def test_timeout_stops_the_job_and_ends_it_in_error(hub):
    result = client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"], timeout="1s")
        done = finished(job.id)
        out({"id": job.id, "stage": done.status.stage, "message": done.status.message})
    """, command=py("import time; print('ready', flush=True); time.sleep(600)"))
    assert (result["stage"], result["message"]) == ("ERROR", "Job timed out after 1s")
    job = hub.job(result["id"])
    assert (job["timeout"], job["exit_code"], hub.job_lines(result["id"])) == (1, -15, ["ready"])
    assert not alive(job["pid"])


def test_secrets_reach_the_job_but_are_never_sent_back_logged_or_stored(hub):
    value = f"secret-{secrets.token_hex(16)}"
    result = client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"], env={"PLAIN": "visible"},
                          secrets={"ROBO_SECRET": ARGS["value"]})
        finished(job.id)
        info = api.inspect_job(job_id=job.id)
        out({"id": job.id, "secrets": info.secrets, "env": info.environment,
             "lines": list(api.fetch_job_logs(job_id=job.id)),
             "answers": repr(info) + repr(list(api.list_jobs())) + repr(job)})
    """, value=value, command=py("""
        import hashlib, os
        print(hashlib.sha256(os.environ["ROBO_SECRET"].encode()).hexdigest(), os.environ["PLAIN"])
    """))
    assert result["lines"] == [f"{hashlib.sha256(value.encode()).hexdigest()} visible"]
    assert (result["secrets"], result["env"]) == ({"ROBO_SECRET": None}, {"PLAIN": "visible"})
    assert hub.job(result["id"])["secrets"] == ["ROBO_SECRET"]
    assert value not in result["answers"]
    assert value not in json.dumps([hub.jobs(), hub.job(result["id"]), hub.log()])
    assert value.encode() not in hub.log_path.read_bytes()
    stored = [path for path in hub.root.rglob("*") if path.is_file() and value.encode() in path.read_bytes()]
    assert stored == []


def test_labels_and_name_round_trip_and_select_jobs_in_list_jobs(hub):
    run = f"run-{secrets.token_hex(4)}"
    result = client(hub, """
        labelled = api.run_job(image="ubuntu", command=["true"], name="train-1",
                               labels={"robotrain-run": ARGS["run"], "team": "robo"})
        other = api.run_job(image="ubuntu", command=["true"], labels={"team": "robo"})
        finished(labelled.id)
        finished(other.id)
        out({"ids": [labelled.id, other.id], "labels": api.inspect_job(job_id=labelled.id).labels,
             "other": api.inspect_job(job_id=other.id).labels,
             "selected": [j.id for j in api.list_jobs(labels={"robotrain-run": ARGS["run"]})],
             "completed": [j.id for j in api.list_jobs(status="COMPLETED", labels={"team": "robo"})]})
    """, run=run)
    labelled, other = result["ids"]
    assert result["labels"] == {"robotrain-run": run, "team": "robo", "name": "train-1"}
    # Without name=, the client always adds a "name" label derived from the image and command.
    assert result["other"]["team"] == "robo" and result["other"]["name"].startswith("ubuntu-")
    assert result["selected"] == [labelled]
    assert {labelled, other} <= set(result["completed"])
    assert hub.job(labelled)["labels"] == result["labels"]


@pytest.mark.parametrize("spec", [
    {"labels": {"robotrain/run": "user/run-3"}},  # '/' is not allowed in labels
    {"flavor": "a10g_small"},  # not a JobHardware value
], ids=["label-with-slash", "unknown-flavor"])
def test_an_invalid_job_spec_is_rejected_with_400_and_nothing_runs(hub, spec):
    before = len(hub.jobs())
    status = client(hub, """
        try:
            api.run_job(image="ubuntu", command=["true"], **ARGS["spec"])
        except HfHubHTTPError as err:
            out(err.response.status_code)
    """, spec=spec)
    assert status == 400
    assert len(hub.jobs()) == before


def test_a_job_runs_the_emulators_python_in_a_fresh_folder_pointed_at_the_emulator(hub):
    result = client(hub, """
        job = api.run_job(image="python:3.12", command=ARGS["command"])
        finished(job.id)
        out({"id": job.id, "seen": json.loads(list(api.fetch_job_logs(job_id=job.id))[0])})
    """, command=py("""
        import json, os, sys
        import robotrain
        print(json.dumps({"python": sys.executable, "cwd": os.getcwd(), "files": os.listdir("."),
                          "endpoint": os.environ["HF_ENDPOINT"], "robotrain": robotrain.__file__}))
    """))
    seen, job = result["seen"], hub.job(result["id"])
    # The emulator runs on this interpreter (tests/hub_fixtures.py starts it with sys.executable).
    assert seen["python"] == sys.executable
    assert seen["cwd"] == job["workdir"] and Path(job["workdir"]).parent == hub.root / "jobs"
    assert seen["files"] == []
    assert seen["endpoint"] == hub.url
    assert Path(seen["robotrain"]).parent.name == "robotrain"
