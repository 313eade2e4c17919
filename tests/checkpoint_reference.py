"""Runs whose checkpoints are kept in tests/data/checkpoint_reference/, written by the code
before the checkpoint manager (commit 31ebf37), so that tests/test_checkpoint_manager.py can
check that an unchanged run still writes the same files.

    python -m tests.checkpoint_reference tests/data/checkpoint_reference   # (re)write them

Two runs, 4 steps each (checkpoints at 2 and 4): the MLP on one process with a trackio tracker
(tracker.json), and a LoRA adapter on that MLP under FSDP on two processes (adapter files,
sharded state, two RNG files). Tiny, so that the reference stays small in the repository. Paths inside the files
(run dirs, the base model's folder) are written as `<ROOT>` so that the folders compare from
anywhere.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from tests.conftest import TINY, make_cli

COMMON = [*TINY, "steps=4", "checkpoint.every=2", "log_every=2"]
RUNS: dict[str, tuple[int, list[str]]] = {
    "mlp": (1, ["policy=mlp", "policy.hidden_dim=32",
                "tracker=trackio", "tracker.project=reference", "tracker.run_name=reference"]),
    "mlp-lora-fsdp": (2, ["policy=mlp", "policy.hidden_dim=32", "peft=lora", "peft.r=4",
                          "policy.pretrained_path=<ROOT>/mlp/checkpoints/000004/pretrained_model",
                          "distributed.strategy=fsdp", "batch_size=4"]),
}
#: Text files whose bytes hold the folder the runs were made in.
ROOTED = ("train_config.json", "adapter_config.json", "config.json", "tracker.json")


def make(root: Path, cache: Path) -> None:
    """Every run of RUNS under `root/<name>`, in order (the LoRA run adapts the MLP's)."""
    root.mkdir(parents=True, exist_ok=True)
    cli = make_cli(cache, root)
    cli.env["TRACKIO_DIR"] = str(root / "trackio")
    for name, (processes, args) in RUNS.items():
        args = [a.replace("<ROOT>", str(root)) for a in args]
        done = cli.run(*COMMON, *args, f"distributed.processes={processes}", f"hydra.run.dir={root / name}",
                       timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"reference run {name} failed:\n{done.stderr[-3000:]}")


def checkpoint_files(root: Path) -> dict[str, Path]:
    """`<run>/<step>/<file>` -> path, for every file of every run's step folders."""
    return {f"{run}/{path.relative_to(root / run / 'checkpoints')}": path
            for run in RUNS for path in sorted((root / run / "checkpoints").glob("[0-9]*/**/*")) if path.is_file()}


def unrooted(path: Path, root: Path) -> bytes:
    """The file's bytes, with `root` written as <ROOT> in the files that name it."""
    data = path.read_bytes()
    return data.replace(str(root).encode(), b"<ROOT>") if path.name in ROOTED else data


def write(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        make(root, Path(tmp) / "cache")
        if dest.exists():
            shutil.rmtree(dest)
        for rel, path in checkpoint_files(root).items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(unrooted(path, root))


if __name__ == "__main__":
    write(Path(sys.argv[1]))
