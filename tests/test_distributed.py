"""Several processes on CPU (gloo): `distributed.processes=2` starts them with torchrun.
One global batch of consecutive sampler positions per step, bit-exact resume, resume on
another number of processes, a dataset fetched once, and clean exits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY
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
