"""The Hugging Face Hub: repo creation, background checkpoint pushes, finding and downloading.

Layout of a run's model repo (everything goes through `huggingface_hub`):

    checkpoints/<step folder>/pretrained_model/…   one commit per saved checkpoint, the same files
    checkpoints/<step folder>/training_state/…     as the local folder (see robotrain.checkpoint_layout)
    config.json model.safetensors train_config.json policy_*processor*   the final model (root)
    README.md                                                           its model card

Tags: each checkpoint commit is tagged with its step folder name (`000010`), created only after
that commit succeeded and pointing at it, so a tag never names a partial upload. A tag left by an
earlier run for the same step is moved to the new commit.

    errors.py   huggingface_hub's errors as one-line UserErrors; upload failures, retryable or not
    push.py     ensure_repo, and CheckpointPusher: the background thread, its retries, tags and report
    upload.py   the upload child process that makes the pusher's commits, away from training
    card.py     the final model's README.md
    fetch.py    revisions, resolving and downloading checkpoints and pretrained models

Nothing here imports torch, Hydra or robotrain.config: the upload child imports this package.
"""

from robotrain.checkpoint_layout import CHECKPOINTS
from robotrain.hub.card import model_card
from robotrain.hub.errors import hub_errors
from robotrain.hub.fetch import (
    SAFE_SUFFIXES,
    HubCheckpoint,
    download_checkpoint,
    download_pretrained,
    resolve_checkpoint,
)
from robotrain.hub.push import FINAL, CheckpointPusher, ensure_repo
from robotrain.repo_id import check_repo_id

__all__ = [
    "CHECKPOINTS", "FINAL", "SAFE_SUFFIXES", "CheckpointPusher", "HubCheckpoint", "check_repo_id",
    "download_checkpoint", "download_pretrained", "ensure_repo", "hub_errors", "model_card", "resolve_checkpoint",
]
