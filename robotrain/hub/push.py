"""Pushing a run to the Hub: `ensure_repo` at start, then `CheckpointPusher`, whose background thread
uploads what `submit()` and `push_final()` hand it, oldest step first; training never waits on the
network except in `close()`, which waits a bounded time. The thread keeps the queue, the retries and
the tags (small requests); the commits themselves run in the upload child (robotrain.hub.upload).
`close()` stops that child, and kills it (upload in flight included) when its wait runs out.

Failures on 5xx, 429, 408, timeouts and dropped connections are retried with exponential back-off
(`max_retries` attempts). A checkpoint that still failed stays pending and is tried again when the
next checkpoint is submitted (and once more at `close()`); if its local folder was deleted
meanwhile it is dropped with a warning. Other 4xx errors are not retried: that checkpoint stays in
`pending()` (so local pruning keeps it) until the process ends, and `close()` says how to push it
by hand. Messages go to the "robotrain" logger; tokens are never read, printed or logged here
(huggingface_hub finds them in HF_TOKEN or `hf auth login`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from robotrain.checkpoint_layout import CHECKPOINTS
from robotrain.errors import UserError
from robotrain.hub.errors import UploadError, http_status, hub_errors
from robotrain.hub.upload import UploadProcess, commit_files, commit_final
from robotrain.repo_id import check_repo_id

if TYPE_CHECKING:
    from robotrain.config import HubConfig

log = logging.getLogger("robotrain")

FINAL = "final"
"""What `close()` lists for a final model (`push_final`) that was not pushed."""


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
    upload child process (see this module's docstring and robotrain.hub.upload).

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
        self._uploads = UploadProcess()
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
                # The upload process reports an UploadError; the tag calls here raise the client's errors.
                err = raised if isinstance(raised, UploadError) else UploadError.of(raised)
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

    def _delay(self, attempt: int, err: UploadError) -> float:
        delay = max(self.base_delay_s * 2 ** (attempt - 1), err.retry_after)
        return min(delay, self.max_delay_s)

    def _attempt(self, job: _Job) -> None:
        if job.is_final:
            job.oid = self._uploads.call(commit_final, self.repo_id, job.folder, job.card,
                                         f"Final model (step {job.step})")
            return
        if job.oid is None:
            job.oid = self._uploads.call(commit_files, self.repo_id, job.folder, f"{CHECKPOINTS}/{job.name}/",
                                         f"Checkpoint {job.name} (step {job.step})")
        self._tag(job)

    def _tag(self, job: _Job) -> None:
        """Tag `job.oid` with the step folder name; a tag of an earlier run for this step is moved."""
        try:
            self._api.create_tag(self.repo_id, tag=job.name, revision=job.oid, tag_message=f"step {job.step}")
        except HfHubHTTPError as err:
            if http_status(err) != 409:
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


def _label(job: _Job) -> str:
    return f"the final model (step {job.step})" if job.is_final else f"checkpoint {job.name}"


def _stop_uploads(abandon: threading.Event, uploads: UploadProcess) -> None:
    abandon.set()  # what the thread was uploading is not a failure to report
    uploads.kill()
