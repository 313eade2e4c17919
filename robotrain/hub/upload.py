"""The upload child process: the pusher's commits run there, not on the training process.

Building a commit holds the GIL for long stretches (hashing, base64 and JSON encoding of every file
in huggingface_hub's regular-mode upload), which on a thread of the training process would stall the
training loop. So `CheckpointPusher` hands each commit to one child: a fresh interpreter (never a
fork: the trainer has threads and maybe CUDA) at nice 10, started at the first upload, that imports
huggingface_hub and this package only (never torch, Hydra or robotrain.config: tests/test_hub.py
checks). The child inherits the environment (HF_ENDPOINT, HF_TOKEN, HF_HOME...), ignores Ctrl-C and
preemption signals (the trainer decides when uploads stop) and exits when its pipe closes or the
trainer is gone; one that dies counts as a retryable failure and a new one takes the next attempt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoFile

from robotrain import preemption
from robotrain.hub.errors import UploadError
from robotrain.hub.fetch import SAFE_SUFFIXES

_ROOT_CARD = "README.md"
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
# A plain `python -c`, not multiprocessing's spawn: spawn re-imports the parent's main script in the
# child (a training script's torch, the `robotrain` console script's Hydra) and leaves a
# resource-tracker process running. Not `-m` either: robotrain.hub imports this module, so runpy
# would warn that it is in sys.modules before it runs as __main__.
_CHILD_CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from robotrain.hub.upload import serve_uploads; serve_uploads(int(sys.argv[2]), int(sys.argv[3]))")
_POLL_S = 1.0


class UploadProcess:
    """The pusher's upload child: `call(fn, *args)` runs a module-level function of this module there
    and returns its result, or raises its `UploadError`. Started at the first call, and again after
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
            raise UploadError(f"the upload process {self._reap(proc)}", retryable=True) from None
        if not ok:
            raise value
        return value

    def _started(self) -> tuple[subprocess.Popen, Connection]:
        with self._lock:
            if self._stopped:  # close() stopped uploads: nothing may start after it returned
                raise UploadError("the pusher is closed", retryable=False)
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


def serve_uploads(fd: int, parent_pid: int) -> None:
    """The upload process: runs each (function, args) the pusher sends and answers (True, result) or
    (False, UploadError), until it gets None or its pipe closes."""
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
                answer = (False, UploadError.of(err))
            conn.send(answer)


def _exit_without_parent(parent_pid: int) -> None:
    """Ends the upload process once the trainer is gone (killed before close()): no orphan upload."""
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    os._exit(1)


def commit_files(repo_id: str, folder: Path, prefix: str, message: str) -> str:
    """In the upload process: every file of `folder` at `prefix` + its relative path, in exactly one
    commit (upload_folder may split a big folder into several); returns its sha. Files the Hub
    already holds with the same content are left out by the client, and if none changed it makes no
    commit and returns the head, which holds them."""
    return HfApi().create_commit(repo_id, operations=_add_operations(folder, prefix), commit_message=message).oid


def commit_final(repo_id: str, folder: Path, card: str, message: str) -> str:
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
