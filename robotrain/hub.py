"""The Hugging Face Hub: repo creation, background checkpoint pushes, finding and downloading.

Layout of a run's model repo (everything goes through `huggingface_hub`):

    checkpoints/<step folder>/pretrained_model/…   one commit per saved checkpoint, the same files
    checkpoints/<step folder>/training_state/…     as the local folder (see robotrain.checkpoint)
    config.json model.safetensors train_config.json policy_*processor*   the final model (root)
    README.md                                                           its model card

Tags: each checkpoint commit is tagged with its step folder name (`000010`), created only after
that commit succeeded and pointing at it, so a tag never names a partial upload. A tag left by an
earlier run for the same step is moved to the new commit.

Revisions (`resume=hub:user/repo@<rev>`, `policy.pretrained_revision=<rev>`):
    all digits (`10`, `000010`)   a step: the checkpoint folder whose number equals it, looked up
                                  at the commit of the tag of that step (any zero-padding), else
                                  on main; if no such step exists the string is tried as a ref
    a tag, branch or commit sha   the latest checkpoint at that revision (root files for pretrained)
    none                          main
The latest checkpoint at a revision is the largest all-digit folder under `checkpoints/`,
compared as numbers, so a longer zero-padding after a resume with more steps still sorts right.

Pushing (`CheckpointPusher`): a background thread uploads what `submit()` hands it, oldest step
first; training never waits on the network except in `close()`, which waits a bounded time. The
commits themselves run in one upload child process (a fresh interpreter, never a fork: the trainer
has threads and maybe CUDA; at nice 10; without torch), started at the first upload: building a
commit holds the GIL for long stretches (hashing, base64 and JSON encoding of every file in
huggingface_hub's regular-mode upload), which on the training process's thread would stall the
training loop. The thread keeps the queue, the retries and the tags (small requests). The child
inherits the environment (HF_ENDPOINT, HF_TOKEN, HF_HOME...), ignores Ctrl-C and preemption
signals (the trainer decides when uploads stop) and exits when its pipe closes or the trainer is
gone; one that dies counts as a retryable failure and a new one takes the next attempt. `close()`
stops it, and kills it (upload in flight included) when its wait runs out.
Failures on 5xx, 429, 408, timeouts and dropped connections are retried with exponential back-off
(`max_retries` attempts). A checkpoint that still failed stays pending and is tried again when the
next checkpoint is submitted (and once more at `close()`); if its local folder was deleted
meanwhile it is dropped with a warning. Other 4xx errors are not retried: that checkpoint stays in
`pending()` (so local pruning keeps it) until the process ends, and `close()` says how to push it
by hand. Messages go to the "robotrain" logger; tokens are never read, printed or logged here
(huggingface_hub finds them in HF_TOKEN or `hf auth login`).

Downloads fetch only safetensors and JSON files (never pickles), and of a checkpoint only its own
folder at its commit, never the repo's whole history. Bad input (malformed repo id, missing repo,
revision or step, a repo without checkpoints, a refused token) raises a one-line `UserError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import httpx2  # huggingface_hub's HTTP library: its transport errors are what a dropped connection raises
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_token,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from robotrain import preemption
from robotrain.checkpoint_layout import CHECKPOINTS, PRETRAINED, is_complete
from robotrain.errors import UserError
from robotrain.repo_id import check_repo_id

if TYPE_CHECKING:
    from robotrain.config import HubConfig

log = logging.getLogger("robotrain")

FINAL = "final"
"""What `close()` lists for a final model (`push_final`) that was not pushed."""
SAFE_SUFFIXES = (".safetensors", ".json")
"""The only files ever downloaded (no pickle is ever fetched, let alone loaded)."""
_ROOT_CARD = "README.md"
_RETRY_STATUSES = frozenset({408, 429})


class HubCheckpoint(NamedTuple):
    """A checkpoint on the Hub: its step folder under `checkpoints/` and the commit to read it at."""

    name: str
    """Step folder name, e.g. "000010"."""
    sha: str
    """Commit holding that folder."""

    @property
    def step(self) -> int:
        return int(self.name)


# -- repo -------------------------------------------------------------------------------------


def ensure_repo(repo_id: str, *, private: bool = False) -> str:
    """Create the model repo if needed (`exist_ok`: an existing one is reused as it is, its
    visibility unchanged); returns its URL. Call it at start, before training, so a missing or
    refused token, or a bad repo id, stops the run at once with a one-line UserError."""
    check_repo_id(repo_id)
    if get_token() is None:
        raise UserError(
            f"pushing to hub.repo_id={repo_id} needs a Hugging Face token with write access: "
            "run `hf auth login` or set HF_TOKEN (or unset hub.repo_id)"
        )
    with hub_errors(repo_id, writing=True):
        url = HfApi().create_repo(repo_id, private=private, exist_ok=True)
    return str(url)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's errors about bad input, auth or reachability into one-line UserErrors."""
    fix_token = "run `hf auth login` or set HF_TOKEN"
    try:
        yield
    except UserError:
        raise
    except HFValidationError:
        check_repo_id(repo_id)  # names the repo id's fault
        raise
    except RepositoryNotFoundError:
        raise UserError(
            f"repo {repo_id} not found on the Hub ({constants.ENDPOINT}), or your token cannot see it: "
            f"check the repo id, or {fix_token}"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"revision {revision!r} not found in {repo_id}: pass a step (e.g. 10), a tag, a branch or a commit sha"
        ) from None
    except OfflineModeIsEnabled:
        raise UserError(f"HF_HUB_OFFLINE=1 is set but {repo_id} is on the Hub: unset HF_HUB_OFFLINE") from None
    except LocalEntryNotFoundError as err:  # a download that kept failing (5xx, connection)
        raise UserError(f"could not download from {repo_id} ({_describe(err)}); try again later") from None
    except HfHubHTTPError as err:
        status = _status(err)
        if status == 401:
            raise UserError(f"the Hub refused your token (401) for {repo_id}: {fix_token} with a valid token") from None
        if status == 403:
            need = "write" if writing else "read"
            raise UserError(
                f"your token may not {need} {repo_id} (403): use a token with {need} access to that namespace, "
                f"or pick a repo under your own user"
            ) from None
        if status == 400:
            check_repo_id(repo_id)
        raise UserError(f"the Hub failed on {repo_id} ({_describe(err)}); try again later") from None
    except httpx2.TransportError as err:
        raise UserError(
            f"cannot reach the Hub at {constants.ENDPOINT} ({_describe(err)}): check the network or HF_ENDPOINT"
        ) from None


# -- pushing ----------------------------------------------------------------------------------


@dataclass
class _Job:
    name: str  # step folder name, or FINAL
    folder: Path  # the checkpoint folder, or the pretrained_model/ folder for FINAL
    step: int
    card: str | None = None  # FINAL only: README.md
    oid: str | None = None  # commit that landed (so a retry after a failed tag only re-tags)

    @property
    def is_final(self) -> bool:
        return self.name == FINAL

    def order(self) -> tuple[bool, int]:
        return (self.is_final, self.step)


_PUSHED, _LATER, _FAILED, _GONE = "pushed", "later", "failed", "gone"


class CheckpointPusher:
    """Uploads checkpoints (and the final model) from a background thread, each commit made by an
    upload child process (see "Pushing" in the module docstring).

    `submit()` and `push_final()` return at once; `pending()` names the step folders not pushed
    yet (queued, uploading, waiting to be retried, or refused); `close()` waits a bounded time
    and returns what was not pushed. Thread-safe; one pusher per run, on the main process.

    Attempt `k` (1-based) that fails with a retryable error waits `base_delay_s * 2**(k-1)`
    seconds (at most `max_delay_s`, at least a 429's Retry-After) before attempt `k+1`.
    """

    def __init__(self, repo_id: str, *, max_retries: int = 5, base_delay_s: float = 2.0, max_delay_s: float = 60.0):
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1, got {max_retries}")
        self.repo_id = repo_id
        self.max_retries, self.base_delay_s, self.max_delay_s = max_retries, base_delay_s, max_delay_s
        self._api = HfApi()  # tags only: the commits go through self._uploads
        self._uploads = _UploadProcess()
        self._cond = threading.Condition()
        self._queue: list[_Job] = []  # to upload, oldest step first (the final model last)
        self._current: _Job | None = None  # being uploaded
        self._later: list[_Job] = []  # retries exhausted: tried again with the next submit
        self._failed: list[_Job] = []  # non-retryable error: never tried again by this pusher
        self._pushed: dict[str, str] = {}  # name -> commit sha
        self._closing = False
        self._abandon = threading.Event()  # close() timed out, or the process exits: stop uploading
        self._closed_result: list[str] | None = None
        self._thread = threading.Thread(target=self._work, name="robotrain-hub-push", daemon=True)
        self._thread.start()
        # At exit without close() the upload stops with the process, as it would on a daemon thread.
        weakref.finalize(self, _stop_uploads, self._abandon, self._uploads)

    @classmethod
    def from_config(cls, cfg: HubConfig, **kwargs) -> CheckpointPusher:
        """Create (or reuse) `cfg.repo_id` now, so bad ids and tokens fail before training, and
        return a pusher with `cfg.max_retries`."""
        ensure_repo(cfg.repo_id, private=cfg.private)
        return cls(cfg.repo_id, max_retries=cfg.max_retries, **kwargs)

    # -- the training loop's side

    def submit(self, folder: Path, step: int) -> None:
        """Queue checkpoint `folder` (a step folder, e.g. run/checkpoints/000010) for upload to
        `checkpoints/<folder name>/` and the tag `<folder name>`. Returns at once. Checkpoints whose
        retries ran out are queued again, ahead of this one."""
        folder = Path(folder)
        if not folder.name.isdigit():
            raise ValueError(f"{folder} is not a step folder (its name must be all digits)")
        self._enqueue(_Job(folder.name, folder, step))

    def push_final(self, pretrained_dir: Path, card: str, *, step: int) -> None:
        """Queue the final model for the repo root: every file of `pretrained_dir` (a
        pretrained_model/ folder: config.json, model.safetensors or adapter files,
        train_config.json, processor files) plus `card` as README.md, in one commit that also
        deletes root-level .safetensors/.json files of an earlier final model that are not in this
        one. Runs after the checkpoints submitted before it; returns at once."""
        self._enqueue(_Job(FINAL, Path(pretrained_dir), step, card=card))

    def pending(self) -> set[str]:
        """Step folder names not pushed yet (queued, uploading now, waiting for a retry, or refused
        by the Hub): pass it to `checkpoint.prune(..., protect=...)`."""
        with self._cond:
            return {job.name for job in self._unfinished() if not job.is_final}

    def pushed(self) -> dict[str, str]:
        """Names pushed so far (step folder names, and FINAL) -> their commit sha."""
        with self._cond:
            return dict(self._pushed)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or uploading (jobs waiting for the next submit do not
        count); False if `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(self._idle, timeout)

    def _idle(self) -> bool:
        """Nothing queued or uploading (call with the lock held)."""
        return not self._queue and self._current is None

    def _unfinished(self) -> list[_Job]:
        """Every job not pushed: uploading, queued, waiting for a retry, refused (lock held)."""
        return [j for j in (self._current, *self._queue, *self._later, *self._failed) if j is not None]

    def close(self, timeout: float | None = None) -> list[str]:
        """Stop taking work, give checkpoints whose retries ran out one more round, and wait at
        most `timeout` seconds (None: no limit) for the uploads to finish. Returns the names not
        pushed (step folder names, oldest first, and FINAL), and logs them with how to push them by
        hand. An upload still in flight at the deadline is stopped (its upload process killed) and
        listed; no upload process is left running either way."""
        with self._cond:
            if self._closed_result is not None:
                return list(self._closed_result)
            self._closing = True
            self._queue = sorted([*self._later, *self._queue], key=_Job.order)
            self._later = []
            self._cond.notify_all()
            if self._queue or self._current is not None:
                log.info("waiting up to %s for uploads to %s to finish",
                         "no limit" if timeout is None else f"{timeout:g}s", self.repo_id)
            drained = self._cond.wait_for(self._idle, timeout)
            if not drained:
                self._abandon.set()
                self._cond.notify_all()
            left = sorted(self._unfinished(), key=_Job.order)
            self._closed_result = [job.name for job in left]
        if drained:
            self._thread.join(timeout=5.0)
            self._uploads.stop()
        else:
            self._uploads.kill()
        self._report(left, drained)
        return list(self._closed_result)

    # -- the worker

    def _enqueue(self, job: _Job) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("CheckpointPusher is closed")
            # Jobs whose retries ran out join the queue again; it runs oldest step first. A step saved
            # again (same folder name) replaces its earlier job, even a refused one.
            def others(jobs: list[_Job]) -> list[_Job]:
                return [j for j in jobs if j.name != job.name]

            self._failed = others(self._failed)
            self._queue = sorted([*others(self._later), *others(self._queue), job], key=_Job.order)
            self._later = []
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing or self._abandon.is_set())
                if self._abandon.is_set() or not self._queue:
                    return
                job = self._current = self._queue.pop(0)
            try:
                outcome = self._run(job)
            except Exception:  # a bug must not kill the worker and leave close() waiting on it
                log.exception("unexpected error while pushing %s to %s", _label(job), self.repo_id)
                outcome = _FAILED
            with self._cond:
                self._current = None
                if outcome == _PUSHED:
                    self._pushed[job.name] = job.oid
                elif outcome == _LATER:
                    self._later.append(job)
                    self._later.sort(key=_Job.order)
                elif outcome == _FAILED:
                    self._failed.append(job)
                self._cond.notify_all()

    def _run(self, job: _Job) -> str:
        what = _label(job)
        for attempt in range(1, self.max_retries + 1):
            if self._abandon.is_set():
                return _LATER
            if not job.folder.is_dir():
                log.warning("%s was deleted locally before it could be uploaded to %s; skipping it", what, self.repo_id)
                return _GONE
            try:
                self._attempt(job)
            except Exception as raised:  # noqa: BLE001 - sorted into retryable / not below, never swallowed silently
                # The upload process reports an _UploadError; the tag calls here raise the client's errors.
                err = raised if isinstance(raised, _UploadError) else _UploadError.of(raised)
                if self._abandon.is_set():
                    return _LATER  # close() ran out of time and stopped this upload: close() lists it
                if not job.folder.is_dir():
                    log.warning("%s was deleted locally while it was being uploaded to %s; skipping it",
                                what, self.repo_id)
                    return _GONE
                if not err.retryable:
                    log.error("upload of %s to %s failed and will not be retried: %s", what, self.repo_id, err)
                    return _FAILED
                if attempt == self.max_retries:
                    log.warning("upload of %s to %s failed %d times (last: %s); it stays pending and is tried "
                                "again with the next checkpoint", what, self.repo_id, attempt, err)
                    return _LATER
                delay = self._delay(attempt, err)
                log.warning("upload of %s to %s failed (%s); attempt %d/%d in %.3gs", what, self.repo_id,
                            err, attempt + 1, self.max_retries, delay)
                if self._abandon.wait(delay):
                    return _LATER
            else:
                log.info("pushed %s to %s (commit %s)", what, self.repo_id, job.oid[:8])
                return _PUSHED
        return _LATER

    def _delay(self, attempt: int, err: _UploadError) -> float:
        delay = max(self.base_delay_s * 2 ** (attempt - 1), err.retry_after)
        return min(delay, self.max_delay_s)

    def _attempt(self, job: _Job) -> None:
        if job.is_final:
            job.oid = self._uploads.call(_commit_final, self.repo_id, job.folder, job.card,
                                         f"Final model (step {job.step})")
            return
        if job.oid is None:
            job.oid = self._uploads.call(_commit_files, self.repo_id, job.folder, f"{CHECKPOINTS}/{job.name}/",
                                         f"Checkpoint {job.name} (step {job.step})")
        self._tag(job)

    def _tag(self, job: _Job) -> None:
        """Tag `job.oid` with the step folder name; a tag of an earlier run for this step is moved."""
        try:
            self._api.create_tag(self.repo_id, tag=job.name, revision=job.oid, tag_message=f"step {job.step}")
        except HfHubHTTPError as err:
            if _status(err) != 409:
                raise
            existing = {t.name: t.target_commit for t in self._api.list_repo_refs(self.repo_id).tags}
            if existing.get(job.name) == job.oid:
                return  # an earlier attempt created it but lost the answer
            log.info("moving tag %s of %s to the new commit %s", job.name, self.repo_id, job.oid[:8])
            self._api.delete_tag(self.repo_id, tag=job.name)
            self._api.create_tag(self.repo_id, tag=job.name, revision=job.oid, tag_message=f"step {job.step}")

    def _report(self, left: list[_Job], drained: bool) -> None:
        if not left:
            if self._pushed:
                log.info("all uploads to %s finished (%d pushed)", self.repo_id, len(self._pushed))
            return
        why = "" if drained else " (the wait at exit ran out; raise hub.drain_timeout_s to wait longer)"
        lines = [f"{len(left)} upload(s) to {self.repo_id} were not pushed{why}; push them by hand "
                 "(after `hf auth login` if the Hub refused your token):"]
        for job in left:
            if job.is_final:
                lines.append(f"  final model: hf upload {self.repo_id} {job.folder} .  (and its README.md)")
            elif not job.folder.is_dir():
                lines.append(f"  checkpoint {job.name}: its local folder {job.folder} is gone")
            else:
                lines.append(f"  checkpoint {job.name}: hf upload {self.repo_id} {job.folder} "
                             f"{CHECKPOINTS}/{job.name} && hf repos tag create {self.repo_id} {job.name}")
        log.warning("\n".join(lines))


# -- the upload process -------------------------------------------------------------------------

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# A plain `python -c`, not multiprocessing's spawn: spawn re-imports the parent's main script in the
# child (a training script's torch, the `robotrain` console script's Hydra) and leaves a
# resource-tracker process running; this child imports robotrain.hub and huggingface_hub only.
_CHILD_CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from robotrain.hub import _serve_uploads; _serve_uploads(int(sys.argv[2]), int(sys.argv[3]))")
_POLL_S = 1.0


class _UploadError(Exception):
    """A failed upload as the upload process reports it: picklable (huggingface_hub's errors carry an
    HTTP response that may not be) and all that the pusher's retry loop needs to know of it."""

    def __init__(self, description: str, retryable: bool, status: int | None = None, retry_after: float = 0.0):
        super().__init__(description, retryable, status, retry_after)
        self.description, self.retryable, self.status, self.retry_after = description, retryable, status, retry_after

    def __str__(self) -> str:
        return self.description

    @classmethod
    def of(cls, err: Exception) -> _UploadError:
        return cls(_describe(err), _retryable(err), _status(err), _retry_after(err))


class _UploadProcess:
    """The pusher's upload child: `call(fn, *args)` runs a module-level function of this module there
    and returns its result, or raises its `_UploadError`. Started at the first call, and again after
    it died. `call` is made by the pusher's thread only; `stop` and `kill` by close()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._stopped = False

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        proc, conn = self._started()
        try:
            conn.send((fn, args))
            # Poll rather than rely on EOF alone: a process the trainer forked meanwhile (a DataLoader
            # worker) may hold a copy of the child's end of the pipe, which then never reads EOF.
            while not conn.poll(_POLL_S):
                if proc.poll() is not None:
                    raise EOFError
            ok, value = conn.recv()
        except (EOFError, OSError):
            raise _UploadError(f"the upload process {self._reap(proc)}", retryable=True) from None
        if not ok:
            raise value
        return value

    def _started(self) -> tuple[subprocess.Popen, Connection]:
        with self._lock:
            if self._stopped:  # close() stopped uploads: nothing may start after it returned
                raise _UploadError("the pusher is closed", retryable=False)
            if self._proc is None:
                ours, theirs = Pipe()
                with theirs:  # the child's end stays open in the child only
                    self._proc = subprocess.Popen(
                        [sys.executable, "-c", _CHILD_CODE, _PACKAGE_PARENT, str(theirs.fileno()), str(os.getpid())],
                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                self._conn = ours
            return self._proc, self._conn

    def _reap(self, proc: subprocess.Popen) -> str:
        """After its pipe broke: make sure that child is gone and forgotten; say how it ended."""
        with self._lock:
            if self._proc is proc:
                self._conn.close()
                self._proc = self._conn = None
        proc.kill()  # no-op unless it closed its pipe but lives on
        how = f"exited with code {proc.wait()}"
        with contextlib.suppress(ValueError):  # real-time signals have no name
            how = f"was killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else how
        return f"{how}; a new one takes the next attempt"

    def stop(self, timeout: float = 5.0) -> None:
        """Ask an idle child to exit, and wait for it (killed after `timeout` seconds)."""
        with self._lock:
            self._stopped = True
            proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            conn.send(None)
        conn.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)

    def kill(self) -> None:
        """Kill the child now, an upload in flight included; the pusher's thread, if it waits on
        it, sees it die (and closes the pipe). No new child starts after this."""
        with self._lock:
            self._stopped = True
            proc = self._proc
        if proc is not None:
            _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    # Bounded, as close() is: a child stuck in the kernel (a hung network filesystem) is reaped later.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)


def _stop_uploads(abandon: threading.Event, uploads: _UploadProcess) -> None:
    abandon.set()  # what the thread was uploading is not a failure to report
    uploads.kill()


def _serve_uploads(fd: int, parent_pid: int) -> None:
    """The upload process: runs each (function, args) the pusher sends and answers (True, result) or
    (False, _UploadError), until it gets None or its pipe closes."""
    os.nice(10)  # hashing and encoding yield the CPU to training
    # The trainer decides when uploads stop: Ctrl-C or a preemption signal sent to the whole process
    # group must not kill the upload that the trainer's save-and-drain is waiting for.
    for sig in (signal.SIGINT, *preemption.SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_exit_without_parent, args=(parent_pid,), daemon=True).start()
    conn = Connection(fd)
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):  # the pusher left: so do we
        while (request := conn.recv()) is not None:
            fn, args = request
            try:
                answer = (True, fn(*args))
            except Exception as err:  # noqa: BLE001 - every failure goes back to the pusher, which sorts it
                answer = (False, _UploadError.of(err))
            conn.send(answer)


def _exit_without_parent(parent_pid: int) -> None:
    """Ends the upload process once the trainer is gone (killed before close()): no orphan upload."""
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    os._exit(1)


def _commit_files(repo_id: str, folder: Path, prefix: str, message: str) -> str:
    """In the upload process: every file of `folder` at `prefix` + its relative path, in exactly one
    commit (upload_folder may split a big folder into several); returns its sha. Files the Hub
    already holds with the same content are left out by the client, and if none changed it makes no
    commit and returns the head, which holds them."""
    return HfApi().create_commit(repo_id, operations=_add_operations(folder, prefix), commit_message=message).oid


def _commit_final(repo_id: str, folder: Path, card: str, message: str) -> str:
    """In the upload process: the final model's files and `card` (README.md) at the repo root, in one
    commit that also deletes the root-level .safetensors/.json files not in it; returns its sha."""
    api = HfApi()
    adds = [*_add_operations(folder, ""), CommitOperationAdd(path_in_repo=_ROOT_CARD, path_or_fileobj=card.encode())]
    new = {op.path_in_repo for op in adds}
    stale = [e.path for e in api.list_repo_tree(repo_id)
             if isinstance(e, RepoFile) and e.path.endswith(SAFE_SUFFIXES) and e.path not in new]
    operations = [*adds, *(CommitOperationDelete(path_in_repo=path) for path in stale)]
    return api.create_commit(repo_id, operations=operations, commit_message=message).oid


def _add_operations(folder: Path, prefix: str) -> list[CommitOperationAdd]:
    """Every file under `folder` (but huggingface_hub's .cache/ bookkeeping), at `prefix` + its relative
    path: hidden files included (a checkpoint may hold some; it is uploaded as it is on disk)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and ".cache" not in p.relative_to(folder).parts)
    return [CommitOperationAdd(path_in_repo=prefix + p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in files]


def _label(job: _Job) -> str:
    return f"the final model (step {job.step})" if job.is_final else f"checkpoint {job.name}"


def _status(err: Exception) -> int | None:
    if not isinstance(err, HfHubHTTPError):
        return None
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _retryable(err: Exception) -> bool:
    """5xx, 429, 408, timeouts, refused and dropped connections: worth another try."""
    if isinstance(err, HfHubHTTPError):
        status = _status(err)
        return status is None or status >= 500 or status in _RETRY_STATUSES
    return isinstance(err, (httpx2.TransportError, TimeoutError, ConnectionError))


def _retry_after(err: Exception) -> float:
    """A 429's Retry-After in seconds; 0 when there is none."""
    if isinstance(err, HfHubHTTPError) and _status(err) == 429:
        with contextlib.suppress(ValueError):
            return float(err.response.headers.get("Retry-After", 0))
    return 0.0


def _describe(err: BaseException) -> str:
    """One line about an error, without tokens (huggingface_hub's messages carry none)."""
    if isinstance(err, HfHubHTTPError) and _status(err) is not None:
        detail = err.server_message or str(err)
        return f"HTTP {_status(err)}: {detail.strip().splitlines()[0] if detail.strip() else type(err).__name__}"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


# -- the final model's card ---------------------------------------------------------------------


def model_card(
    repo_id: str,
    *,
    policy_type: str,
    dataset_repo_id: str,
    steps: int,
    metrics: dict[str, float] | None = None,
    adapter: bool = False,
) -> str:
    """README.md for the repo root: what was trained on what for how long, its final metrics, how
    to load it and how to resume the run. `adapter`: the root holds PEFT adapter files."""
    rows = "\n".join(f"| {key} | {_fmt(value)} |" for key, value in sorted((metrics or {}).items()))
    table = f"| metric | value |\n|---|---|\n{rows}" if rows else "No metrics were recorded."
    weights = "PEFT adapter files (adapter_config.json, adapter_model.safetensors)" if adapter else "model.safetensors"
    return f"""---
library_name: robotrain
pipeline_tag: robotics
tags:
- robotics
- lerobot
- robotrain
- {policy_type}
datasets:
- {dataset_repo_id}
---

# {policy_type} policy for `{dataset_repo_id}`

This `{policy_type}` policy was trained with robotrain for {steps} steps on the LeRobot dataset
`{dataset_repo_id}`. The repo root holds the final model in LeRobot's pretrained_model layout
(config.json, {weights}, train_config.json and the normalization processor files).

## Final metrics (step {steps})

{table}

## Use it

```python
from robotrain import pretrained

policy = pretrained.load("{repo_id}")
policy.reset()
action = policy.select_action(observation)  # observation: dict of batched tensors
```

`pretrained.load("{repo_id}", revision="10")` loads the checkpoint of step 10 instead (a step, tag,
branch or commit sha).

## Resume or extend training

```bash
python -m robotrain resume=hub:{repo_id}            # from the latest checkpoint
python -m robotrain resume=hub:{repo_id}@10         # from step 10 (or @<tag|branch|commit sha>)
python -m robotrain resume=hub:{repo_id} steps=<more than {steps}>
```

Every checkpoint is in `checkpoints/<step>/` (pretrained_model/ and training_state/, as on disk)
and tagged with its step.
"""


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- finding and downloading ------------------------------------------------------------------


def resolve_checkpoint(repo_id: str, revision: str | None = None) -> HubCheckpoint:
    """The checkpoint a revision names: a step (`10`, `000010`) is that step's checkpoint; a tag,
    branch or sha (or None: main) is the latest checkpoint at that revision."""
    check_repo_id(repo_id)
    with hub_errors(repo_id, revision):
        api = HfApi()
        sha, step_checkpoint = _resolve(api, repo_id, revision)
        return step_checkpoint or _latest_at(api, repo_id, sha, revision)


def download_checkpoint(repo_id: str, revision: str | None, dest: Path) -> Path:
    """Download only the checkpoint `revision` names (see resolve_checkpoint), only its
    safetensors and JSON files, to `dest/checkpoints/<step folder>/`, and return that folder.
    Passing a run dir as `dest` puts it where that run's local checkpoints live."""
    found = resolve_checkpoint(repo_id, revision)
    prefix = f"{CHECKPOINTS}/{found.name}/"
    with hub_errors(repo_id, revision):
        snapshot_download(repo_id, revision=found.sha, local_dir=dest,
                          allow_patterns=_safe_patterns(prefix))
    folder = Path(dest) / CHECKPOINTS / found.name
    if not is_complete(folder):
        raise UserError(
            f"checkpoint {found.name} of {repo_id} (commit {found.sha[:8]}) is incomplete on the Hub; "
            f"resume from another step with resume=hub:{repo_id}@<step>"
        )
    log.info("downloaded checkpoint %s of %s (commit %s) to %s", found.name, repo_id, found.sha[:8], folder)
    return folder


def download_pretrained(repo_id: str, revision: str | None = None) -> Path:
    """A local pretrained_model folder (for `policies.from_pretrained`): for a step revision that
    checkpoint's `pretrained_model/`; otherwise the root model files at that revision, or, when the
    root has no config.json, the latest checkpoint's `pretrained_model/`. Safetensors and JSON only,
    into the Hugging Face cache."""
    check_repo_id(repo_id)
    with hub_errors(repo_id, revision):
        api = HfApi()
        sha, found = _resolve(api, repo_id, revision)
        if found is None:
            root = [e.path for e in api.list_repo_tree(repo_id, revision=sha)
                    if isinstance(e, RepoFile) and e.path.endswith(SAFE_SUFFIXES)]
            if "config.json" in root:
                return Path(snapshot_download(repo_id, revision=sha, allow_patterns=root))
            found = _latest_at(api, repo_id, sha, revision)
            log.info("%s has no model at its root; using checkpoint %s", repo_id, found.name)
        prefix = f"{CHECKPOINTS}/{found.name}/{PRETRAINED}/"
        snapshot = snapshot_download(repo_id, revision=found.sha,
                                     allow_patterns=_safe_patterns(prefix))
    folder = Path(snapshot) / prefix
    if not (folder / "config.json").is_file():
        raise UserError(f"checkpoint {found.name} of {repo_id} has no {PRETRAINED}/config.json; pick another step")
    return folder


def _safe_patterns(prefix: str) -> list[str]:
    """allow_patterns for the safetensors and JSON files under `prefix` (a folder, with its slash)."""
    return [f"{prefix}*{suffix}" for suffix in SAFE_SUFFIXES]


def _resolve(api: HfApi, repo_id: str, revision: str | None) -> tuple[str, HubCheckpoint | None]:
    """(commit sha, the checkpoint if `revision` is a step) for a revision."""
    if revision is not None and revision.isdigit():
        found = _checkpoint_of_step(api, repo_id, int(revision))
        if found is not None:
            return found.sha, found
        try:  # not a step: maybe an all-digit branch, tag or short sha
            return api.repo_info(repo_id, revision=revision).sha, None
        except RevisionNotFoundError:
            steps = _step_names(api, repo_id, api.repo_info(repo_id).sha)
            have = f"it has steps {', '.join(steps[-5:])}" if steps else "it has no checkpoints"
            raise UserError(f"step {revision} not found in {repo_id} ({have}); pass one of those, or a tag or sha") from None
    return api.repo_info(repo_id, revision=revision).sha, None


def _checkpoint_of_step(api: HfApi, repo_id: str, step: int) -> HubCheckpoint | None:
    """The checkpoint of `step`: at the commit of its tag (any padding), else on main."""
    tagged = [t.target_commit for t in api.list_repo_refs(repo_id).tags if t.name.isdigit() and int(t.name) == step]

    def commits():
        yield from tagged
        yield api.repo_info(repo_id).sha  # main: asked only when no tagged commit has the step

    for sha in commits():
        names = [n for n in _step_names(api, repo_id, sha) if int(n) == step]
        if names:
            return HubCheckpoint(names[0], sha)
    return None


def _latest_at(api: HfApi, repo_id: str, sha: str, revision: str | None) -> HubCheckpoint:
    names = _step_names(api, repo_id, sha)
    if not names:
        raise UserError(
            f"{repo_id} has no checkpoints at {revision or 'main'} (nothing under {CHECKPOINTS}/): push some with "
            "hub.push_checkpoints=true, or resume from a local run dir"
        )
    return HubCheckpoint(names[-1], sha)


def _step_names(api: HfApi, repo_id: str, sha: str) -> list[str]:
    """All-digit folder names under checkpoints/ at commit `sha`, by step number."""
    try:
        entries = list(api.list_repo_tree(repo_id, path_in_repo=CHECKPOINTS, revision=sha))
    except EntryNotFoundError:
        return []
    names = [PurePosixPath(e.path).name for e in entries if isinstance(e, RepoFolder)]
    return sorted((n for n in names if n.isdigit()), key=int)


__all__ = [
    "CHECKPOINTS", "FINAL", "CheckpointPusher", "HubCheckpoint", "check_repo_id", "download_checkpoint",
    "download_pretrained", "ensure_repo", "hub_errors", "model_card",
    "resolve_checkpoint",
]
