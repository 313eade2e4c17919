"""Hub datasets on local disk: LeRobot's cache folder, and a download that happens once."""

from __future__ import annotations

import os
from pathlib import Path

from robotrain.errors import UserError


def lerobot_home() -> Path:
    """Where Hub datasets are kept: LeRobot's `$HF_LEROBOT_HOME`, else `$HF_HOME/lerobot`."""
    if os.environ.get("HF_LEROBOT_HOME"):
        return Path(os.environ["HF_LEROBOT_HOME"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "lerobot"


def download(repo_id: str, revision: str | None) -> Path:
    """A Hub dataset in LeRobot's cache layout (`<lerobot home>/<repo_id>`), fetched once: a
    folder that already holds the dataset is used as it is, without asking the Hub."""
    from huggingface_hub import snapshot_download

    from robotrain.hub import hub_errors

    from huggingface_hub import constants

    root = lerobot_home() / repo_id
    if (root / "meta" / "info.json").is_file():
        return root
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"dataset {repo_id} is not in {root} and HF_HUB_OFFLINE=1 forbids downloading it: "
                        "unset HF_HUB_OFFLINE, or pass dataset.root=<local copy>")
    with hub_errors(repo_id, revision):
        snapshot_download(repo_id, repo_type="dataset", revision=revision, local_dir=root,
                          allow_patterns=["meta/**", "data/**", "videos/**", "README.md"])
    if not (root / "meta" / "info.json").is_file():
        raise UserError(f"the Hub dataset {repo_id} has no meta/info.json: it is not a LeRobot dataset")
    return root
