"""Where a pretrained policy comes from, made local: `policy.pretrained_path` names a local
pretrained_model/ folder, a checkpoint, a run dir (its latest checkpoint) or a Hub repo id
(downloaded at `revision`: a step, tag, branch or sha). An adapter folder's base, named in its
adapter_config.json, is made local the same way. `robotrain.policies` then builds and loads
from those local folders only; every download is here."""

from __future__ import annotations

from pathlib import Path


def local_folders(path: str, revision: str | None = None) -> list[Path]:
    """The pretrained_model/ folder `path` names, then, while the last is an adapter folder, its base's."""
    from robotrain import policies

    return policies.adapter_chain(_local(path, revision), _local)


def load(path: str, revision: str | None = None):
    """The policy `path` names (see `local_folders`), downloaded if it is on the Hub, for inference."""
    from robotrain import policies

    folders = local_folders(path, revision)
    return policies.from_pretrained(folders[0], bases=folders[1:])


def _local(path: str, revision: str | None) -> Path:
    from robotrain import hub, policies

    folder = policies.local_pretrained_folder(path)
    return folder if folder is not None else hub.download_pretrained(path, revision)
