"""`compile.enabled=true`: the policy's training forward through `torch.compile`.

The policy is compiled in place (`nn.Module.compile`), so its state dict keeps its plain keys
(no `_orig_mod.` prefix): checkpoints, resume and LeRobot loading are unchanged. Where the
backend cannot work (inductor without a C++ compiler on CPU, say) the run says so in one
warning line and trains without compiling. A policy's own `compile_model` switch compiles a
part of it; both at once are refused (`robotrain.config`).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("robotrain")

def apply(policy: torch.nn.Module, mode: str, device: torch.device) -> bool:
    """Compile `policy`'s forward in place if the backend works on `device`; returns whether it did."""
    problem = _backend_problem(mode, device)
    if problem is not None:
        log.warning("compile.enabled=true but torch.compile cannot run here (%s): training without compiling",
                    problem)
        return False
    policy.compile(mode=mode)
    log.info("torch.compile: the policy's forward is compiled (mode %s) on its first steps", mode)
    return True


def _backend_problem(mode: str, device: torch.device) -> str | None:
    """Why the compile backend fails on a one-line function, or None: it finds a missing
    compiler now rather than in the middle of the first training step."""
    try:
        probe = torch.compile(lambda x: x * 2 + 1, mode=mode)
        probe(torch.ones(2, device=device))
    except Exception as err:  # noqa: BLE001 - whatever the backend raises, the run goes on eagerly
        text = " ".join(str(err).split()) or type(err).__name__
        return f"{type(err).__name__}: {text[:200]}"
    finally:
        torch._dynamo.reset()  # the probe's graph must not count toward the policy's recompile limit
    return None
