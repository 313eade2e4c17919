"""Pytest plugin: a real single-node SLURM cluster (slurmctld, slurmd, slurmdbd + MariaDB, munge) for the session.

Load it with `pytest_plugins = ["tests.slurm_fixtures"]` (tests/conftest.py). It registers the `slurm` marker
and adds it to every test that uses the `slurm` fixture, so `-m "not slurm"` deselects them.

- `slurm` (session): a `SlurmCluster` handle. If the cluster is not up (slurmctld and the local slurmd answer,
  the node accepts jobs, sacct answers), it runs tests/slurm/start_slurm.sh (idempotent; installs the Debian
  packages when missing, needs root + apt) and polls until the node is idle and sacct answers. At the end it
  stops only the daemons that the tests started (stop_slurm.sh [--only ...]): a cluster that was already up
  stays up. Concurrent sessions (xdist workers, a second pytest) share it; the last one to end stops it. If the
  cluster cannot be started the fixture FAILS (an error in every test that uses it) with the reason; it never
  skips.

Handle: `partition`, `cpus`, `mem_mb`, `node`, `state_dir`, `started` (daemons this session started),
`start_s`, and the helpers `squeue(job_id)`, `sacct_state(job_id)`, `sacct_states(job_id)`, `state(job_id)`,
`wait_state(job_id, states, timeout)`, `scancel(job_id, signal=None)`, `requeue(job_id)`,
`submitit_folder(tmp_path)`, `executor(folder, **params)` and `diagnose(job_id)`.

Environment (read by start_slurm.sh too; see tests/slurm/README.md): ROBOTRAIN_SLURM_CPUS (default max(nproc, 8):
oversubscribes a small machine so that arrays run at once), ROBOTRAIN_SLURM_MEM_MB (default max(90% of RAM,
16 GiB)), ROBOTRAIN_SLURM_DIR, ROBOTRAIN_SLURM_PARTITION, ROBOTRAIN_SLURM_NO_INSTALL=1 (fail instead of apt).

Jobs run `sys.executable -m submitit.core._submit` in the submitting directory and unpickle the submitted
callable there: a function defined in a test module (imported by pytest as a top-level `test_x` module from
tests/, which the job cannot import) must be pickled by value, e.g.
`cloudpickle.register_pickle_by_value(sys.modules[__name__])` at the top of the test module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "slurm"
START_SCRIPT = SCRIPTS / "start_slurm.sh"
STOP_SCRIPT = SCRIPTS / "stop_slurm.sh"
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # start order
#: node states in which the node accepts jobs
READY_NODE_STATES = {"idle", "mixed", "allocated"}
#: job states after which a job does not run again by itself (PREEMPTED / NODE_FAIL may requeue)
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
#: squeue states of a job that is still queued or running
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
START_TIMEOUT_S = float(os.environ.get("ROBOTRAIN_SLURM_START_TIMEOUT", "900"))  # apt included
READY_TIMEOUT_S = 90.0
SLURM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", "")}


def _run(args: list[str], timeout: float = 20, check: bool = False) -> subprocess.CompletedProcess:
    """Runs a SLURM client command; a missing binary or a hang reads as a failed command."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **SLURM_ENV})
    except FileNotFoundError as exc:
        proc = subprocess.CompletedProcess(args, 127, "", str(exc))
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(args, 124, _text(exc.stdout), f"timed out after {timeout}s")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _text(output: str | bytes | None) -> str:
    """TimeoutExpired carries bytes even with text=True."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _states_by_job(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """{job id: state word} from `id|state` lines (squeue -o "%i|%T", sacct -P -o JobID,State)."""
    out = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        jid, _, state = line.strip().partition("|")
        if jid:
            out[jid] = _state_word(state)
    return out


def _state_word(state: str) -> str:
    return state.split()[0].rstrip("+") if state.strip() else ""  # "CANCELLED by 0" -> "CANCELLED"


def _node_info(partition: str) -> list[dict[str, str]]:
    """Nodes of `partition` from sinfo: node, state, cpus, mem (MB); [] if slurmctld does not answer."""
    proc = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%T|%c|%m"], timeout=15)
    if proc.returncode != 0:
        return []
    rows = []
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            rows.append(dict(zip(("node", "state", "cpus", "mem"), parts)))
    return rows


def _sacct_answers() -> bool:
    return _run(["sacct", "-n", "-X", "-S", "now", "-o", "jobid"], timeout=15).returncode == 0


def _ctld_up() -> bool:
    """`scontrol ping` answers at once, also when slurmctld is down (sinfo retries for ~9 s then)."""
    proc = _run(["scontrol", "ping"], timeout=15)
    return proc.returncode == 0 and "is UP" in proc.stdout


def _slurmd_up() -> bool:
    """The local slurmd answers. slurmctld goes on showing the node idle for SlurmdTimeout (300 s) after its
    slurmd died; a job sent there then ends NODE_FAIL after ~40 s."""
    return _run(["scontrol", "show", "slurmd"], timeout=15).returncode == 0


def cluster_ready(partition: str) -> bool:
    """slurmctld and the local slurmd answer, the node of `partition` accepts jobs (idle/mixed/allocated)
    and sacct answers (slurmdbd + MariaDB)."""
    if not (_ctld_up() and _slurmd_up()):
        return False
    nodes = _node_info(partition)
    return bool(nodes) and all(n["state"] in READY_NODE_STATES for n in nodes) and _sacct_answers()


def _running_daemons(state_dir: Path) -> dict[str, int]:
    """Daemons start_slurm.sh recorded in `state_dir`/pids that are alive, with the recorded executable."""
    alive = {}
    for name in DAEMONS:
        try:
            pid = int((state_dir / "pids" / f"{name}.pid").read_text().strip())
            exe = (state_dir / "pids" / f"{name}.exe").read_text().strip()
            if os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(exe):
                alive[name] = pid
        except (OSError, ValueError):
            continue
    return alive


def _cannot_start_reason() -> str | None:
    """Why start_slurm.sh cannot work on this machine, or None."""
    if os.geteuid() != 0:
        return ("not running, and starting it needs root (it installs packages and starts system daemons): "
                f"run `sudo {START_SCRIPT}` once, or run the tests as root")
    if not all(shutil.which(b, path=SLURM_ENV["PATH"]) for b in ("slurmctld", "slurmd", "slurmdbd", "munged", "sbatch")):
        if os.environ.get("ROBOTRAIN_SLURM_NO_INSTALL") == "1":
            return "SLURM/munge/MariaDB are not installed and ROBOTRAIN_SLURM_NO_INSTALL=1 forbids installing them"
        if not shutil.which("apt-get", path=SLURM_ENV["PATH"]):
            return ("SLURM/munge/MariaDB are not installed and there is no apt-get to install them; on Debian/Ubuntu "
                    "run: apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client")
    for tool in ("start-stop-daemon", "flock"):
        if not shutil.which(tool, path=SLURM_ENV["PATH"]):
            return f"{tool} is missing (dpkg / util-linux): tests/slurm/start_slurm.sh needs it"
    return None


@dataclass
class SlurmCluster:
    """Handle on the session's SLURM cluster. Job ids are strings as submitit gives them ("123", "123_4")."""

    partition: str
    cpus: int
    mem_mb: int
    node: str
    state_dir: Path
    started: tuple[str, ...] = ()  # daemons this session started (the last session to end stops them)
    start_s: float = 0.0  # time the fixture took to find or bring up a ready cluster
    _folders: set[Path] = field(default_factory=set, repr=False)

    # ------------------------------------------------------------------ queries
    def squeue(self, job_id: str) -> dict[str, str]:
        """{job id: state} of the job (array tasks one by one) while it is queued or running, as plain squeue
        shows it (PENDING, RUNNING, COMPLETING...); {} once it has ended or if the id is unknown."""
        return self._squeue(job_id)

    def _squeue(self, job_id: str, all_states: bool = False) -> dict[str, str]:
        """all_states: also finished jobs that slurmctld still remembers (MinJobAge, 300 s)."""
        return _states_by_job(_run(["squeue", "-h", "-r", *(["--states=all"] if all_states else []),
                                    "-j", str(job_id), "-o", "%i|%T"]))

    def sacct_states(self, job_id: str) -> dict[str, str]:
        """{job id: state} from accounting (allocations only, latest run of a requeued job)."""
        return _states_by_job(_run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "JobID,State"]))

    def sacct_state(self, job_id: str) -> str | None:
        """State of the job in sacct ("COMPLETED", "RUNNING", "CANCELLED"...), None if sacct does not know it
        (yet). For an array's master id: the state all its tasks share, else None."""
        return _one_state(str(job_id), self.sacct_states(job_id))

    def state(self, job_id: str) -> str | None:
        """Current state: squeue's while the job (any task of an array) is queued or running, then sacct's, so
        that a finished state is only reported once accounting has it: slurmdbd lags squeue by up to ~2 s
        (an array first shows as one "123" row). None: unknown yet, or the tasks of an array differ."""
        job_id = str(job_id)
        queued = self._squeue(job_id, all_states=True)
        if any(state in ACTIVE_STATES for state in queued.values()):
            return _one_state(job_id, queued)
        accounted = self.sacct_states(job_id)
        if any("_" in jid for jid in queued) and not any("_" in jid for jid in accounted):
            return None  # the finished array is not split into its tasks in accounting yet
        return _one_state(job_id, accounted)

    def wait_state(self, job_id: str, states: str | Iterable[str], timeout: float = 60.0,
                   fail_fast: bool = True) -> str:
        """Polls `state(job_id)` until it is one of `states`; returns it. A finished state is returned once
        sacct shows it, so sacct_state/sacct_states agree afterwards. Raises TimeoutError after `timeout`
        seconds, or AssertionError at once (fail_fast) if the job ends in another terminal state; both with
        a diagnosis (squeue, sacct, scontrol, daemon logs)."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        seen: list[str | None] = []
        while True:
            state = self.state(job_id)
            if not seen or seen[-1] != state:
                seen.append(state)
            if state in wanted:
                return state
            if fail_fast and state in TERMINAL_STATES:
                raise AssertionError(f"job {job_id} ended {state}, expected {sorted(wanted)} (states seen: {seen})\n"
                                     + self.diagnose(job_id))
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout}s (states seen: {seen})\n"
                                   + self.diagnose(job_id))
            time.sleep(0.2)

    # ------------------------------------------------------------------ actions
    def scancel(self, job_id: str, signal: str | int | None = None) -> None:
        """scancel the job, or only send it `signal` ("USR2", 12...): what submitit sees on preemption."""
        args = ["scancel"] + ([f"--signal={signal}"] if signal is not None else []) + [str(job_id)]
        _run(args, check=True)

    def requeue(self, job_id: str) -> None:
        """`scontrol requeue`: slurm kills the job (TERM, KILL after KillWait=5 s) and runs it again ~16 s later;
        submitit does not checkpoint on this (it ignores SIGTERM)."""
        _run(["scontrol", "requeue", str(job_id)], check=True)

    def submitit_folder(self, tmp_path: Path) -> Path:
        """A fresh submitit folder `tmp_path / "%j"` (a new subfolder of tmp_path on a second call), so that no
        result of an older job with the same id can be picked up."""
        base = Path(tmp_path)
        n = 0
        while base in self._folders or (base / "%j").exists():
            n += 1
            base = Path(tmp_path) / f"submitit-{n}"
        self._folders.add(base)
        return base / "%j"

    def executor(self, folder: Path | str, **params):
        """A submitit AutoExecutor on this cluster's partition (`cluster="slurm"`); params go to
        update_parameters (timeout_min defaults to 30: see the README about USR2 and timeout_min)."""
        import submitit

        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params.setdefault("timeout_min", 30)
        params.setdefault("slurm_partition", self.partition)
        executor.update_parameters(**params)
        return executor

    def diagnose(self, job_id: str | None = None) -> str:
        """squeue/sacct/scontrol of the job and the last lines of the daemon logs, for failure messages."""
        lines = []
        if job_id is not None:
            for args in (["squeue", "-r", "--states=all", "-j", str(job_id), "-o", "%i %T %r %M"],
                         ["sacct", "-D", "-j", str(job_id), "-o", "JobID%20,State%20,ExitCode,Elapsed,Reason%20"],
                         ["scontrol", "show", "job", str(job_id)]):
                proc = _run(args)
                lines += [f"$ {' '.join(args)}", (proc.stdout + proc.stderr).rstrip()]
        lines += ["$ sinfo -N", (_run(["sinfo", "-N"]).stdout or "").rstrip()]
        for log in ("slurmctld.log", "slurmd.log"):
            path = self.state_dir / "log" / log
            if path.is_file():
                lines += [f"--- last lines of {path}", *path.read_text(errors="replace").splitlines()[-15:]]
        return "\n".join(lines)


def _one_state(job_id: str, states: dict[str, str]) -> str | None:
    """The state of `job_id` in squeue/sacct rows. An array task ("123_4") must have its own row: while
    slurmdbd catches up, sacct can still show a finished array as one "123" row. A master id ("123") of an
    array gives the state all its tasks share (None if they differ)."""
    tasks = {jid: st for jid, st in states.items() if jid.startswith(f"{job_id}_")}
    if tasks:
        distinct = set(tasks.values())
        return distinct.pop() if len(distinct) == 1 else None
    return states.get(job_id)


# ---------------------------------------------------------------------- fixture
def _fail(message: str) -> None:
    pytest.fail(f"SLURM test cluster: {message}", pytrace=False)


def _start(state_dir: Path) -> dict[str, int]:
    """Runs start_slurm.sh; returns {daemon: pid} of those it started (alive after and not before)."""
    reason = _cannot_start_reason()
    if reason:
        _fail(reason)
    before = _running_daemons(state_dir)
    try:
        proc = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                              env={**os.environ, **SLURM_ENV}, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        _fail(f"{START_SCRIPT} did not finish in {START_TIMEOUT_S:.0f}s (ROBOTRAIN_SLURM_START_TIMEOUT); "
              f"output:\n{_text(exc.stdout)}{_text(exc.stderr)}")
    sys.stderr.write(proc.stdout + proc.stderr)  # shown with the first test's captured output
    after = _running_daemons(state_dir)
    started = {n: pid for n, pid in after.items() if before.get(n) != pid}
    if proc.returncode != 0:
        if started:  # leave nothing half-started behind
            _stop(state_dir, tuple(started))
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        _fail(f"{START_SCRIPT} failed (exit {proc.returncode}):\n{tail}")
    return started


def _stop(state_dir: Path, names: tuple[str, ...]) -> None:
    """stop_slurm.sh, with --only `names` unless they are all the daemons that run."""
    running = _running_daemons(state_dir)
    args = ["bash", str(STOP_SCRIPT)]
    if not set(running) <= set(names):  # some daemons were there before the tests: keep them
        args += ["--only", ",".join(n for n in DAEMONS if n in names)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **SLURM_ENV},
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        warnings.warn(f"{STOP_SCRIPT} failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}", stacklevel=1)


def _wait_ready(partition: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cluster_ready(partition):
        if time.monotonic() > deadline:
            nodes = _node_info(partition)
            _fail(f"node of partition '{partition}' not idle or sacct not answering after {timeout:.0f}s "
                  f"(sinfo: {nodes or 'no answer'}, sacct answers: {_sacct_answers()})")
        time.sleep(0.3)


# Coordination between the pytest sessions on this machine (a second pytest, xdist workers) that use the cluster
# of one state dir, through files next to it:
# - <dir>.users.lock: each session holds a shared lock on it while it may use the cluster;
# - <dir>.start.lock: exclusive around "check, start if needed, record" and around the final stop;
# - <dir>.owned.json: {daemon: pid} that test sessions started. The session that ends last (it gets the users lock
#   exclusively) stops those that still run with the recorded pid, and nothing else: a cluster that was up before
#   the tests stays up, and one started by a session that ended while another still used it is not leaked.
def _lock_file(path: Path):
    for mode in ("a", "r"):  # "r" when another user created it: flock works on a read-only descriptor
        try:
            return open(path, mode)  # noqa: SIM115 - the caller closes it
        except OSError:
            continue
    return None


@contextlib.contextmanager
def _exclusive(path: Path):
    handle = _lock_file(path)
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _owned(state_dir: Path) -> dict[str, int]:
    """Daemons recorded as started by test sessions that still run with the recorded pid."""
    try:
        recorded = json.loads(Path(f"{state_dir}.owned.json").read_text())
    except (OSError, ValueError):
        return {}
    alive = _running_daemons(state_dir)
    return {n: pid for n, pid in recorded.items() if alive.get(n) == pid}


def _record_owned(state_dir: Path, owned: dict[str, int]) -> None:
    path = Path(f"{state_dir}.owned.json")
    if owned:
        path.write_text(json.dumps(owned))
    else:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def slurm(pytestconfig) -> SlurmCluster:
    """The session's single-node SLURM cluster (see the module docstring)."""
    t0 = time.monotonic()
    state_dir = Path(os.environ.get("ROBOTRAIN_SLURM_DIR", "/tmp/robotrain-slurm"))
    partition = os.environ.get("ROBOTRAIN_SLURM_PARTITION", "debug")
    users = _lock_file(Path(f"{state_dir}.users.lock"))
    if users is not None:
        fcntl.flock(users, fcntl.LOCK_SH)  # waits while a session that ends is stopping the cluster
    started: dict[str, int] = {}
    try:
        with _exclusive(Path(f"{state_dir}.start.lock")):
            if not cluster_ready(partition):
                started = _start(state_dir)
                if started:
                    _record_owned(state_dir, {**_owned(state_dir), **started})
            _wait_ready(partition, READY_TIMEOUT_S)
        nodes = _node_info(partition)
        cluster = SlurmCluster(partition=partition, cpus=sum(int(n["cpus"]) for n in nodes),
                               mem_mb=min(int(n["mem"].rstrip("+")) for n in nodes),
                               node=",".join(n["node"] for n in nodes), state_dir=state_dir,
                               started=tuple(started), start_s=time.monotonic() - t0)
        wanted_cpus = os.environ.get("ROBOTRAIN_SLURM_CPUS")
        if wanted_cpus and wanted_cpus != str(cluster.cpus):
            warnings.warn(f"ROBOTRAIN_SLURM_CPUS={wanted_cpus} but the running cluster has {cluster.cpus} CPUs; "
                          "restart it to apply (tests/slurm/stop_slurm.sh, then start_slurm.sh)", stacklevel=1)
        pytestconfig.stash[_INFO] = cluster
        yield cluster
    finally:
        pytestconfig.stash[_END] = _teardown(state_dir, users)


def _teardown(state_dir: Path, users) -> str:
    """Stops the daemons test sessions started if this session is the last one using the cluster."""
    try:
        if users is not None:
            fcntl.flock(users, fcntl.LOCK_UN)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "left running: another session still uses it and stops it when it ends"
        with _exclusive(Path(f"{state_dir}.start.lock")):
            owned = _owned(state_dir)
            if not owned:
                return "left up (not started by the tests)"
            if os.geteuid() != 0:
                return f"left {', '.join(owned)} running (stopping needs root)"
            t1 = time.monotonic()
            _stop(state_dir, tuple(owned))
            _record_owned(state_dir, _owned(state_dir))
            return f"stopped {', '.join(owned)} in {time.monotonic() - t1:.1f}s"
    finally:
        if users is not None:
            users.close()


_INFO = pytest.StashKey[SlurmCluster]()
_END = pytest.StashKey[str]()


# ---------------------------------------------------------------------- hooks
def pytest_configure(config: pytest.Config) -> None:
    if not any(line.split(":")[0].strip() == "slurm" for line in config.getini("markers")):
        config.addinivalue_line("markers", "slurm: needs the real single-node SLURM cluster (tests/slurm_fixtures.py)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # a test that uses the cluster is a slurm test, marked or not
        if "slurm" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slurm") is None:
            item.add_marker(pytest.mark.slurm)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    cluster = config.stash.get(_INFO, None)
    if cluster is None:
        return
    how = (f"started {', '.join(cluster.started)} in {cluster.start_s:.1f}s" if cluster.started
           else f"already up ({cluster.start_s:.1f}s to check)")
    end = config.stash.get(_END, "")
    terminalreporter.write_line(f"SLURM test cluster: node {cluster.node}, partition {cluster.partition}, "
                                f"{cluster.cpus} CPUs, {cluster.mem_mb} MB; {how}; {end}")
