"""Local emulator of the Hugging Face Hub HTTP API, for tests (stdlib only).

Run it:     python tests/hub_emulator.py --port 0 --root DIR   (prints its URL, e.g. http://127.0.0.1:PORT)
Import it:  HubEmulator(root).start() serves from a background thread; HubAdmin(url) injects faults
            and reads the request log.
The real client is pointed at it with HF_ENDPOINT=<url>; huggingface_hub reads that variable once, at import.

Endpoints emulated (the ones huggingface_hub 2.4 calls), {type} being models|datasets|spaces|kernels:
  POST   /api/repos/create                       create_repo: 409 with {"url"} when it exists; visibility/private stored
  DELETE /api/repos/delete                       delete_repo
  PUT    /api/{type}/{id}/settings               update_repo_settings (visibility/private, gated)
  GET    /api/{type}/{id}[/revision/{rev}]       repo_info, model_info, repo_exists, revision_exists: private, sha,
                                                 siblings (?blobs=true adds size and blobId), lastModified...
  GET    /api/{type}/{id}/tree/{rev}[/{path}]    list_repo_tree, list_repo_files (?recursive=, ?expand= adds lastCommit)
  POST   /api/{type}/{id}/paths-info/{rev}       get_paths_info (the client uses it for CommitOperationCopy)
  GET    /api/{type}/{id}/refs                   list_repo_refs (branches and tags)
  GET    /api/{type}/{id}/commits/{rev}          list_repo_commits (first-parent history, newest first)
  POST   /api/{type}/{id}/preupload/{rev}        always uploadMode "regular", plus the remote blob oid so that the
                                                 client skips files that did not change (as with the real Hub)
  POST   /api/{type}/{id}/commit/{rev}           NDJSON commit: header (summary, description, parentCommit -> 412 on
                                                 mismatch), file (base64 inline), deletedFile, deletedFolder
  POST   /api/{type}/{id}/tag/{rev}              create_tag (409 if it exists);  DELETE .../tag/{tag}: delete_tag
  POST   /api/{type}/{id}/branch/{name}          create_branch (startingPoint);  DELETE: delete_branch
  HEAD   /[{type}/]{id}/resolve/{rev}/{path}     get_hf_file_metadata, file_exists, hf_hub_download: X-Repo-Commit,
  GET    (same)                                  ETag (git blob sha1), Content-Length, Accept-Ranges; GET serves the
                                                 bytes and honours one "Range: bytes=a-b"
  GET    /api/whoami-v2, POST /api/validate-yaml, GET /api/agent-harnesses: minimal answers
Jobs (run_job, list_jobs, inspect_job, fetch_job_logs, cancel_job, wait_for_job), {ns} any namespace:
  POST   /api/jobs/{ns}                          run_job: validates the spec (flavor, labels, names), answers the
                                                 JobInfo with stage SCHEDULING, then runs the command locally
  GET    /api/jobs/{ns}                          list_jobs, newest first; ?stage=S (repeatable), ?label=k=v (all)
  GET    /api/jobs/{ns}/{id}                     inspect_job: JobInfo JSON, secrets by name only (value null)
  GET    /api/jobs/{ns}/{id}/logs                fetch_job_logs: SSE "data: {"timestamp", "data"}" events, the
                                                 first one "===== Job started at ... =====" (the client skips it);
                                                 replays the output then follows it, and ends when the job has
                                                 ended, its stage already final; ?tail=N starts N lines back
  POST   /api/jobs/{ns}/{id}/cancel              cancel_job: SIGTERM, SIGKILL after the grace; no-op once final
A job is a local process (see Jobs): SCHEDULING -> RUNNING -> COMPLETED (exit 0) | ERROR (exit != 0, killed by a
signal, command not found, or timeoutSeconds reached: message "Job timed out after Ns") | CANCELED. A final stage
is set only once the process has exited and its output is all read. Secret values live in memory until the process
starts, then only in its environment: never in the request log, on disk, in JobInfo or in admin answers.
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), X-Error-Message and a JSON
{"error": ...} body, so the client raises its typed errors.

Admin endpoints (never logged): GET /_emulator/health; GET|POST|DELETE /_emulator/faults (list|add|clear rules);
POST /_emulator/release (free stalled requests); POST /_emulator/reset (faults, stalls and log; {"data": true} also
deletes every repo and job, killing running ones); GET /_emulator/log?since=SEQ; GET /_emulator/state (requests
stalled right now); GET /_emulator/jobs (submitted specs, secret names only, stage, exit code); GET
/_emulator/jobs/{id} (the same plus every output line); POST /_emulator/jobs/stop (SIGKILL every running job).
A fault rule matches requests by kind (create_repo, delete_repo, settings, repo_info, tree, paths_info, refs,
commits, preupload, commit, tag, branch, resolve, whoami, validate_yaml, job_run, job_list, job_info, job_logs,
job_cancel, other or "*"), optional method, repo and path regex; it fires on the n_th matching request and on
`times` requests from there (None: all). Actions: fail (status, optional error_code), stall (seconds, or until
released), disconnect (close without answering), truncate (GET bodies, job log streams too: send only `bytes`
bytes then close). phase "before" acts before the request is processed; "after" processes it first, e.g. a
commit that lands although the client sees a 503.

Storage under --root: blobs/<oid[:2]>/<oid> (content-addressed by git blob sha1) and
repos/<type>s/<ns>/<name>/{repo.json, commits/<sha>.json}; repos survive a restart on the same root, jobs do not
(they live in memory; jobs/<id>/ is each job's working folder, jobs/.bin the `python` shims). Commit and
folder ids are real git object ids computed from the file list. A new repo gets an "initial commit" holding a
.gitattributes file, as on the Hub, so list_repo_files is never empty.

Auth: any "Authorization: Bearer <token>" is the single user (--user, default "user"). Without a token, writes
get 401 and private repos look missing (401 + RepoNotFound). With --token T only T is valid; another token gets
401 "Invalid credentials in Authorization header", like the Hub for a bad token.

Not emulated: LFS and Xet (preupload never answers "lfs"; an lfsFile commit line is a 400), pull requests
(create_pr -> 400) and refs/pr/*, .gitignore-driven shouldIgnore, token scopes and fine-grained permissions,
organisations and membership, gated-access requests, pagination (one page holds everything), rate limits, the Hub's
size limits on regular files, Spaces runtime, discussions, collections, listing/search (list_models...), repo moves,
super-squash, file copies across repos. For jobs: docker images (only recorded), volumes, expose, ssh, network
groups and retries (all a 400), scheduled jobs, rerun, label updates, metrics, hardware listing, queueing (SCHEDULING
lasts until the runner thread starts the process), PID-1 signal semantics (the SIGTERM reaches the command even if
it installs no handler), resource limits.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
DEFAULT_BRANCH = "main"
MAX_STALL_S = 600.0  # an un-released stall still ends, so a crashed test cannot wedge the server forever
CHUNK = 64 * 1024
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
SHA_PREFIX_RE = re.compile(r"[0-9a-f]{7,40}")

# Shortened copy of the .gitattributes the Hub puts in every new repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


# --------------------------------------------------------------------------------------------- git ids


def git_blob_oid(data: bytes) -> str:
    """Git blob id: what the Hub uses as ETag and oid of a regular (non-LFS) file."""
    return _git_object(b"blob", data)


def _git_object(kind: bytes, body: bytes) -> str:
    return hashlib.sha1(kind + b" %d\0" % len(body) + body).hexdigest()


def tree_oids(files: dict[str, list]) -> dict[str, str]:
    """Git tree id of every folder of a flat {path: [oid, size]} listing; the root is ''."""
    folders = {""}
    for path in files:
        parts = path.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    entries: dict[str, list[tuple[str, str, str]]] = {f: [] for f in folders}
    for path, (oid, _size) in files.items():
        parent, _, name = path.rpartition("/")
        entries[parent].append((name, "100644", oid))
    oids: dict[str, str] = {}
    # Deepest folders first, so a parent is hashed after all of its children.
    for folder in sorted(folders, key=lambda f: f.count("/") if f else -1, reverse=True):
        # git orders a sub-tree as if its name ended with "/"
        ordered = sorted(entries[folder], key=lambda e: (e[0] + ("/" if e[1] == "40000" else "")).encode())
        body = b"".join(f"{mode} {name}".encode() + b"\0" + bytes.fromhex(oid) for name, mode, oid in ordered)
        oids[folder] = _git_object(b"tree", body)
        if folder:
            parent, _, name = folder.rpartition("/")
            entries[parent].append((name, "40000", oids[folder]))
    return oids


def commit_oid(tree: str, parents: list[str], author: str, ts: float, title: str, message: str) -> str:
    ident = f"{author} <{author}@users.noreply.huggingface.co> {int(ts)} +0000"
    lines = [f"tree {tree}", *(f"parent {p}" for p in parents), f"author {ident}", f"committer {ident}", ""]
    lines.append(title + (f"\n\n{message}" if message else ""))
    return _git_object(b"commit", ("\n".join(lines) + "\n").encode())


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


# --------------------------------------------------------------------------------------------- errors


class HubError(Exception):
    """An HTTP error answer, shaped like the Hub's so hf_raise_for_status picks the right exception."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def repo_not_found(repo_id: str, status: int = 404) -> HubError:
    return HubError(status, f"Repository not found: {repo_id}", "RepoNotFound")


def revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def entry_not_found(path: str, commit: str) -> HubError:
    # X-Repo-Commit lets the client cache the file's absence (.no_exist), as with the Hub.
    return HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit})


def clean_path(path: str) -> str:
    path = path.lstrip("/")
    parts = path.rstrip("/").split("/")
    if not path or any(p in ("", ".", "..", ".git") for p in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


# --------------------------------------------------------------------------------------------- storage


@dataclass
class Repo:
    rtype: str
    repo_id: str
    private: bool
    created_at: float
    folder: Path
    gated: Any = False
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict] = field(default_factory=dict)

    def resolve(self, rev: str | None) -> str:
        """Commit sha of a branch, tag (optionally as refs/heads/x, refs/tags/x) or (short) commit sha."""
        rev = rev or DEFAULT_BRANCH
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix) and rev[len(prefix) :] in refs:
                return refs[rev[len(prefix) :]]
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if SHA_PREFIX_RE.fullmatch(rev):
            hits = [sha for sha in self.commits if sha.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        raise revision_not_found(rev)

    def history(self, sha: str) -> list[dict]:
        out = []
        while sha:
            commit = self.commits[sha]
            out.append(commit)
            sha = commit["parents"][0] if commit["parents"] else ""
        return out


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: a reader or a crash never sees half a file


class Store:
    """Repos, commits and refs on disk; one lock serialises every change."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._trees: dict[str, dict[str, str]] = {}
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        for meta_path in sorted((self.root / "repos").glob("*/*/*/repo.json")):
            meta = json.loads(meta_path.read_text())
            repo = Repo(meta["type"], meta["id"], meta["private"], meta["createdAt"], meta_path.parent,
                        meta.get("gated", False), meta["branches"], meta["tags"])
            for commit_path in (meta_path.parent / "commits").glob("*.json"):
                commit = json.loads(commit_path.read_text())
                repo.commits[commit["id"]] = commit
            self.repos[(repo.rtype, repo.repo_id)] = repo

    def _save(self, repo: Repo) -> None:
        meta = {"type": repo.rtype, "id": repo.repo_id, "private": repo.private, "gated": repo.gated,
                "createdAt": repo.created_at, "branches": repo.branches, "tags": repo.tags}
        _write_json(repo.folder / "repo.json", meta)

    def blob_path(self, oid: str) -> Path:
        return self.root / "blobs" / oid[:2] / oid

    def put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = self.blob_path(oid)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{oid}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return oid

    def tree_oids(self, commit: dict) -> dict[str, str]:
        if commit["id"] not in self._trees:
            self._trees[commit["id"]] = tree_oids(commit["files"])
        return self._trees[commit["id"]]

    def get(self, rtype: str, repo_id: str) -> Repo:
        with self.lock:
            repo = self.repos.get((rtype, repo_id))
        if repo is None:
            raise repo_not_found(repo_id)
        return repo

    def create_repo(self, rtype: str, repo_id: str, private: bool) -> tuple[Repo, bool]:
        with self.lock:
            if (rtype, repo_id) in self.repos:
                return self.repos[(rtype, repo_id)], False
            folder = self.root / "repos" / f"{rtype}s" / repo_id
            if folder.exists():  # left over by a repo deleted while a reader still held it
                shutil.rmtree(folder)
            repo = Repo(rtype, repo_id, private, time.time(), folder)
            data = DEFAULT_GITATTRIBUTES.encode()
            files = {".gitattributes": [self.put_blob(data), len(data)]}
            initial = self._new_commit(repo, [], files, "initial commit", "", "system")
            repo.branches[DEFAULT_BRANCH] = initial["id"]
            self._save(repo)
            self.repos[(rtype, repo_id)] = repo
            return repo, True

    def delete_repo(self, rtype: str, repo_id: str) -> None:
        with self.lock:
            repo = self.repos.pop((rtype, repo_id), None)
            if repo is None:
                raise repo_not_found(repo_id)
            shutil.rmtree(repo.folder, ignore_errors=True)

    def wipe(self) -> None:
        with self.lock:
            for rtype, repo_id in list(self.repos):
                self.delete_repo(rtype, repo_id)

    def _new_commit(self, repo: Repo, parents: list[str], files: dict, title: str, message: str,
                    author: str) -> dict:
        ts = time.time()
        sha = commit_oid(tree_oids(files)[""], parents, author, ts, title, message)
        commit = {"id": sha, "parents": parents, "files": files, "title": title, "message": message,
                  "date": iso(ts), "authors": [author]}
        _write_json(repo.folder / "commits" / f"{sha}.json", commit)
        repo.commits[sha] = commit
        return commit

    def commit(self, repo: Repo, branch: str, header: dict, ops: list, author: str) -> dict:
        """Apply pre-parsed operations on top of `branch`; blobs are already stored."""
        with self.lock:
            branch = branch.removeprefix("refs/heads/")
            if branch not in repo.branches:
                raise revision_not_found(branch)
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent.lower()):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = apply_operations(repo.commits[head]["files"], ops)
            commit = self._new_commit(repo, [head], files, header["summary"], header.get("description") or "",
                                      author)
            repo.branches[branch] = commit["id"]
            self._save(repo)
            return commit

    def set_ref(self, repo: Repo, kind: str, name: str, sha: str | None) -> None:
        """Create (sha given) or delete (sha None) a branch or tag."""
        with self.lock:
            refs = repo.branches if kind == "branch" else repo.tags
            if sha is None:
                if name not in refs:
                    raise revision_not_found(name)
                del refs[name]
            elif name in refs:
                raise HubError(409, f"{kind.capitalize()} '{name}' already exists")
            else:
                refs[name] = sha
            self._save(repo)


def apply_operations(files: dict[str, list], ops: list[tuple[str, str, Any]]) -> dict[str, list]:
    files = dict(files)
    for op, path, entry in ops:
        if op == "add":
            files[path] = entry
        elif op == "delete":
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        else:  # delete_folder
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
    folders = {p[:i] for p in files for i, char in enumerate(p) if char == "/"}
    if clash := sorted(set(files) & folders):  # git cannot hold "a" as a file and "a/b" at once
        raise HubError(400, f"A path is both a file and a folder: {clash[0]}")
    return files


def parse_commit_payload(body: bytes) -> tuple[dict, list[tuple[str, str, Any]]]:
    """Split the client's NDJSON commit into its header and (op, path, payload) tuples."""
    header, ops = None, []
    for line in body.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        key, value = item.get("key"), item.get("value") or {}
        if key == "header":
            header = value
        elif key == "file":
            content = value.get("content", "")
            data = base64.b64decode(content) if value.get("encoding", "base64") == "base64" else content.encode()
            ops.append(("add", clean_path(value["path"]), data))
        elif key in ("deletedFile", "deletedFolder"):
            ops.append(("delete" if key == "deletedFile" else "delete_folder", clean_path(value["path"]), None))
        elif key == "lfsFile":
            raise HubError(400, "LFS is not emulated: preupload always answers uploadMode 'regular'")
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")
    if not header or not header.get("summary"):
        raise HubError(400, "A commit needs a header with a summary")
    return header, ops


# --------------------------------------------------------------------------------------------- jobs

TERMINAL_STAGES = ("COMPLETED", "CANCELED", "ERROR", "DELETED")  # the JobStage values the client treats as final
KILL_GRACE_S = 10.0  # SIGTERM -> SIGKILL delay on cancel and timeout, as with `docker stop`
SSE_KEEPALIVE_S = 30.0  # the Jobs API sends ": keep-alive" every 30 s on a silent log stream
JOB_LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,100}")  # the rule update_job_labels documents for keys and values
ENV_NAME_RE = re.compile(r"[^=\0]+")
# JobHardware of huggingface_hub 2.4: a typo in a flavor must fail here as it would on the Hub.
JOB_FLAVORS = frozenset({
    "cpu-basic", "cpu-upgrade", "cpu-performance", "cpu-xl", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1",
    "l40sx4", "l40sx8", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4",
    "a100x8", "h200", "h200x2", "h200x4", "h200x8", "rtx-pro-6000", "rtx-pro-6000x2", "rtx-pro-6000x4",
    "rtx-pro-6000x8",
})
UNSUPPORTED_JOB_FIELDS = ("volumes", "expose", "ssh", "network")  # a 400, so a test cannot rely on them silently
# Variables of the emulator's own environment that a job must not inherit: a real job starts in a clean
# container, so the developer's token, cache and endpoint settings have no business there.
HOST_ONLY_ENV_PREFIXES = ("HF_", "HUGGINGFACE_")


@dataclass
class Job:
    id: str
    namespace: str
    spec: dict  # what was submitted, secret values excepted (see parse_job_spec)
    secret_names: list[str]
    created_at: float
    workdir: Path
    secrets: dict[str, str] = field(default_factory=dict, repr=False)  # values: in memory until the start only
    stage: str = "SCHEDULING"
    message: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    reaped: bool = False  # once True, the pid (and process group id) may belong to someone else: never signal it
    ending: tuple[str, str] | None = None  # (stage, message) set by cancel or timeout, applied when it exits
    lines: list[tuple[float, str]] = field(default_factory=list, repr=False)
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def done(self) -> bool:
        return self.stage in TERMINAL_STAGES


def parse_job_spec(data: dict) -> tuple[dict, dict[str, str]]:
    """Check the client's job spec (see _create_job_spec in huggingface_hub); return (spec, secret values).

    Error messages name secrets but never quote their values."""
    command, arguments = data.get("command"), data.get("arguments") or []
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command + arguments):
        raise HubError(400, "A job needs a non-empty command: a list of strings")
    if not (data.get("dockerImage") or data.get("spaceId")):
        raise HubError(400, "A job needs a dockerImage or a spaceId")
    if unsupported := [key for key in UNSUPPORTED_JOB_FIELDS if data.get(key)]:
        raise HubError(400, f"Not emulated for jobs: {', '.join(unsupported)}")
    if (data.get("attempts") or 1) > 1:
        raise HubError(400, "Job retries (attempts > 1) are not emulated")
    flavor = data.get("flavor") or "cpu-basic"
    if flavor not in JOB_FLAVORS:
        raise HubError(400, f"Invalid flavor: {flavor!r}")
    labels = data.get("labels") or {}
    if bad := [k for k, v in labels.items() if not JOB_LABEL_RE.fullmatch(k) or not JOB_LABEL_RE.fullmatch(str(v))]:
        raise HubError(400, f"Invalid labels {bad}: keys and values need 1-100 alphanumerics, '-' or '_'")
    env = {k: "" if v is None else str(v) for k, v in (data.get("environment") or {}).items()}
    secrets = data.get("secrets") or {}
    if bad := [k for k in [*env, *secrets] if not ENV_NAME_RE.fullmatch(k)]:
        raise HubError(400, f"Invalid variable names: {bad}")
    if unset := sorted(k for k, v in secrets.items() if v is None):
        raise HubError(400, f"Secrets without a value: {unset}")
    timeout = data.get("timeoutSeconds")
    if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
        raise HubError(400, "timeoutSeconds must be a positive integer")
    spec = {"image": data.get("dockerImage"), "space_id": data.get("spaceId"), "command": command,
            "arguments": arguments, "env": env, "flavor": flavor, "timeout": timeout, "labels": dict(labels),
            "attempts": data.get("attempts"), "resource_group_id": data.get("resourceGroupId")}
    return spec, {k: str(v) for k, v in secrets.items()}


def sse_event(ts: float, line: str) -> bytes:
    return b"data: " + json.dumps({"timestamp": iso(ts), "data": line}).encode() + b"\n\n"


class Jobs:
    """Jobs run as local processes, one runner thread each; their output is kept in memory, line by line.

    The docker image is only recorded. The command runs in a fresh folder (root/jobs/<id>), in its own process
    group, with the emulator's environment minus HF_* / HUGGINGFACE_* variables, plus HF_ENDPOINT (the
    emulator, so the job's client talks to it like a real job talks to the Hub), HF_HOME in that folder,
    HF_HUB_DISABLE_XET=1, then the job's environment and secrets. PATH starts with a folder holding `python` and
    `python3` scripts that exec sys.executable, then sys.executable's own folder: `python -m robotrain` in a
    job runs the emulator's interpreter with its packages (a symlink would lose a venv's site-packages).
    """

    def __init__(self, root: Path, user: str, kill_grace: float = KILL_GRACE_S):
        self.root, self.user, self.kill_grace = root / "jobs", user, kill_grace
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.bin = self._python_shims()

    def _python_shims(self) -> Path:
        folder = self.root / ".bin"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("python", "python3"):
            (folder / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
            (folder / name).chmod(0o755)
        return folder

    def child_env(self, job: Job, endpoint: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY_ENV_PREFIXES)}
        path = [str(self.bin), os.path.dirname(sys.executable), env.get("PATH", os.defpath)]
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1,localhost"]))
        env.update({"PATH": os.pathsep.join(path), "NO_PROXY": no_proxy, "no_proxy": no_proxy,
                    "HF_ENDPOINT": endpoint, "HF_HOME": str(job.workdir / ".cache" / "huggingface"),
                    "HF_HUB_DISABLE_XET": "1"})
        return {**env, **job.spec["env"], **job.secrets}

    # ---- lifecycle

    def submit(self, namespace: str, data: dict, endpoint: str) -> dict:
        """Create the job and start it; returns its JobInfo JSON as first created (stage SCHEDULING)."""
        spec, secrets = parse_job_spec(data)
        job_id = uuid.uuid4().hex[:24]  # 24 hex digits, like the Hub's ids
        workdir = self.root / job_id
        workdir.mkdir(parents=True)
        job = Job(job_id, namespace, spec, sorted(secrets), time.time(), workdir, secrets)
        with self.lock:
            self.jobs[job_id] = job
        info = self.info(job)
        threading.Thread(target=self._run, args=(job, self.child_env(job, endpoint)), name=f"job-{job_id}",
                         daemon=True).start()
        return info

    def _run(self, job: Job, env: dict[str, str]) -> None:
        argv = job.spec["command"] + job.spec["arguments"]
        with job.cond:
            job.secrets.clear()  # the child's env is the only place secret values go from here
            if job.ending:  # canceled while scheduling
                self._finish(job)
                return
            try:
                job.process = subprocess.Popen(argv, cwd=job.workdir, env=env, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               start_new_session=True)  # its own group: cancel reaches its children
            except OSError as err:
                job.lines.append((time.time(), f"exec {argv[0]}: {err.strerror}"))
                self._finish(job, ("ERROR", f"Failed to start the command {argv[0]!r}: {err.strerror}"))
                return
            finally:
                env.clear()
            job.stage, job.started_at = "RUNNING", time.time()
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.started_at))
            job.lines.append((job.started_at, f"===== Job started at {started} ====="))  # the client skips it
            job.cond.notify_all()
        self._supervise(job)

    def _supervise(self, job: Job) -> None:
        reader = threading.Thread(target=self._read, args=(job,), name=f"job-{job.id}-logs", daemon=True)
        reader.start()
        timer = None
        if job.spec["timeout"]:
            message = f"Job timed out after {job.spec['timeout']}s"
            timer = threading.Timer(job.spec["timeout"], self.terminate, (job, "ERROR", message))
            timer.daemon = True
            timer.start()
        # Wait without reaping, so that the process group id cannot be reused while we still signal it.
        os.waitid(os.P_PID, job.process.pid, os.WEXITED | os.WNOWAIT)
        if timer is not None:
            timer.cancel()
        with job.cond:
            self._kill_group(job)  # like a container, the job ends with its first process: no stragglers
            job.exit_code = job.process.wait()
            job.reaped = True
        reader.join()  # every line is in before the stage turns final: a log follower misses nothing
        with job.cond:
            self._finish(job)

    def _read(self, job: Job) -> None:
        with job.process.stdout as stream:
            for raw in iter(stream.readline, b""):
                with job.cond:
                    job.lines.append((time.time(), raw.decode("utf-8", "replace").rstrip("\r\n")))
                    job.cond.notify_all()

    def _finish(self, job: Job, failure: tuple[str, str] | None = None) -> None:
        """Set the final stage (caller holds job.cond): cancel/timeout first, then the exit code decides."""
        code = job.exit_code
        if failure or job.ending:
            job.stage, job.message = failure or job.ending
        elif code == 0:
            job.stage, job.message = "COMPLETED", None
        elif code is not None and code < 0:
            job.stage, job.message = "ERROR", f"Job was killed by signal {signal.Signals(-code).name}"
        else:
            job.stage, job.message = "ERROR", f"Job failed with exit code {code}"
        job.finished_at = time.time()
        job.cond.notify_all()

    def terminate(self, job: Job, stage: str, message: str) -> None:
        """Stop a job as `docker stop` does: SIGTERM to its first process, SIGKILL to the group after the grace.

        The stage turns `stage` only once the process has exited, so a final stage means the process is gone."""
        with job.cond:
            if job.done or job.ending:
                return
            job.ending = (stage, message)
            if job.process is None or job.reaped:  # still scheduling: the runner never starts it
                return
            os.kill(job.process.pid, signal.SIGTERM)
        timer = threading.Timer(self.kill_grace, self._kill_group_now, (job,))
        timer.daemon = True
        timer.start()

    def _kill_group_now(self, job: Job) -> None:
        with job.cond:
            self._kill_group(job)

    def _kill_group(self, job: Job) -> None:
        if job.process is not None and not job.reaped:
            try:
                os.killpg(job.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop_all(self, message: str) -> int:
        """SIGKILL every running job at once (shutdown, reset, admin); returns how many were running."""
        with self.lock:
            jobs = list(self.jobs.values())
        count = 0
        for job in jobs:
            with job.cond:
                if not job.done:
                    count += 1
                    job.ending = job.ending or ("CANCELED", message)
                    self._kill_group(job)
        return count

    def forget(self) -> None:
        self.stop_all("Deleted by an emulator reset")
        with self.lock:
            self.jobs.clear()

    # ---- views

    def get(self, namespace: str, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None or job.namespace != namespace:
            raise HubError(404, f"Job {namespace}/{job_id} not found")
        return job

    def select(self, namespace: str | None = None) -> list[Job]:
        """Newest first, as `hf jobs ps` shows them."""
        with self.lock:
            jobs = [j for j in self.jobs.values() if namespace is None or j.namespace == namespace]
        return sorted(jobs, key=lambda j: j.created_at, reverse=True)

    def info(self, job: Job) -> dict:
        """The JobInfo JSON: secrets by name only (a real job's secrets are never sent back either)."""
        with job.cond:
            spec, end = job.spec, job.finished_at or time.time()
            mine = job.namespace == self.user  # whoami's id for the user; any other namespace is an org
            owner = {"id": "0" * 24 if mine else hashlib.sha1(job.namespace.encode()).hexdigest()[:24],
                     "name": job.namespace, "type": "user" if mine else "org"}
            info = {
                "id": job.id, "createdAt": iso(job.created_at), "command": list(spec["command"]),
                "arguments": list(spec["arguments"]), "environment": dict(spec["env"]),
                "secrets": dict.fromkeys(job.secret_names), "flavor": spec["flavor"], "labels": dict(spec["labels"]),
                "timeout": spec["timeout"], "status": {"stage": job.stage, "message": job.message},
                "owner": owner, "initiator": {"type": owner["type"], "id": owner["id"], "name": owner["name"]},
                "durations": {"schedulingSecs": int(job.started_at - job.created_at) if job.started_at else None,
                              "runningSecs": int(end - job.started_at) if job.started_at else None,
                              "totalSecs": int(end - job.created_at)},
            }
            info.update({"dockerImage": spec["image"]} if spec["image"] else {"spaceId": spec["space_id"]})
            if job.started_at:
                info["startedAt"] = iso(job.started_at)
            if job.finished_at:
                info["finishedAt"] = iso(job.finished_at)
            if spec["attempts"] is not None:
                info["retry"] = spec["attempts"] - 1
        return info

    def admin_view(self, job: Job, logs: bool = False) -> dict:
        """What was submitted (secret names only), how it went, and with `logs` every output line."""
        with job.cond:
            view = {"id": job.id, "namespace": job.namespace, **job.spec, "env": dict(job.spec["env"]),
                    "secrets": list(job.secret_names), "stage": job.stage, "message": job.message,
                    "exit_code": job.exit_code, "pid": job.process.pid if job.process else None,
                    "workdir": str(job.workdir), "created_at": iso(job.created_at),
                    "started_at": iso(job.started_at) if job.started_at else None,
                    "finished_at": iso(job.finished_at) if job.finished_at else None}
            if logs:
                view["logs"] = [{"timestamp": iso(ts), "data": line} for ts, line in job.lines]
        return view

    def log_events(self, job: Job, tail: int | None) -> Iterator[bytes]:
        """SSE events of the job's output ("data: {timestamp, data}"): the history, then each new line as it
        comes, until the job ends; then the stream ends (the stage is already final by then)."""
        with job.cond:
            index = max(len(job.lines) - tail, 0) if tail is not None else 0
        while True:
            with job.cond:
                job.cond.wait_for(lambda: len(job.lines) > index or job.done, timeout=SSE_KEEPALIVE_S)
                batch, done = job.lines[index:], job.done
            index += len(batch)
            if batch:
                yield b"".join(sse_event(ts, line) for ts, line in batch)
            elif not done:
                yield b": keep-alive\n\n"
            if done:
                return


# --------------------------------------------------------------------------------------------- faults & log


@dataclass
class FaultRule:
    action: str  # fail | stall | disconnect | truncate
    kind: str = "commit"
    method: str | None = None
    repo: str | None = None
    path_regex: str | None = None
    n_th: int = 1
    times: int | None = 1
    status: int = 503
    error_code: str | None = None
    message: str = "Injected fault (hub emulator)"
    seconds: float | None = None
    phase: str = "before"
    bytes: int = 0
    id: int = 0
    seen: int = 0
    fired: int = 0

    def matches(self, req: Req) -> bool:
        return (
            self.kind in ("*", req.kind)
            and (self.method is None or self.method.upper() == req.method)
            and (self.repo is None or self.repo == req.repo_id)
            and (self.path_regex is None or re.search(self.path_regex, req.path) is not None)
        )


class Faults:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rules: list[FaultRule] = []
        self.stalled: dict[int, dict] = {}
        self._generation = 0
        self._ids = 0

    def add(self, spec: dict) -> FaultRule:
        known = {f.name for f in fields(FaultRule)} - {"id", "seen", "fired"}
        if unknown := set(spec) - known:
            raise HubError(400, f"Unknown fault fields: {sorted(unknown)}")
        if spec.get("action") not in ("fail", "stall", "disconnect", "truncate"):
            raise HubError(400, "Fault action must be one of fail, stall, disconnect, truncate")
        with self.cond:
            self._ids += 1
            rule = FaultRule(**spec, id=self._ids)
            self.rules.append(rule)
            return rule

    def pick(self, req: Req) -> FaultRule | None:
        """Count the request against every matching rule; return the first one due to fire."""
        chosen = None
        with self.cond:
            for rule in self.rules:
                if not rule.matches(req):
                    continue
                rule.seen += 1
                due = rule.seen >= rule.n_th and (rule.times is None or rule.fired < rule.times)
                if chosen is None and due:
                    rule.fired += 1
                    chosen = rule
        return chosen

    def stall(self, rule: FaultRule, req: Req) -> None:
        with self.cond:
            generation = self._generation
            self.stalled[id(req)] = {"rule": rule.id, "kind": req.kind, "method": req.method, "path": req.path,
                                     "repo": req.repo_id, "since": time.time()}
            try:
                self.cond.wait_for(lambda: self._generation != generation,
                                   timeout=rule.seconds if rule.seconds is not None else MAX_STALL_S)
            finally:
                del self.stalled[id(req)]

    def release(self) -> int:
        with self.cond:
            count = len(self.stalled)
            self._generation += 1
            self.cond.notify_all()
            return count

    def reset(self) -> None:
        with self.cond:
            self.rules.clear()
        self.release()


class RequestLog:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[dict] = []
        self.seq = 0

    def add(self, entry: dict) -> None:
        with self.lock:
            self.seq += 1
            self.entries.append({"seq": self.seq, **entry})

    def since(self, seq: int) -> list[dict]:
        with self.lock:
            return [e for e in self.entries if e["seq"] > seq]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


# --------------------------------------------------------------------------------------------- HTTP app


@dataclass
class Req:
    method: str
    path: str
    segs: list[str]
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    base_url: str
    kind: str = "other"
    rtype: str | None = None
    repo_id: str | None = None
    rest: list[str] = field(default_factory=list)
    revision: str | None = None
    file: str | None = None
    namespace: str | None = None
    job_id: str | None = None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from None

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true", "yes")

    @property
    def token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None


@dataclass
class Resp:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None
    start: int = 0
    length: int | None = None
    stream: Iterator[bytes] | None = None  # an open-ended body, sent with chunked encoding (job logs)

    @property
    def size(self) -> int:
        return len(self.body) if self.length is None else self.length


DROP = Resp(status=0)  # sentinel: close the connection without answering


def json_resp(data: Any, status: int = 200) -> Resp:
    return Resp(status, {"Content-Type": "application/json"}, json.dumps(data).encode())


def error_resp(status: int, message: str, code: str | None = None, headers: dict | None = None) -> Resp:
    resp = json_resp({"error": message}, status)
    resp.headers["X-Error-Message"] = message.encode("ascii", "replace").decode()
    if code:
        resp.headers["X-Error-Code"] = code
    resp.headers.update(headers or {})
    return resp


# (method, first path segment after the repo id) -> (kind, handler name)
API_ROUTES = {
    ("GET", ""): ("repo_info", "h_repo_info"),
    ("GET", "revision"): ("repo_info", "h_repo_info"),
    ("GET", "tree"): ("tree", "h_tree"),
    ("POST", "paths-info"): ("paths_info", "h_paths_info"),
    ("GET", "refs"): ("refs", "h_refs"),
    ("GET", "commits"): ("commits", "h_commits"),
    ("POST", "preupload"): ("preupload", "h_preupload"),
    ("POST", "commit"): ("commit", "h_commit"),
    ("POST", "tag"): ("tag", "h_create_tag"),
    ("DELETE", "tag"): ("tag", "h_delete_ref"),
    ("POST", "branch"): ("branch", "h_create_branch"),
    ("DELETE", "branch"): ("branch", "h_delete_ref"),
    ("PUT", "settings"): ("settings", "h_settings"),
}
GLOBAL_ROUTES = {
    ("POST", "repos/create"): ("create_repo", "h_create_repo"),
    ("DELETE", "repos/delete"): ("delete_repo", "h_delete_repo"),
    ("GET", "whoami-v2"): ("whoami", "h_whoami"),
    ("POST", "validate-yaml"): ("validate_yaml", "h_validate_yaml"),
    ("GET", "agent-harnesses"): ("other", "h_agent_harnesses"),
}
# (method, path after /api/jobs/{namespace}) -> (kind, handler name)
JOB_ROUTES = {
    ("POST", ""): ("job_run", "h_job_run"),
    ("GET", ""): ("job_list", "h_job_list"),
    ("GET", "{id}"): ("job_info", "h_job_info"),
    ("GET", "{id}/logs"): ("job_logs", "h_job_logs"),
    ("POST", "{id}/cancel"): ("job_cancel", "h_job_cancel"),
}


class HubApp:
    """Routing, auth and the Hub endpoints; transport-level details live in _Handler."""

    def __init__(self, store: Store, *, token: str | None = None, user: str = "user", verbose: bool = False,
                 job_kill_grace: float = KILL_GRACE_S):
        self.store, self.token, self.user, self.verbose = store, token, user, verbose
        self.faults = Faults()
        self.log = RequestLog()
        self.jobs = Jobs(store.root, user, job_kill_grace)

    # ---- routing and auth

    def route(self, req: Req) -> Callable[[Req], Resp] | None:
        s = req.segs
        if s[:2] == ["api", "jobs"] and 3 <= len(s) <= 5:
            req.namespace, req.job_id = s[2], s[3] if len(s) > 3 else None
            if hit := JOB_ROUTES.get((req.method, "/".join(["{id}", *s[4:]]) if len(s) > 3 else "")):
                req.kind = hit[0]
                return getattr(self, hit[1])
            return None
        if s[:1] == ["api"]:
            if hit := GLOBAL_ROUTES.get((req.method, "/".join(s[1:3]))):
                req.kind = hit[0]
                if req.kind in ("create_repo", "delete_repo"):
                    req.rtype, req.repo_id = self._repo_from_body(req)
                return getattr(self, hit[1])
            if len(s) >= 4 and s[1] in API_TYPES:
                req.rtype, req.repo_id, req.rest = API_TYPES[s[1]], f"{s[2]}/{s[3]}", s[5:]
                if hit := API_ROUTES.get((req.method, s[4] if len(s) > 4 else "")):
                    req.kind = hit[0]
                    req.revision = req.rest[0] if req.kind == "tree" and req.rest else "/".join(req.rest) or None
                    return getattr(self, hit[1])
            return None
        offset = 1 if s and s[0] in API_TYPES and s[0] != "models" else 0
        if len(s) >= offset + 5 and s[offset + 2] == "resolve" and req.method in ("GET", "HEAD"):
            req.rtype = API_TYPES[s[0]] if offset else "model"
            req.repo_id, req.rest = f"{s[offset]}/{s[offset + 1]}", s[offset + 3 :]
            req.kind, req.revision, req.file = "resolve", req.rest[0], "/".join(req.rest[1:])
            return self.h_resolve
        return None

    def _repo_from_body(self, req: Req) -> tuple[str, str | None]:
        try:
            data = req.json()
        except HubError:
            return "model", None  # the handler reports the bad body
        name = data.get("name")
        return data.get("type") or "model", f"{data.get('organization') or self.user}/{name}" if name else None

    def call(self, handler: Callable[[Req], Resp] | None, req: Req) -> Resp:
        try:
            if handler is None:
                raise HubError(404, f"Not emulated: {req.method} {req.path}")
            if req.token is not None and self.token is not None and req.token != self.token:
                raise HubError(401, "Invalid credentials in Authorization header")
            return handler(req)
        except HubError as err:
            return error_resp(err.status, err.message, err.code, err.headers)
        except Exception as err:  # a bug in the emulator must show up as a 500, not a hung client
            traceback.print_exc()
            return error_resp(500, f"Hub emulator internal error: {err!r}")

    def _write_repo(self, req: Req) -> Repo:
        if req.token is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        return self.store.get(req.rtype, req.repo_id)

    def _read_repo(self, req: Req) -> Repo:
        repo = self.store.get(req.rtype, req.repo_id)
        if repo.private and req.token is None:
            raise repo_not_found(req.repo_id, status=401)
        return repo

    def _url(self, req: Req, rtype: str, repo_id: str) -> str:
        return f"{req.base_url}/{URL_PREFIX[rtype]}{repo_id}"

    # ---- repos

    def h_create_repo(self, req: Req) -> Resp:
        data = req.json()
        if req.token is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if req.rtype not in URL_PREFIX or not REPO_ID_RE.fullmatch(req.repo_id or ""):
            raise HubError(400, f"Invalid repo type or name: {req.rtype} {req.repo_id}")
        private = data["visibility"] == "private" if "visibility" in data else bool(data.get("private"))
        _repo, created = self.store.create_repo(req.rtype, req.repo_id, private)
        url = self._url(req, req.rtype, req.repo_id)
        if not created:  # the client reads "url" from this 409 body when exist_ok=True
            return json_resp({"error": f"You already created this {req.rtype} repo", "url": url}, 409)
        return json_resp({"url": url, "name": req.repo_id, "id": req.repo_id})

    def h_delete_repo(self, req: Req) -> Resp:
        self._write_repo(req)
        self.store.delete_repo(req.rtype, req.repo_id)
        return json_resp({})

    def h_settings(self, req: Req) -> Resp:
        repo, data = self._write_repo(req), req.json()
        with self.store.lock:
            if "visibility" in data or "private" in data:
                repo.private = data.get("visibility") == "private" if "visibility" in data else bool(data["private"])
            if "gated" in data:
                repo.gated = data["gated"]
            self.store._save(repo)
        return json_resp({})

    def h_repo_info(self, req: Req) -> Resp:
        repo = self._read_repo(req)
        with self.store.lock:
            commit = repo.commits[repo.resolve(req.revision if req.rest else None)]
            private, gated = repo.private, repo.gated
        files = commit["files"]
        blobs = req.flag("blobs")
        siblings = [{"rfilename": p, **({"size": size, "blobId": oid} if blobs else {})}
                    for p, (oid, size) in sorted(files.items())]
        return json_resp({
            "_id": hashlib.sha1(f"{req.rtype}/{req.repo_id}".encode()).hexdigest()[:24], "id": req.repo_id,
            "author": req.repo_id.split("/")[0], "sha": commit["id"], "private": private, "gated": gated,
            "disabled": False, "lastModified": commit["date"], "createdAt": iso(repo.created_at), "downloads": 0,
            "likes": 0, "tags": [], "siblings": siblings, "usedStorage": sum(s for _o, s in files.values()),
        })

    def h_whoami(self, req: Req) -> Resp:
        if req.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return json_resp({"type": "user", "id": "0" * 24, "name": self.user, "fullname": self.user,
                          "email": f"{self.user}@example.invalid", "orgs": [], "isPro": False,
                          "auth": {"type": "access_token",
                                   "accessToken": {"displayName": "emulator", "role": "write"}}})

    def h_validate_yaml(self, req: Req) -> Resp:
        return json_resp({"errors": [], "warnings": []})

    def h_agent_harnesses(self, req: Req) -> Resp:
        return json_resp({"standardEnvVars": [], "harnesses": {}})

    # ---- trees and history

    def _snapshot(self, req: Req, rev: str | None) -> tuple[Repo, dict]:
        repo = self._read_repo(req)
        with self.store.lock:
            return repo, repo.commits[repo.resolve(rev)]

    def _entry(self, repo: Repo, commit: dict, path: str, expand: bool) -> dict:
        trees = self.store.tree_oids(commit)
        if path in commit["files"]:
            oid, size = commit["files"][path]
            entry = {"type": "file", "oid": oid, "size": size, "path": path}
        else:
            entry = {"type": "directory", "oid": trees[path], "size": 0, "path": path}
        if expand:
            last = self._last_commit(repo, commit, path, entry["type"] == "directory")
            entry["lastCommit"] = {"id": last["id"], "title": last["title"], "date": last["date"]}
        return entry

    def _last_commit(self, repo: Repo, commit: dict, path: str, is_dir: bool) -> dict:
        def oid(c: dict) -> str | None:
            return self.store.tree_oids(c).get(path) if is_dir else (c["files"].get(path) or [None])[0]

        target = oid(commit)
        while commit["parents"] and oid(repo.commits[commit["parents"][0]]) == target:
            commit = repo.commits[commit["parents"][0]]
        return commit

    def h_tree(self, req: Req) -> Resp:
        repo, commit = self._snapshot(req, req.revision)
        prefix = "/".join(req.rest[1:]).strip("/")
        trees = self.store.tree_oids(commit)
        if prefix and prefix not in trees:
            raise entry_not_found(prefix, commit["id"])
        base = prefix + "/" if prefix else ""
        recursive = req.flag("recursive")
        paths = [p for p in [*sorted(t for t in trees if t), *sorted(commit["files"])]
                 if p.startswith(base) and (recursive or "/" not in p[len(base) :])]
        return json_resp([self._entry(repo, commit, p, req.flag("expand")) for p in paths])

    def h_paths_info(self, req: Req) -> Resp:
        if "json" in (req.headers.get("Content-Type") or ""):
            data = req.json()
            paths, expand = data.get("paths", []), bool(data.get("expand"))
        else:
            form = parse_qs(req.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[-1].lower() == "true"
        repo, commit = self._snapshot(req, req.revision)
        trees = self.store.tree_oids(commit)
        wanted = [p.strip("/") for p in paths if p.strip("/") in commit["files"] or p.strip("/") in trees]
        return json_resp([self._entry(repo, commit, p, expand) for p in wanted if p])

    def h_refs(self, req: Req) -> Resp:
        repo = self._read_repo(req)
        with self.store.lock:
            branches, tags = dict(repo.branches), dict(repo.tags)

        def refs(kind: str, items: dict) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(items.items())]

        return json_resp({"branches": refs("heads", branches), "tags": refs("tags", tags), "converts": [],
                          "pullRequests": []})

    def h_commits(self, req: Req) -> Resp:
        repo, commit = self._snapshot(req, req.revision)
        return json_resp([
            {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
             "authors": [{"user": a, "avatar": None} for a in c["authors"]]}
            for c in repo.history(commit["id"])
        ])

    # ---- writes

    def h_preupload(self, req: Req) -> Resp:
        repo = self._write_repo(req)
        with self.store.lock:
            files = repo.commits[repo.resolve(req.revision)]["files"]
        wanted = req.json().get("files", [])
        return json_resp({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": (files.get(f["path"]) or [None])[0]}
            for f in wanted
        ]})

    def h_commit(self, req: Req) -> Resp:
        repo = self._write_repo(req)
        if req.flag("create_pr"):
            raise HubError(400, "Pull requests (create_pr) are not emulated")
        header, raw_ops = parse_commit_payload(req.body)
        # Blobs are content-addressed, so storing them before taking the lock is safe even if the commit fails.
        ops = [(op, path, [self.store.put_blob(data), len(data)] if op == "add" else None)
               for op, path, data in raw_ops]
        commit = self.store.commit(repo, req.revision or DEFAULT_BRANCH, header, ops, self.user)
        url = f"{self._url(req, req.rtype, req.repo_id)}/commit/{commit['id']}"
        return json_resp({"success": True, "commitOid": commit["id"], "commitUrl": url,
                          "commitMessage": commit["title"], "hookOutput": "", "pullRequestUrl": None})

    def h_create_tag(self, req: Req) -> Resp:
        repo, data = self._write_repo(req), req.json()
        if not data.get("tag"):
            raise HubError(400, "A tag name is required")
        with self.store.lock:
            self.store.set_ref(repo, "tag", data["tag"], repo.resolve(req.revision))
        return json_resp({"name": data["tag"]})

    def h_create_branch(self, req: Req) -> Resp:
        repo, data = self._write_repo(req), req.json()
        name = req.revision or ""
        if not name or name.startswith("refs/"):
            raise HubError(400, f"Invalid branch name: {name!r}")
        with self.store.lock:
            self.store.set_ref(repo, "branch", name, repo.resolve(data.get("startingPoint")))
        return json_resp({})

    def h_delete_ref(self, req: Req) -> Resp:
        repo = self._write_repo(req)
        if req.kind == "branch" and req.revision == DEFAULT_BRANCH:
            raise HubError(403, "Cannot delete the default branch")
        self.store.set_ref(repo, req.kind, req.revision or "", None)
        return json_resp({})

    # ---- downloads

    def h_resolve(self, req: Req) -> Resp:
        _repo, commit = self._snapshot(req, req.revision)
        entry = commit["files"].get(req.file)
        if entry is None:
            raise entry_not_found(req.file, commit["id"])
        oid, size = entry
        headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        resp = Resp(200, headers, file=self.store.blob_path(oid), start=0, length=size)
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", req.headers.get("Range") or "")
        if req.method == "GET" and match and size and any(match.groups()):
            first, last = match.groups()
            start = int(first) if first else max(size - int(last), 0)
            end = min(int(last), size - 1) if first and last else size - 1
            if start >= size or start > end:
                return error_resp(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            resp.status, resp.start, resp.length = 206, start, end - start + 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return resp

    # ---- jobs

    def _job(self, req: Req) -> Job:
        if req.token is None:
            raise HubError(401, "You must be authenticated to use Jobs")
        return self.jobs.get(req.namespace, req.job_id)

    def h_job_run(self, req: Req) -> Resp:
        if req.token is None:
            raise HubError(401, "You must be authenticated to run a job")
        # The request body holds secret values: it is parsed here and never logged or stored.
        return json_resp(self.jobs.submit(req.namespace, req.json(), req.base_url))

    def h_job_list(self, req: Req) -> Resp:
        if req.token is None:
            raise HubError(401, "You must be authenticated to list jobs")
        stages = set(req.query.get("stage", []))
        labels = [item.partition("=") for item in req.query.get("label", [])]
        jobs = [self.jobs.info(job) for job in self.jobs.select(req.namespace)]
        return json_resp([info for info in jobs if (not stages or info["status"]["stage"] in stages)
                          and all(info["labels"].get(key) == value for key, _, value in labels)])

    def h_job_info(self, req: Req) -> Resp:
        return json_resp(self.jobs.info(self._job(req)))

    def h_job_logs(self, req: Req) -> Resp:
        job = self._job(req)
        tail = req.query.get("tail", [None])[-1]
        events = self.jobs.log_events(job, int(tail) if tail not in (None, "") else None)
        return Resp(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}, stream=events)

    def h_job_cancel(self, req: Req) -> Resp:
        job = self._job(req)
        self.jobs.terminate(job, "CANCELED", "Job canceled by the user")  # a finished job stays as it is
        return json_resp(self.jobs.info(job))

    # ---- faults

    def before(self, rule: FaultRule | None, req: Req) -> Resp | None:
        if rule is None or rule.phase != "before":
            return None
        return self._act(rule, req, None)

    def after(self, rule: FaultRule | None, req: Req, resp: Resp) -> Resp:
        if rule is None or rule.phase != "after":
            return resp
        return self._act(rule, req, resp) or resp

    def _act(self, rule: FaultRule, req: Req, resp: Resp | None) -> Resp | None:
        if rule.action == "fail":
            return error_resp(rule.status, rule.message, rule.error_code)
        if rule.action == "stall":
            self.faults.stall(rule, req)
            return resp
        if rule.action == "disconnect":
            return DROP
        return resp  # truncate acts while the body is sent

    # ---- admin

    def admin(self, req: Req) -> Resp:
        try:
            return self._admin(req)
        except HubError as err:
            return error_resp(err.status, err.message, err.code)

    def _admin(self, req: Req) -> Resp:
        op = (req.method, "/".join(req.segs[1:]))
        if op == ("GET", "health"):
            return json_resp({"ok": True, "seq": self.log.seq})
        if op == ("GET", "faults"):
            return json_resp([asdict(r) for r in self.faults.rules])
        if op == ("POST", "faults"):
            return json_resp(asdict(self.faults.add(req.json())))
        if op == ("DELETE", "faults"):
            self.faults.reset()
            return json_resp({})
        if op == ("POST", "release"):
            return json_resp({"released": self.faults.release()})
        if op == ("POST", "reset"):
            self.faults.reset()
            self.log.clear()
            if req.json().get("data"):
                self.jobs.forget()
                self.store.wipe()
            return json_resp({})
        if op == ("GET", "log"):
            since = int(req.query.get("since", ["0"])[-1])
            return json_resp({"seq": self.log.seq, "entries": self.log.since(since)})
        if op == ("GET", "jobs"):
            return json_resp([self.jobs.admin_view(job) for job in self.jobs.select()])
        if op[0] == "GET" and len(req.segs) == 3 and req.segs[1] == "jobs":
            with self.jobs.lock:
                job = self.jobs.jobs.get(req.segs[2])
            if job is None:
                raise HubError(404, f"Job {req.segs[2]} not found")
            return json_resp(self.jobs.admin_view(job, logs=True))
        if op == ("POST", "jobs/stop"):
            return json_resp({"stopped": self.jobs.stop_all("Stopped by the emulator admin")})
        if op == ("GET", "state"):
            with self.faults.cond:
                stalled = list(self.faults.stalled.values())
            return json_resp({"seq": self.log.seq, "stalled": stalled})
        raise HubError(404, f"Unknown admin endpoint: {req.method} {req.path}")


# --------------------------------------------------------------------------------------------- transport


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    server_version = "HubEmulator/1.0"
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.verbose:
            sys.stderr.write(f"[hub-emulator] {self.address_string()} {format % args}\n")

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _parse(self) -> Req:
        url = urlsplit(self.path)
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        host = self.headers.get("Host") or "%s:%s" % self.server.server_address[:2]
        return Req(self.command, url.path, segs, parse_qs(url.query, keep_blank_values=True), self.headers,
                   self._read_body(), f"http://{host}")

    def _serve(self) -> None:
        app = self.server.app
        req = self._parse()
        if req.segs[:1] == ["_emulator"]:
            self._send(app.admin(req))
            return
        handler = app.route(req)
        rule = app.faults.pick(req)
        started, status, sent = time.time(), None, 0
        try:
            resp = app.before(rule, req) or app.call(handler, req)
            resp = app.after(rule, req, resp)
            if resp is DROP:
                self._drop()
                return
            status = resp.status
            sent = self._send(resp, rule.bytes if rule is not None and rule.action == "truncate" else None)
        finally:
            app.log.add({
                "method": req.method, "path": req.path, "query": {k: v[-1] for k, v in req.query.items()},
                "kind": req.kind, "repo": req.repo_id, "repo_type": req.rtype, "revision": req.revision,
                "file": req.file, "job": req.job_id, "status": status, "bytes_sent": sent,
                "bytes_received": len(req.body),
                "fault": None if rule is None else {"id": rule.id, "action": rule.action},
                "started": started, "duration": time.time() - started,
            })

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, resp: Resp, limit: int | None = None) -> int:
        """Send the answer; with `limit`, cut the body after that many bytes and drop the connection."""
        if resp.stream is not None:
            return self._send_stream(resp, limit)
        self.send_response(resp.status)
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(resp.size))
        self.end_headers()
        if self.command == "HEAD":
            return 0
        budget = resp.size if limit is None else min(limit, resp.size)
        sent = 0
        try:
            if resp.file is None:
                self.wfile.write(resp.body[:budget])
                sent = budget
            else:
                with open(resp.file, "rb") as fh:
                    fh.seek(resp.start)
                    while sent < budget and (chunk := fh.read(min(CHUNK, budget - sent))):
                        self.wfile.write(chunk)
                        sent += len(chunk)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        if sent < resp.size:
            self._drop()
        return sent


    def _send_stream(self, resp: Resp, limit: int | None) -> int:
        """Send an open-ended body chunk by chunk as it is produced (chunked encoding, keep-alive intact)."""
        self.send_response(resp.status)  # adds the Date header that a no-follow log reader stops at
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            for chunk in resp.stream:
                chunk = chunk if limit is None else chunk[: limit - sent]
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                if limit is not None and sent >= limit:
                    self._drop()
                    return sent
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            resp.stream.close()  # a client gone mid-stream ends the generator too
        return sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: HubApp


class HubEmulator:
    """The emulator in this process: HubEmulator(root).start() -> .url; .stop() when done."""

    def __init__(self, root: str | Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 user: str = "user", verbose: bool = False, job_kill_grace: float = KILL_GRACE_S):
        self.app = HubApp(Store(root), token=token, user=user, verbose=verbose, job_kill_grace=job_kill_grace)
        self.server = _Server((host, port), _Handler)
        self.server.app = self.app
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> HubEmulator:
        self._thread = threading.Thread(target=self.serve_forever, name="hub-emulator", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.1)  # how fast stop() is noticed

    def stop(self) -> None:
        self.app.jobs.stop_all("Hub emulator stopped")  # no job process outlives the emulator
        self.app.faults.reset()  # stalled handler threads must finish for server_close to return
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------- admin client


class HubAdmin:
    """Drives a running emulator over its admin endpoints: faults, stalls, request log."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        # The admin calls must never go through a proxy configured in the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.url}/_emulator/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with self._opener.open(request, timeout=self.timeout) as response:
            return json.loads(response.read() or b"null")

    def health(self) -> bool:
        try:
            return bool(self._call("GET", "health")["ok"])
        except OSError:
            return False

    # ---- faults

    def add_fault(self, action: str, kind: str = "commit", **rule: Any) -> dict:
        """Add a rule (see FaultRule for the fields); returns it, with its id."""
        return self._call("POST", "faults", {"action": action, "kind": kind, **rule})

    def fail(self, kind: str = "commit", *, status: int = 503, n_th: int = 1, times: int | None = 1,
             **rule: Any) -> dict:
        return self.add_fault("fail", kind, status=status, n_th=n_th, times=times, **rule)

    def fail_commits(self, n_th: int = 1, status: int = 503, times: int | None = 1, **rule: Any) -> dict:
        return self.fail("commit", status=status, n_th=n_th, times=times, method="POST", **rule)

    def stall(self, kind: str = "commit", *, seconds: float | None = None, n_th: int = 1,
              times: int | None = 1, **rule: Any) -> dict:
        """Hold matching requests for `seconds`, or until release() when None."""
        return self.add_fault("stall", kind, seconds=seconds, n_th=n_th, times=times, **rule)

    def stall_commits(self, seconds: float | None = None, n_th: int = 1, times: int | None = 1, **rule: Any) -> dict:
        return self.stall("commit", seconds=seconds, n_th=n_th, times=times, method="POST", **rule)

    def disconnect(self, kind: str = "commit", *, n_th: int = 1, times: int | None = 1, **rule: Any) -> dict:
        return self.add_fault("disconnect", kind, n_th=n_th, times=times, **rule)

    def truncate_downloads(self, after_bytes: int, *, n_th: int = 1, times: int | None = 1, **rule: Any) -> dict:
        return self.add_fault("truncate", "resolve", method="GET", bytes=after_bytes, n_th=n_th, times=times, **rule)

    def faults(self) -> list[dict]:
        return self._call("GET", "faults")

    def clear_faults(self) -> None:
        self._call("DELETE", "faults")

    def release(self) -> int:
        """Free every stalled request; returns how many were stalled."""
        return self._call("POST", "release", {})["released"]

    def reset(self, data: bool = False) -> None:
        """Clear faults and log and free stalls; data=True also deletes every repo."""
        self._call("POST", "reset", {"data": data})

    # ---- observation

    def mark(self) -> int:
        """Sequence number of the last logged request: pass it to log(since=...) to see only what follows."""
        return self._call("GET", "health")["seq"]

    def log(self, since: int = 0, **match: Any) -> list[dict]:
        """Completed requests after `since`, in completion order, keeping those whose fields equal `match`."""
        entries = self._call("GET", f"log?since={int(since)}")["entries"]
        return [e for e in entries if all(e.get(k) == v for k, v in match.items())]

    def downloads(self, since: int = 0, repo: str | None = None) -> list[dict]:
        """Successful GETs of file content (status 200/206): file, revision, bytes_sent..."""
        entries = self.log(since, kind="resolve", method="GET")
        return [e for e in entries if e["status"] in (200, 206) and (repo is None or e["repo"] == repo)]

    def state(self) -> dict:
        return self._call("GET", "state")

    # ---- jobs

    def jobs(self) -> list[dict]:
        """Every job, newest first: image, command, arguments, env, secrets (names), flavor, timeout (seconds),
        labels, stage, message, exit_code (negative: killed by that signal), pid, workdir, timestamps."""
        return self._call("GET", "jobs")

    def job(self, job_id: str) -> dict:
        """One job as in jobs(), plus "logs": every output line so far ({"timestamp", "data"})."""
        return self._call("GET", f"jobs/{job_id}")

    def job_lines(self, job_id: str) -> list[str]:
        """The job's output lines so far, without the "===== Job started" line (as fetch_job_logs yields them)."""
        return [e["data"] for e in self.job(job_id)["logs"] if not e["data"].startswith("===== Job started")]

    def wait_for_job(self, job_id: str, stages: tuple[str, ...] = TERMINAL_STAGES, timeout: float = 60.0) -> dict:
        """Poll until the job's stage is one of `stages` (by default any final one); returns job(job_id)."""
        return wait_until(lambda: (j := self.job(job_id))["stage"] in stages and j, timeout,
                          f"job {job_id} to reach {'/'.join(stages)}")

    def stop_jobs(self) -> int:
        """SIGKILL every running job now (they end CANCELED); returns how many were running."""
        return self._call("POST", "jobs/stop", {})["stopped"]

    def wait_for_stalled(self, count: int = 1, timeout: float = 30.0) -> list[dict]:
        """Poll until at least `count` requests are stalled; returns them."""
        stalled: list[dict] = []

        def enough() -> bool:
            nonlocal stalled
            stalled = self.state()["stalled"]
            return len(stalled) >= count

        wait_until(enough, timeout, f"{count} stalled request(s)")
        return stalled


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns a truthy value; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if value := predicate():
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"Timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling interval, not a synchronisation guess


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding repos and blobs (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", default=None, help="if set, the only token accepted")
    parser.add_argument("--user", default="user", help="name of the single user every valid token maps to")
    parser.add_argument("--verbose", action="store_true", help="log each request on stderr")
    parser.add_argument("--job-kill-grace", type=float, default=KILL_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL when a job is canceled or times out")
    args = parser.parse_args(argv)
    emulator = HubEmulator(args.root, host=args.host, port=args.port, token=args.token, user=args.user,
                           verbose=args.verbose, job_kill_grace=args.job_kill_grace)
    # SIGTERM ends serve_forever cleanly; shutdown() must run on another thread than serve_forever.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=emulator.stop, daemon=True).start())
    print(emulator.url, flush=True)
    try:
        emulator.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
