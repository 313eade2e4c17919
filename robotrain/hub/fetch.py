"""Finding and downloading checkpoints and pretrained models on the Hub.

Revisions (`resume=hub:user/repo@<rev>`, `policy.pretrained_revision=<rev>`):
    all digits (`10`, `000010`)   a step: the checkpoint folder whose number equals it, looked up
                                  at the commit of the tag of that step (any zero-padding), else
                                  on main; if no such step exists the string is tried as a ref
    a tag, branch or commit sha   the latest checkpoint at that revision (root files for pretrained)
    none                          main
The latest checkpoint at a revision is the largest all-digit folder under `checkpoints/`,
compared as numbers, so a longer zero-padding after a resume with more steps still sorts right.

Downloads fetch only safetensors and JSON files (never pickles), and of a checkpoint only its own
folder at its commit, never the repo's whole history. Bad input (malformed repo id, missing repo,
revision or step, a repo without checkpoints, a refused token) raises a one-line `UserError`.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder

from robotrain.checkpoint_layout import CHECKPOINTS, PRETRAINED, is_complete
from robotrain.errors import UserError
from robotrain.hub.errors import hub_errors
from robotrain.repo_id import check_repo_id

log = logging.getLogger("robotrain")

SAFE_SUFFIXES = (".safetensors", ".json")
"""The only files ever downloaded (no pickle is ever fetched, let alone loaded), and so the root files
a final model's commit replaces (robotrain.hub.upload)."""


class HubCheckpoint(NamedTuple):
    """A checkpoint on the Hub: its step folder under `checkpoints/` and the commit to read it at."""

    name: str
    """Step folder name, e.g. "000010"."""
    sha: str
    """Commit holding that folder."""

    @property
    def step(self) -> int:
        return int(self.name)


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
