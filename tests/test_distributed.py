"""Several processes on CPU (gloo): `distributed.processes=2` starts them with torchrun.
One global batch of consecutive sampler positions per step, bit-exact resume, resume on
another number of processes, a dataset fetched once, and clean exits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from robotrain import strategy
from tests.conftest import TINY, assert_one_line_error, error_lines, sitecustomize, tree_digest
from tests.test_resume import assert_same_final_state, load_tensors

RUN = [*TINY, "steps=20", "checkpoint.every=10", "log_samples=true"]


def samples(run_dir: Path, rank: int) -> dict[int, list[int]]:
    lines = (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return {entry["step"]: entry["index"] for entry in map(json.loads, lines)}


def global_batches(run_dir: Path, processes: int) -> dict[int, list[int]]:
    """Each step's indices over all processes, in rank order."""
    per_rank = [samples(run_dir, r) for r in range(processes)]
    return {step: sum((rank[step] for rank in per_rank), []) for step in per_rank[0]}


@pytest.fixture(scope="module")
def two_process_run(module_cli, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp")
    done = module_cli.run(*RUN, "distributed.processes=2", "batch_size=8", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_two_processes_train_data_parallel(two_process_run):
    info = json.loads((two_process_run / "checkpoints" / "000020" / "training_state" / "training_step.json").read_text())
    assert info == {"step": 20, "num_processes": 2, "batch_size": 8, "global_batch_size": 16, "sample_position": 320}
    state = two_process_run / "checkpoints" / "000020" / "training_state"
    assert (state / "rng_state.safetensors").is_file() and (state / "rng_state_rank1.safetensors").is_file()


def test_ranks_together_consume_exactly_the_one_process_global_batch(module_cli, two_process_run, tmp_path):
    single = tmp_path / "single"
    done = module_cli.run(*RUN, "batch_size=16", f"hydra.run.dir={single}")
    assert done.returncode == 0, done.stderr
    two = global_batches(two_process_run, 2)
    one = global_batches(single, 1)
    assert two == one
    ranks = [samples(two_process_run, r) for r in (0, 1)]
    assert all(not set(ranks[0][s]) & set(ranks[1][s]) for s in ranks[0])  # no overlap inside a step


def test_two_process_resume_is_bit_exact(module_cli, two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run / "checkpoints" / "000010", run_dir / "checkpoints" / "000010")
    done = module_cli.run(*RUN, "distributed.processes=2", "batch_size=8", f"hydra.run.dir={run_dir}", "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_final_state(two_process_run, run_dir, step=20)
    rank1 = "training_state/rng_state_rank1.safetensors"
    a = load_tensors(two_process_run / "checkpoints" / "000020" / rank1)
    b = load_tensors(run_dir / "checkpoints" / "000020" / rank1)
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("processes, batch_size", [(1, 16), (2, 8)])
def test_resume_on_another_number_of_processes_continues_the_same_global_batches(
        module_cli, two_process_run, tmp_path, processes, batch_size):
    """2 -> 1 and, from a 1-process checkpoint, 1 -> 2; the global batch stays 16."""
    source = two_process_run
    if processes == 2:  # make a 1-process checkpoint at step 10 first
        source = tmp_path / "one"
        assert module_cli.run(*RUN, "batch_size=16", f"hydra.run.dir={source}").returncode == 0
    run_dir = tmp_path / "run"
    shutil.copytree(source / "checkpoints" / "000010", run_dir / "checkpoints" / "000010")
    done = module_cli.run(*RUN, f"distributed.processes={processes}", f"batch_size={batch_size}",
                          f"hydra.run.dir={run_dir}", "resume=auto", "resume.allow_changes=false")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = global_batches(run_dir, processes)
    uninterrupted = global_batches(two_process_run, 2)
    assert sorted(resumed) == list(range(11, 21))
    assert all(resumed[s] == uninterrupted[s] for s in resumed)


def test_changing_the_global_batch_on_resume_says_what_is_no_longer_exact(module_cli, two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run / "checkpoints" / "000010", run_dir / "checkpoints" / "000010")
    done = module_cli.run(*RUN, "batch_size=8", f"hydra.run.dir={run_dir}", "resume=auto")
    assert done.returncode == 0, done.stderr
    assert "global batch changes from 16 (2 processes x 8) to 8 (1 x 8)" in done.stdout + done.stderr
    assert "continues at sample 160" in done.stdout + done.stderr
    saved = json.loads((run_dir / "checkpoints" / "000020" / "training_state" / "training_step.json").read_text())
    assert saved["sample_position"] == 160 + 10 * 8  # ten more steps of the new global batch
    sampler = json.loads((run_dir / "checkpoints" / "000020" / "training_state" / "sampler_state.json").read_text())
    assert sampler["epoch"] * sampler["num_samples"] + sampler["position"] == 240


def test_a_hub_dataset_is_downloaded_once_by_the_main_process(module_cli, hub, tmp_path):
    repo = "user/tiny-dataset"
    reference = Path(__file__).parent / "data" / "lerobot_v3_tiny"
    hub.run_python(f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo({repo!r}, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id={repo!r}, repo_type="dataset", folder_path={str(reference)!r})
    """)
    env = {**module_cli.env, **hub.env, "HF_LEROBOT_HOME": str(tmp_path / "lerobot")}
    mark = hub.mark()
    cli = type(module_cli)(env=env, cwd=tmp_path)
    done = cli.run("distributed.processes=2", "steps=3", "batch_size=4", "eval.enabled=false",
                   f"dataset.repo_id={repo}", "dataset.root=null", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    files = [d["file"] for d in hub.downloads(since=mark, repo=repo)]
    assert "data/chunk-000/file-000.parquet" in files
    assert len(files) == len(set(files))  # nothing fetched twice
    assert (tmp_path / "lerobot" / repo / "meta" / "info.json").is_file()


@pytest.mark.slow
def test_ten_two_process_runs_in_a_row_exit_cleanly(module_cli, tmp_path):
    for attempt in range(10):
        done = module_cli.run(*TINY, "steps=3", "distributed.processes=2", f"hydra.run.dir={tmp_path / str(attempt)}")
        assert done.returncode == 0, f"run {attempt}: {done.stderr[-3000:]}"
        assert (tmp_path / str(attempt) / "result.json").is_file()


#: Put on PYTHONPATH, makes process 1 raise in its third optimizer step.
FAIL_ON_RANK_1 = """
import os, sys
if os.environ.get("RANK") == "1":
    import builtins
    real_import = builtins.__import__

    def patch_train(name, *args, **kwargs):
        module = real_import(name, *args, **kwargs)
        train = sys.modules.get("robotrain.train")
        if train is not None and hasattr(train, "_Training") and not hasattr(train, "_injected"):
            update = train._injected = train._Training.update

            def failing(self, micro_batches, step):
                if step == 2:
                    raise RuntimeError("injected failure in step 3")
                return update(self, micro_batches, step)
            train._Training.update = failing
        return module
    builtins.__import__ = patch_train
"""


@pytest.mark.parametrize("name", sorted(strategy.STRATEGIES))
def test_a_failure_on_one_process_ends_every_process_and_is_reported_once(module_cli, tmp_path, name):
    env = {**module_cli.env, **sitecustomize(tmp_path, FAIL_ON_RANK_1)}
    # Within the timeout, far below gloo's 30-minute collective timeout: process 0 did not wait.
    done = type(module_cli)(env=env, cwd=tmp_path).run(
        *TINY, "steps=6", "distributed.processes=2", f"distributed.strategy={name}",
        f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1, done.stderr
    assert error_lines(done.stderr).count("RuntimeError: injected failure in step 3") == 1, done.stderr
    assert error_lines(done.stderr)[-1] == (f"robotrain: error: process 1 of 2 failed training policy mlp with strategy "
                                            f"{name}: injected failure in step 3")
    assert "ChildFailedError" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr


FSDP = [*RUN, "distributed.strategy=fsdp"]


def dcp_state(folder: Path) -> dict:
    """A sharded checkpoint's full tensors by key ("model.<fqn>", "optim.<fqn>.<name>"), read in
    this one process from the shards' safetensors headers."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(str(folder))
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}{key}/")
    elif hasattr(tree, "shape"):
        yield prefix, tree


@pytest.fixture(scope="module")
def fsdp_run(module_cli, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("fsdp")
    done = module_cli.run(*FSDP, "distributed.processes=2", "batch_size=8", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout + done.stderr


def test_fsdp_shards_every_parameter_and_saves_sharded_plus_consolidated(fsdp_run):
    run_dir, output = fsdp_run
    assert "FSDP: 6 of 6 parameter tensors sharded as DTensors over 2 processes" in output
    state = run_dir / "checkpoints" / "000020" / "training_state"
    assert sorted(p.name for p in (state / "dcp").iterdir()) == [
        "optimizer_param_groups.json", *(f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2))]
    assert not (state / "optimizer_state.safetensors").exists()
    assert (run_dir / "checkpoints" / "000020" / "pretrained_model" / "model.safetensors").is_file()


def test_a_corrupt_shard_is_a_one_line_error(module_cli, fsdp_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_run[0] / "checkpoints" / "000010", run_dir / "checkpoints" / "000010")
    shard = run_dir / "checkpoints" / "000010" / "training_state" / "dcp" / "shard-00002-model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated, as by a full disk
    before = tree_digest(run_dir / "checkpoints")
    done = module_cli.run(*FSDP, "batch_size=16", f"hydra.run.dir={run_dir}", "resume=auto")
    assert_one_line_error(done, f"{shard} is corrupt")
    assert tree_digest(run_dir / "checkpoints") == before


def test_fsdp_consolidated_model_loads_in_a_plain_process(fsdp_run):
    from robotrain import policies

    policy = policies.from_pretrained(fsdp_run[0] / "checkpoints" / "000020" / "pretrained_model")
    assert sum(p.numel() for p in policy.parameters()) > 0


def test_fsdp_resume_on_two_processes_is_bit_exact(module_cli, fsdp_run, tmp_path):
    reference = fsdp_run[0]
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "000010", run_dir / "checkpoints" / "000010")
    done = module_cli.run(*FSDP, "distributed.processes=2", "batch_size=8", f"hydra.run.dir={run_dir}", "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    weights = "pretrained_model/model.safetensors"
    a, b = (load_tensors(d / "checkpoints" / "000020" / weights) for d in (reference, run_dir))
    assert all((a[k] == b[k]).all() for k in a)
    sa, sb = (dict(flatten(dcp_state(d / "checkpoints" / "000020" / "training_state" / "dcp")))
              for d in (reference, run_dir))
    assert sa.keys() == sb.keys() and any("optim" in k for k in sa)
    assert all((sa[k] == sb[k]).all() for k in sa)


@pytest.mark.parametrize("processes, batch_size", [(1, 16), (2, 8)])
def test_fsdp_resume_reshards_onto_another_number_of_processes(module_cli, fsdp_run, tmp_path, processes, batch_size):
    import torch

    reference = fsdp_run[0]
    source = reference
    if processes == 2:  # 1 -> 2: start from a 1-process FSDP checkpoint
        source = tmp_path / "one"
        assert module_cli.run(*FSDP, "batch_size=16", f"hydra.run.dir={source}").returncode == 0
    run_dir = tmp_path / "run"
    shutil.copytree(source / "checkpoints" / "000010", run_dir / "checkpoints" / "000010")
    done = module_cli.run(*FSDP, f"distributed.processes={processes}", f"batch_size={batch_size}",
                          f"hydra.run.dir={run_dir}", "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert global_batches(run_dir, processes) == {s: b for s, b in global_batches(reference, 2).items() if s > 10}
    a, b = (load_tensors(d / "checkpoints" / "000020" / "pretrained_model" / "model.safetensors")
            for d in (reference, run_dir))
    # Same batches, same optimizer state; only the order of float sums across processes differs.
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_an_fsdp_run_pushes_the_lerobot_layout_to_the_hub_and_resumes_from_it_bit_exactly(
        module_cli, fsdp_run, hub, tmp_path):
    repo = "user/fsdp-push"
    cli = type(module_cli)(env={**module_cli.env, **hub.env}, cwd=tmp_path)
    done = cli.run(*FSDP, "distributed.processes=2", "batch_size=8", f"hub.repo_id={repo}",
                   "hub.push_checkpoints=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    files = set(hub.run_json(f"import json; from huggingface_hub import HfApi; "
                             f"print(json.dumps(HfApi().list_repo_files({repo!r})))"))
    assert {"model.safetensors", "config.json", "train_config.json"} <= files  # the final, consolidated model
    step = "checkpoints/000010"
    shards = {f"{step}/training_state/dcp/shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)}
    assert {f"{step}/pretrained_model/model.safetensors", f"{step}/training_state/dcp/optimizer_param_groups.json",
            *shards} <= files

    resumed = tmp_path / "resumed"
    done = cli.run("distributed.processes=2", f"resume=hub:{repo}@10", f"hydra.run.dir={resumed}")
    assert done.returncode == 0, done.stderr[-3000:]
    weights = "checkpoints/000020/pretrained_model/model.safetensors"
    a, b = load_tensors(fsdp_run[0] / weights), load_tensors(resumed / weights)
    assert all((a[k] == b[k]).all() for k in a)


def test_accelerate_launch_and_torchrun_run_data_parallel(module_cli, tmp_path):
    import subprocess
    import sys

    launchers = {
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    }
    for name, launcher in launchers.items():
        run_dir = tmp_path / name
        done = subprocess.run([*launcher, "-m", "robotrain", *TINY, "steps=4", f"hydra.run.dir={run_dir}"],
                              env={**module_cli.env, "ACCELERATE_USE_CPU": "1"}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        info = json.loads((run_dir / "checkpoints" / "000004" / "training_state" / "training_step.json").read_text())
        assert info["num_processes"] == 2 and info["global_batch_size"] == 16, name
