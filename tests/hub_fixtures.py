"""Pytest plugin: a Hugging Face Hub emulator for the whole session, and a fresh repo id per test.

Load it with `pytest_plugins = ["tests.hub_fixtures"]`. Fixtures:

- `hub` (session): a HubHandle on an emulator subprocess (tests/hub_emulator.py) listening on a free port,
  with a temporary storage root. It is a HubAdmin (fail_commits, stall_commits, release, reset, log,
  downloads, mark, wait_for_stalled, jobs, job, job_lines, wait_for_job, stop_jobs...) plus `.url`,
  `.log_path` (the emulator's stderr), `.env` (the variables that point huggingface_hub at the emulator
  with a fake token and a throw-away HF_HOME), `.subprocess_env()`, `.run_python()`, `.run_json()` and
  `.popen_python()` to run the real client in a child process.
- `hub_repo` (function): a repo id such as "user/run-3", not created yet; faults, stalls and the request
  log are reset before and after the test.

The client runs in child processes because huggingface_hub reads HF_ENDPOINT, HF_HOME and friends once,
when it is first imported, and keeps a shared HTTP session: a child starts from a clean slate every time.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

try:
    from tests.hub_emulator import HubAdmin, wait_until
except ImportError:  # tests/ not importable as a package: load the sibling file directly
    import importlib.util

    _spec = importlib.util.spec_from_file_location("hub_emulator", Path(__file__).with_name("hub_emulator.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules.setdefault("hub_emulator", _module)
    _spec.loader.exec_module(_module)
    HubAdmin, wait_until = _module.HubAdmin, _module.wait_until

EMULATOR_SCRIPT = Path(__file__).with_name("hub_emulator.py")
FAKE_TOKEN = "hf_emulatorFakeTokenNotARealOne"
USER = "user"
START_TIMEOUT_S = 30.0


def hub_env(url: str, hf_home: Path) -> dict[str, str]:
    """Variables pointing huggingface_hub at the emulator; they override any the user has set."""
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1,localhost"]))
    return {
        "HF_ENDPOINT": url,
        "HF_TOKEN": FAKE_TOKEN,
        "HF_HOME": str(hf_home),
        # Explicit cache paths, so a HF_HUB_CACHE/HF_TOKEN_PATH... exported by the user cannot leak in.
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_OFFLINE": "0",
        "HUGGINGFACE_CO_STAGING": "0",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        # Telemetry off also stops the first request from fetching {endpoint}/api/agent-harnesses.
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


class HubHandle(HubAdmin):
    """A running emulator: admin calls plus helpers to run client code against it."""

    def __init__(self, url: str, root: Path, hf_home: Path, process: subprocess.Popen | None = None,
                 log_path: Path | None = None):
        super().__init__(url)
        self.root, self.hf_home, self.process = root, hf_home, process
        self.log_path = log_path  # the emulator process's stderr (tracebacks, --verbose request lines)
        self.token, self.user = FAKE_TOKEN, USER
        self.env = hub_env(url, hf_home)

    def subprocess_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ + self.env + extra, for any child process that should use the emulator."""
        return {**os.environ, **self.env, **(extra or {})}

    def _argv(self, code: str, args: list[str] | None) -> list[str]:
        return [sys.executable, "-c", textwrap.dedent(code), *(args or [])]

    def popen_python(self, code: str, *, args: list[str] | None = None, env: dict[str, str] | None = None,
                     **popen_kwargs: Any) -> subprocess.Popen:
        """Start `code` in a child process (stdout/stderr piped, text) and return without waiting."""
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self._argv(code, args), env=self.subprocess_env(env), text=True, **popen_kwargs)

    def run_python(self, code: str, *, args: list[str] | None = None, env: dict[str, str] | None = None,
                   timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run `code` in a child process with the emulator env; with check, fail the test on a non-zero exit."""
        proc = subprocess.run(self._argv(code, args), env=self.subprocess_env(env), capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"client snippet exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                                 f"\n--- stderr\n{proc.stderr}")
        return proc

    def run_json(self, code: str, **kwargs: Any) -> Any:
        """run_python, then parse the last line the snippet printed as JSON."""
        lines = self.run_python(code, **kwargs).stdout.strip().splitlines()
        assert lines, "client snippet printed nothing"
        return json.loads(lines[-1])


def _read_first_line(process: subprocess.Popen, timeout: float) -> str:
    # readline() has no timeout, so it runs on a helper thread that we wait for.
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].strip():
        raise RuntimeError(f"hub emulator did not print its URL within {timeout}s (exit code {process.poll()})")
    return line[0].strip()


def start_emulator(root: Path, log_path: Path, extra_args: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start tests/hub_emulator.py on a free port; return once it answers its health check."""
    root.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, str(EMULATOR_SCRIPT), "--port", "0", "--root", str(root), *(extra_args or [])],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
    try:
        url = _read_first_line(process, START_TIMEOUT_S)
        wait_until(lambda: process.poll() is not None or HubAdmin(url, timeout=2).health(),
                   START_TIMEOUT_S, "the hub emulator to answer")
        if process.poll() is not None:
            raise RuntimeError(f"hub emulator exited with {process.returncode}; see {log_path}")
    except BaseException:
        stop_emulator(process)
        raise
    return process, url


def stop_emulator(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    if process.stdout:
        process.stdout.close()


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory):
    """The Hub emulator for this test session (see HubHandle)."""
    base = tmp_path_factory.mktemp("hub")
    process, url = start_emulator(base / "root", base / "emulator.log")
    try:
        yield HubHandle(url, base / "root", base / "hf_home", process, base / "emulator.log")
    finally:
        stop_emulator(process)


_repo_numbers = itertools.count(1)


@pytest.fixture
def hub_repo(hub: HubHandle):
    """A fresh, not yet created repo id ("user/run-<n>"); faults and the request log start empty."""
    hub.reset()
    yield f"{USER}/run-{next(_repo_numbers)}"
    hub.reset()  # frees anything a failed test left stalled
