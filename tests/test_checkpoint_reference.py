"""An unchanged run writes the checkpoints it wrote before the checkpoint manager existed.

tests/data/checkpoint_reference/ holds the step folders of `tests.checkpoint_reference.RUNS`,
written at commit 31ebf37 (before `robotrain.checkpoint.CheckpointManager`). The same runs
made now must write the same files: JSON byte for byte (train_config.json: the same values,
plus the options added since and minus other job targets' fields), safetensors with the same
header bytes and the same tensors. Two things vary from one run to the next on any code, so they
are compared by meaning: the order of PEFT's `target_modules` (a Python set: hash order) and
the headers of FSDP's DCP shards (their metadata); their tensors must still be equal.

Tensor values: bit-equal on the machine that wrote the reference; a CPU with other vector
units may round a matmul differently, hence `FLOAT_TOLERANCE` (1e-6, well below what a changed
computation moves in 4 steps at lr 1e-3).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint_reference import checkpoint_files, make, unrooted

REFERENCE = Path(__file__).parent / "data" / "checkpoint_reference"
FLOAT_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def remade(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("reference-again") / "runs"
    make(root, tmp_path_factory.mktemp("cache"))
    return {rel: unrooted(path, root) for rel, path in checkpoint_files(root).items()}


def reference_files() -> dict[str, Path]:
    return {str(p.relative_to(REFERENCE)): p for p in sorted(REFERENCE.rglob("*")) if p.is_file()}


def header(data: bytes) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    return data[8:8 + size]


def assert_same_tensors(name: str, ours: bytes, theirs: bytes) -> None:
    from safetensors.torch import load

    a, b = load(ours), load(theirs)
    assert a.keys() == b.keys(), name
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{name}: {key}"
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], rtol=0, atol=FLOAT_TOLERANCE), f"{name}: {key}"
        else:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"


#: Options added to the run's config since the reference was written (train_config.json gains
#: them at their defaults): issue 15's training options and issue 16's env and eval options, by dotted path.
NEW_OPTIONS = {"grad_accum_steps", "precision", "ema", "compile", "dataset.image_transforms", "dataset.datasets",
               "dataset.rename_map",
               "env", "eval.batch_size", "eval.rename_map", "eval.num_threads", "eval.timeout_s"}


def flat(config: dict, prefix: str = "") -> dict:
    """{key: value}, with the dataset and eval nodes' fields one level down (`dataset.<field>`),
    where new options of theirs appear."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("dataset", "eval") and not prefix:
            out.update(flat(value, f"{path}."))
        else:
            out[path] = value
    return out


def assert_same_train_config(name: str, ours: dict, theirs: dict) -> None:
    """The run's config as before, but for what was meant to change: the options added since,
    and the `job` node, which holds only its target's fields since each target has its own
    schema (issue 14), with the values it had."""
    ours, theirs = flat(ours), flat(theirs)
    assert set(ours) - set(theirs) == NEW_OPTIONS, name
    assert set(theirs) <= set(ours), name
    for key, value in theirs.items():
        if key == "job":
            assert ours["job"].items() <= value.items(), name
        else:
            assert ours[key] == value, f"{name}: {key}"


@pytest.mark.slow
def test_an_unchanged_run_writes_the_same_files_as_before_the_checkpoint_manager(remade):
    expected = reference_files()
    assert sorted(remade) == sorted(expected)
    for name, path in expected.items():
        ours, theirs = remade[name], path.read_bytes()
        if name.endswith("train_config.json"):
            assert_same_train_config(name, json.loads(ours), json.loads(theirs))
        elif name.endswith("adapter_config.json"):
            a, b = json.loads(ours), json.loads(theirs)
            assert sorted(a.pop("target_modules")) == sorted(b.pop("target_modules")), name
            assert a == b, name
        elif name.endswith(".safetensors"):
            if "/dcp/" not in name:
                assert header(ours) == header(theirs), name
            assert_same_tensors(name, ours, theirs)
        else:
            assert ours == theirs, name


def test_the_reference_is_loadable_safetensors_and_json():
    """Guards the reference itself: a damaged file would make the comparison meaningless."""
    files = reference_files()
    assert any(n.endswith("tracker.json") for n in files) and any("/dcp/" in n for n in files)
    for name, path in files.items():
        if name.endswith(".safetensors"):
            assert load_file(str(path)), name
        else:
            json.loads(path.read_text())
