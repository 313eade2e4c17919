"""The final model's card: the README.md pushed to a run's repo root with the final model, saying
what was trained on what for how long, its final metrics, how to load it and how to resume the run."""

from __future__ import annotations


def model_card(
    repo_id: str,
    *,
    policy_type: str,
    dataset_repo_id: str | list[str],
    steps: int,
    metrics: dict[str, float] | None = None,
    adapter: bool = False,
) -> str:
    """README.md for the repo root: what was trained on what for how long, its final metrics, how
    to load it and how to resume the run. `dataset_repo_id`: the dataset, or a mixture's members.
    `adapter`: the root holds PEFT adapter files."""
    datasets = [dataset_repo_id] if isinstance(dataset_repo_id, str) else list(dataset_repo_id)
    dataset_list = "\n".join(f"- {d}" for d in datasets)
    named = ", ".join(f"`{d}`" for d in datasets)
    on_what = f"the LeRobot dataset {named}" if len(datasets) == 1 else f"a mixture of the LeRobot datasets {named}"
    rows = "\n".join(f"| {key} | {_fmt(value)} |" for key, value in sorted((metrics or {}).items()))
    table = f"| metric | value |\n|---|---|\n{rows}" if rows else "No metrics were recorded."
    weights = "PEFT adapter files (adapter_config.json, adapter_model.safetensors)" if adapter else "model.safetensors"
    return f"""---
library_name: robotrain
pipeline_tag: robotics
tags:
- robotics
- lerobot
- robotrain
- {policy_type}
datasets:
{dataset_list}
---

# {policy_type} policy for {named}

This `{policy_type}` policy was trained with robotrain for {steps} steps on {on_what}. The repo root holds the final model in LeRobot's pretrained_model layout
(config.json, {weights}, train_config.json and the normalization processor files).

## Final metrics (step {steps})

{table}

## Use it

```python
from robotrain import pretrained

policy = pretrained.load("{repo_id}")
policy.reset()
action = policy.select_action(observation)  # observation: dict of batched tensors
```

`pretrained.load("{repo_id}", revision="10")` loads the checkpoint of step 10 instead (a step, tag,
branch or commit sha).

## Resume or extend training

```bash
python -m robotrain resume=hub:{repo_id}            # from the latest checkpoint
python -m robotrain resume=hub:{repo_id}@10         # from step 10 (or @<tag|branch|commit sha>)
python -m robotrain resume=hub:{repo_id} steps=<more than {steps}>
```

Every checkpoint is in `checkpoints/<step>/` (pretrained_model/ and training_state/, as on disk)
and tagged with its step.
"""


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
