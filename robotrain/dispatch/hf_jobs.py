"""Hugging Face Jobs through `huggingface_hub`: one job per run.

The job runs `python -m robotrain <overrides> job.target=local` in `job.image`. Secrets are
sent by name from this shell's environment (HF_TOKEN also from `hf auth login`) and never
printed; the job has no shared filesystem, so runs that should outlive it push to the Hub
(`hub.repo_id=… hub.push_checkpoints=true`).
"""

from __future__ import annotations

import os
import re
import time
from typing import Iterator, Sequence

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from robotrain.config import HfJob
from robotrain.dispatch.job import Outcome, Point
from robotrain.errors import UserError

_FINAL_STAGES = ("COMPLETED", "ERROR", "CANCELED", "DELETED")
_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


class HFJobHandle:
    """One submitted HF Job."""

    def __init__(self, api: HfApi, job_id: str, point: Point, namespace: str | None):
        self.api, self.job_id, self.point, self.namespace = api, job_id, point, namespace

    def follow(self) -> Iterator[str]:
        yield from self.api.fetch_job_logs(job_id=self.job_id, namespace=self.namespace, follow=True)

    def wait(self, poll_s: float = 2.0) -> Outcome:
        while True:
            status = self.api.inspect_job(job_id=self.job_id, namespace=self.namespace).status
            stage = getattr(status.stage, "value", str(status.stage))  # a JobStage, or a plain str
            if stage in _FINAL_STAGES:
                if stage == "COMPLETED":
                    return Outcome(ok=True, value={"job_id": self.job_id, "stage": stage})
                return Outcome(ok=False, error=RuntimeError(f"HF job {self.job_id} ended {stage}: {status.message}"))
            time.sleep(poll_s)

    def cancel(self) -> None:
        self.api.cancel_job(job_id=self.job_id, namespace=self.namespace)

    def hints(self) -> str:
        return f"follow: hf jobs logs {self.job_id} · status: hf jobs inspect {self.job_id} · cancel: hf jobs cancel {self.job_id}"


def submit(points: Sequence[Point], job: HfJob) -> list[HFJobHandle]:
    api = HfApi()
    secrets = secret_values(job.secrets)
    env = {"PYTHONUNBUFFERED": "1", **job.env}  # logs arrive line by line, not in blocks
    labels = {"robotrain": "1", **tag_labels(job.tags)}
    handles = []
    for point in points:
        try:
            info = api.run_job(
                image=job.image, command=["python", "-m", "robotrain", *point.argv()], env=env, secrets=secrets,
                flavor=job.flavor, timeout=job.timeout, labels=labels, name=_label(point.name),
                namespace=job.namespace,
            )
        except HfHubHTTPError as err:
            raise UserError(f"HF Jobs refused the job ({_reason(err)}); check job.image, job.flavor and your token") \
                from None
        handles.append(HFJobHandle(api, info.id, point, job.namespace))
    return handles


def secret_values(names: Sequence[str]) -> dict[str, str]:
    """Values of the named secrets from this environment; HF_TOKEN may come from `hf auth login`."""
    values = {}
    for name in names:
        value = os.environ.get(name) or (get_token() if name == "HF_TOKEN" else None)
        if not value:
            raise UserError(f"job.secrets names {name}, which is not set in this shell; export it first")
        values[name] = value
    return values


def tag_labels(tags: Sequence[str]) -> dict[str, str]:
    """`job.tags` as HF Jobs labels: `key=value` or `key` (value "true")."""
    labels = {}
    for tag in tags:
        key, _, value = tag.partition("=")
        value = value or "true"
        if not (_LABEL.match(key) and _LABEL.match(value)):
            raise UserError(f"job.tags entry {tag!r}: HF Jobs labels are key or key=value of letters, digits, - and _")
        labels[key] = value
    return labels


def _label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name).strip("-_")[:100] or "robotrain"


def _reason(err: HfHubHTTPError) -> str:
    status = err.response.status_code if err.response is not None else "?"
    return f"HTTP {status}: {' '.join(str(err).split())[:200]}"
