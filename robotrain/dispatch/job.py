"""What a dispatched job is, for every backend: the run to submit (`Point`, and the command
line its job runs), the handle a backend returns (`Handle`) and how the job ended (`Outcome`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence


@dataclass
class Point:
    """One run to submit: its task overrides and the run dir it owns."""

    overrides: list[str]
    run_dir: Path | None
    """Absolute run dir (shared filesystem, SLURM); None lets the job pick its own (HF Jobs)."""
    index: int = 0
    name: str = "robotrain"

    def argv(self) -> list[str]:
        """The job's command line after `python -m robotrain`: a local run in its run dir that
        resumes from there (`resume.spec=auto`) unless the user named a checkpoint."""
        kept = [o for o in self.overrides if not _sets(o, "job.target") and not _sets(o, "hydra.run.dir")]
        args = [*kept, "job.target=local"]
        if self.run_dir is not None:
            args.append(f"hydra.run.dir={self.run_dir}")
        if not any(_sets(o, "resume.spec") for o in kept):
            args.append("resume.spec=auto")
        return args


def with_resume_auto(argv: Sequence[str]) -> list[str]:
    """A job's command line (`Point.argv`) for its requeue: continue from its own last checkpoint,
    not from the one the user named to start from."""
    return [o for o in argv if not _sets(o, "resume.spec")] + ["resume.spec=auto"]


def _sets(override: str, key: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == key


@dataclass
class Outcome:
    """How a job ended: `ok`, and the run's result (`result.json`) or the error."""

    ok: bool
    value: Any = None
    error: BaseException | None = None

    @property
    def return_value(self) -> Any:
        """What the run returned (its result.json's "return_value"); None if it left none."""
        return (self.value or {}).get("return_value")


class Handle(Protocol):
    job_id: str
    point: Point

    def follow(self) -> Iterator[str]:
        """Log lines as the job writes them, until it ends."""

    def wait(self) -> Outcome:
        """Block until the job ends."""

    def cancel(self) -> None:
        ...

    def hints(self) -> str:
        """One line telling a person how to follow and cancel the job by hand."""
