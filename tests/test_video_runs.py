"""Training on video datasets, through the CLI: the same batches as on images, bit-exact resume
(with and without DataLoader workers), the same sharding on two processes, a policy that learns,
a Hub video dataset fetched with its MP4s, and one-line errors for damaged input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, assert_one_line_error
from tests.test_distributed import global_batches
from tests.test_resume import assert_same_final_state, kill_after_first_checkpoint
from tests.test_video import copy_reference, edit_episodes

VIDEO = ["dataset.synthetic.video=true"]
REFERENCE = Path(__file__).parent / "data" / "lerobot_v3_video"  # written by LeRobot 0.6.1
STEPS = 300
RUN = [*TINY, *VIDEO, f"steps={STEPS}", "checkpoint.every=100", "batch_size=32"]
TINY_ACT = ["policy=act", "policy.dim_model=32", "policy.n_heads=2", "policy.dim_feedforward=64",
            "policy.chunk_size=10", "policy.n_action_steps=5", "policy.pretrained_backbone_weights=null"]


@pytest.fixture(scope="module")
def video_reference(module_cli, tmp_path_factory) -> Path:
    """The uninterrupted video run the interrupted ones are compared with."""
    run_dir = tmp_path_factory.mktemp("video-reference")
    done = module_cli.run(*RUN, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_a_video_run_draws_exactly_the_batches_of_the_image_run(module_cli, tmp_path):
    runs = {}
    for name, extra in (("image", []), ("video", VIDEO)):
        runs[name] = tmp_path / name
        done = module_cli.run(*TINY, *extra, "steps=10", "log_samples=true", f"hydra.run.dir={runs[name]}")
        assert done.returncode == 0, done.stderr[-3000:]
    assert global_batches(runs["video"], 1) == global_batches(runs["image"], 1)
    info = json.loads((runs["video"] / "checkpoints" / "000010" / "pretrained_model" / "config.json").read_text())
    assert info["input_features"]["observation.image"] == {"type": "VISUAL", "shape": [3, 32, 32]}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_video_resume_after_sigkill_is_bit_exact(cli, video_reference, tmp_path, num_workers):
    run_dir = tmp_path / "run"
    kill_after_first_checkpoint(cli, [*RUN, f"num_workers={num_workers}"], run_dir, STEPS)
    done = cli.run(*RUN, f"num_workers={num_workers}", f"hydra.run.dir={run_dir}", "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_final_state(video_reference, run_dir, STEPS)


@pytest.mark.slow
def test_two_processes_on_video_consume_the_one_process_global_batch(module_cli, tmp_path):
    runs = {}
    for processes, batch in ((1, 16), (2, 8)):
        runs[processes] = tmp_path / f"p{processes}"
        done = module_cli.run(*TINY, *VIDEO, "steps=6", "log_samples=true", f"batch_size={batch}", "num_workers=1",
                              f"distributed.processes={processes}", f"hydra.run.dir={runs[processes]}")
        assert done.returncode == 0, done.stderr[-3000:]
    assert global_batches(runs[2], 2) == global_batches(runs[1], 1)


@pytest.mark.slow
def test_a_policy_trained_on_the_video_task_succeeds_in_the_simulator(module_cli, tmp_path):
    done = module_cli.run(*VIDEO, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    evals = json.loads((tmp_path / "run" / "result.json").read_text())["evals"]
    assert evals["0"]["eval/success_rate"] < 0.2 and evals["2000"]["eval/success_rate"] >= 0.8, evals


def test_act_trains_on_lerobots_video_dataset_from_the_hub(module_cli, hub, tmp_path):
    repo = "user/video-tiny"
    hub.run_python(f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo({repo!r}, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id={repo!r}, repo_type="dataset", folder_path={str(REFERENCE)!r})
    """)
    env = {**module_cli.env, **hub.env, "HF_LEROBOT_HOME": str(tmp_path / "lerobot")}
    cli = type(module_cli)(env=env, cwd=tmp_path)
    done = cli.run(*TINY_ACT, "dataset=hub", f"dataset.repo_id={repo}", "steps=3", "batch_size=4",
                   "eval.enabled=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "lerobot" / repo / "videos" / "observation.images.cam1" / "chunk-000" / "file-000.mp4").is_file()
    config = json.loads((tmp_path / "run" / "checkpoints" / "000003" / "pretrained_model" / "config.json").read_text())
    assert config["input_features"]["observation.images.cam0"] == {"type": "VISUAL", "shape": [3, 64, 64]}


def test_a_missing_video_file_stops_the_run_before_it_trains(cli, tmp_path):
    root = copy_reference(tmp_path)
    (root / "videos" / "observation.images.cam0" / "chunk-000" / "file-000.mp4").unlink()
    done = cli.run(*TINY_ACT, "dataset=local", "dataset.repo_id=user/broken", f"dataset.root={root}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, "observation.images.cam0/chunk-000/file-000.mp4 of 'observation.images.cam0' is missing")
    assert not (tmp_path / "run" / "checkpoints").exists()


CAM0 = Path("videos/observation.images.cam0/chunk-000/file-000.mp4")


def _shorter(root: Path) -> None:
    edit_episodes(root, "videos/observation.images.cam0/from_timestamp", [0.0, 40 / 15, 87 / 15, 150 / 15])


def _truncated(root: Path) -> None:
    (root / CAM0).write_bytes((root / CAM0).read_bytes()[: (root / CAM0).stat().st_size // 2])


def _off_the_frames(root: Path) -> None:  # episode 2 starts between two frames of the file
    edit_episodes(root, "videos/observation.images.cam0/from_timestamp", [0.0, 40 / 15, 87.3 / 15, 141 / 15])


def _unknown_codec(root: Path) -> None:
    (root / CAM0).write_bytes((root / CAM0).read_bytes().replace(b"av01", b"zz99"))


DAMAGE = {"shorter": (_shorter, "shorter than the episode"), "truncated": (_truncated, "truncated or corrupt"),
          "off-the-frames": (_off_the_frames, "tolerance_s=0.0001"),
          "unknown-codec": (_unknown_codec, "video codec FFmpeg cannot decode")}


@pytest.mark.parametrize("damage, num_workers", [(d, 2) for d in DAMAGE] + [("shorter", 0)])
def test_a_damaged_video_stops_the_run_with_one_line(cli, tmp_path, damage, num_workers):
    # Found when the frames are decoded: in a DataLoader worker, or the prefetch thread.
    root = copy_reference(tmp_path)
    damage_dataset, message = DAMAGE[damage]
    damage_dataset(root)
    done = cli.run(*TINY_ACT, "dataset=local", "dataset.repo_id=user/broken", f"dataset.root={root}", "steps=50",
                   "batch_size=16", "checkpoint.every=0", f"num_workers={num_workers}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_decoding_on_the_gpu_with_dataloader_workers_is_refused(cli, tmp_path):
    done = cli.run(*TINY, *VIDEO, "dataset.video_device=cuda", "num_workers=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, "dataset.video_device=cuda decodes in the training process")
    assert "set num_workers=0" in done.stderr


def test_an_unknown_video_backend_is_a_one_line_error(cli, tmp_path):
    done = cli.run(*TINY, *VIDEO, "dataset.video_backend=opencv", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(done, "dataset.video_backend must be 'torchcodec' or 'pyav', got 'opencv'")


def _ffmpeg_libraries() -> list[str]:
    import glob

    return sorted(glob.glob("/usr/lib/*/libavutil.so.*")) + sorted(glob.glob("/usr/lib/libavutil.so.*"))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="hiding the system FFmpeg needs root and unshare (CI runs as root)")
def test_torchcodec_without_ffmpeg_is_a_one_line_error_naming_the_fix(cli, tmp_path):
    libraries = _ffmpeg_libraries()
    assert libraries, "the system FFmpeg (apt-get install ffmpeg) is not installed"
    # A private mount namespace in which FFmpeg's libavutil is an empty file: what a machine
    # without the ffmpeg package looks like to torchcodec. PyAV keeps its bundled FFmpeg.
    hide = " && ".join(f"mount --bind /dev/null {lib}" for lib in libraries)
    command = " ".join([sys.executable, "-m", "robotrain", *TINY, *VIDEO, "steps=2", f"hydra.run.dir={tmp_path / 'run'}"])
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{hide} && exec {command}"],
                          cwd=cli.cwd, env=cli.env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(done, "apt-get install ffmpeg")
    assert "dataset.video_backend=pyav" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    works = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"{hide} && exec {command} dataset.video_backend=pyav hydra.run.dir={tmp_path / 'pyav'}"],
                           cwd=cli.cwd, env=cli.env, capture_output=True, text=True, timeout=300)
    assert works.returncode == 0, works.stderr[-3000:]
