"""Hub repo ids (`user/name`): the one rule robotrain checks them by, for datasets, Hub repos
to push to and `resume=hub:` specs alike."""

from __future__ import annotations

import re

from robotrain.errors import UserError

#: One part of a Hub repo id, by huggingface_hub's rules: word characters, '-' and '.', at most
#: 96, starting and ending with a word character (and no '--' or '..', checked apart).
_REPO_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?", re.ASCII)


def is_repo_id(repo_id: str) -> bool:
    """True for a Hub repo id `user/name` (exactly one '/'), the only check robotrain makes of one."""
    parts = repo_id.split("/")
    return (len(parts) == 2 and all(_REPO_PART.fullmatch(part) for part in parts)
            and "--" not in repo_id and ".." not in repo_id)


def check_repo_id(repo_id: str, where: str = "repo id") -> None:
    """One-line UserError naming `where` unless `repo_id` is a Hub repo id."""
    if not is_repo_id(repo_id):
        raise UserError(f"{where} {repo_id!r} is not a Hub repo id: expected 'user/name' "
                        "(letters, digits, '-', '_', '.'; no '--' or '..')")
