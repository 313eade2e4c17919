"""One-line errors for the command line, including Hydra's own.

Hydra reports composition errors (an unknown group option, a malformed override, a value
of the wrong type) as several lines on stderr and exits with status 1, before any
robotrain code runs. `one_line_errors()` holds stderr back until composition is done; if
Hydra fails first, it prints the gist as one `robotrain: error: …` line and exits with 2,
like every other bad input. Once `composition_done()` is called, stderr flows untouched.

It also expands the `resume=<spec>` shorthand to `resume.spec=<spec>`, so that
`resume.allow_changes=true` can sit beside it.
"""

from __future__ import annotations

import io
import re
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

EXIT_USAGE = 2
_held: io.StringIO | None = None
_real_stderr = None
_NOISE = ("full_key:", "object_type=", "reference_type=", "Set the environment variable HYDRA_FULL_ERROR",
          "Config search path", "provider=", "See https://hydra.cc")


def fail(message: str) -> NoReturn:
    """Print `robotrain: error: <message>` as one line and exit with status 2."""
    composition_done()
    print(f"robotrain: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def expand_shorthands(argv: list[str]) -> list[str]:
    return [argv[0]] + [re.sub(r"^resume=", "resume.spec=", arg) for arg in argv[1:]]


def composition_done() -> None:
    """Release held stderr: from here on, output is the run's own."""
    global _held
    if _held is not None:
        sys.stderr = _real_stderr
        sys.stderr.write(_held.getvalue())
        sys.stderr.flush()
        _held = None


@contextmanager
def one_line_errors() -> Iterator[None]:
    global _held, _real_stderr
    _real_stderr, _held = sys.stderr, io.StringIO()
    sys.stderr = _held
    try:
        yield
    except SystemExit as exit_:
        if _held is not None and exit_.code not in (0, None):
            text = _held.getvalue()
            _held = None
            sys.stderr = _real_stderr
            fail(condense(text) or "invalid command line; see python -m robotrain --help")
        raise
    finally:
        composition_done()


def condense(text: str) -> str:
    """The gist of a Hydra composition error, or of a `UserError` Hydra caught, on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # A UserError raised inside Hydra (by the sweep launcher) reaches here as Hydra's printed traceback.
    raised = re.findall(r"^robotrain\.errors\.UserError: (.+)$", text, re.M)
    if raised:
        return raised[-1]
    usage = re.search(r"^\S+: error: (.+)$", text, re.M)  # argparse, before Hydra sees anything
    if text.startswith("usage:") and usage:
        return f"{usage.group(1)} (flags such as -m go before the overrides; see --help)"
    if "Available options in" in text:
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options in"))
        options = [line for line in lines[start + 1:] if not line.startswith(_NOISE) and ":" not in line
                   and not line.endswith("_schema")]  # the schemas options start from, not options
        missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
        if missing:
            group, option = missing.groups()
            return f"no option {option!r} in config group {group!r}; choose one of: {', '.join(options)}"
    if re.search(r"""no viable alternative at input '\{\s*["']""", text):  # Hydra's grammar has no quoted keys
        return ("a dict in an override takes its keys without quotes: write "
                "'dataset.rename_map={observation.images.wrist: observation.images.cam1}'")
    match = re.search(r"Could not override '([^']+)'", text)
    if match and "reference_type=Dict" in text:  # a new key inside a dict field (e.g. job.env)
        key = match.group(1)
        return f"{key} is a dict: add new keys one at a time with +{key}.<name>=<value>"
    misplaced = re.search(r"Key '([^']+)' not in '([^']+)'", text)
    if match and misplaced and match.group(1).startswith("job."):  # another target's setting
        from robotrain.config import misplaced_job_field

        hint = misplaced_job_field(*misplaced.groups())
        if hint:
            return hint
    if match and re.search(r"Key '[^']+' (is )?not in", text):
        return f"unknown config key {match.group(1)!r}; check its spelling (python -m robotrain --cfg job lists every key)"
    useful = [line.removeprefix("In 'config': ") for line in lines if not line.startswith(_NOISE)]
    return ": ".join(useful[:2])
