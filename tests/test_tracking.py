"""Experiment tracking and evaluation videos: what a run sends to TensorBoard, wandb (offline) and
trackio (local), read back from their own files; resumed runs continue the same tracker run; the
evaluation GIF in the run dir. Nothing here contacts a server: wandb runs offline with every
folder inside the test's tmp dir, trackio writes its local SQLite database under TRACKIO_DIR."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import struct
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, Cli, assert_one_line_error

TRACKERS = ["tensorboard", "wandb", "trackio"]
#: TINY with the simulator evaluation on (2 short episodes, one recorded).
RUN = [*(o for o in TINY if not o.startswith("eval.enabled")), "eval.episodes=2", "eval.max_steps=10"]
TRAIN_KEYS = ("loss", "lr", "grad_norm", "steps_per_s", "samples_per_s", "data_wait_frac", "peak_memory_mb")


def tracker_cli(cli: Cli, home: Path) -> Cli:
    """`cli` with every tracker folder under `home`, wandb offline, and no server configured."""
    env = {k: v for k, v in cli.env.items()
           if not k.startswith(("WANDB_", "TRACKIO_")) and k not in ("TENSORBOARD_LOGDIR",)}
    env.update({
        "WANDB_MODE": "offline", "WANDB_DIR": str(home / "wandb"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_DATA_DIR": str(home / "wandb-data"),
        "TRACKIO_DIR": str(home / "trackio"),
    })
    (home / "wandb").mkdir(parents=True, exist_ok=True)
    return Cli(env=env, cwd=cli.cwd)


# -- reading back what each tracker stored ---------------------------------------------------


@dataclasses.dataclass
class Logged:
    runs: set[str]
    """The tracker runs written to (wandb ids, trackio run ids, TensorBoard folders)."""
    scalars: dict[str, dict[int, float]]
    """Metric name -> {optimizer step: value}."""
    config: dict
    """The config last logged with the run."""
    videos: dict[int, bytes]
    """Optimizer step -> the eval/video GIF's bytes."""


def read_logged(tracker: str, home: Path, run_dir: Path) -> Logged:
    if tracker == "tensorboard":
        return read_tensorboard(run_dir / "tensorboard")
    if tracker == "wandb":
        return read_wandb(home / "wandb" / "wandb")
    return read_trackio(home / "trackio", project="robotrain")


def read_tensorboard(folder: Path) -> Logged:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags["scalars"]}
    config = {}
    for name in ("config", "adapter_config"):
        if f"{name}/text_summary" in tags["tensors"]:
            text = events.Tensors(f"{name}/text_summary")[-1].tensor_proto.string_val[0].decode()
            value = json.loads(text.removeprefix("```json\n").removesuffix("\n```"))
            config.update(value if name == "config" else {name: value})
    videos = {e.step: e.encoded_image_string for e in events.Images("eval/video")} if "eval/video" in tags["images"] else {}
    return Logged(runs={str(folder)} if scalars else set(), scalars=scalars, config=config, videos=videos)


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` run file (LevelDB log format after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb(wandb_dir: Path) -> Logged:
    logged = Logged(runs=set(), scalars={}, config={}, videos={})
    for run_dir in sorted(wandb_dir.glob("offline-run-*")):
        for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                logged.runs.add(record.run.run_id)
                logged.config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                logged.config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                step = row["train/step"]
                for key, value in row.items():
                    if key.endswith("/_type") and value == "video-file":
                        logged.videos[step] = (run_dir / "files" / row[key.replace("/_type", "/path")]).read_bytes()
                    elif not key.startswith("_") and isinstance(value, (int, float)) and key != "train/step":
                        logged.scalars.setdefault(key, {})[step] = value
    logged.config.pop("_wandb", None)
    return logged


def read_trackio(trackio_dir: Path, project: str) -> Logged:
    db = sqlite3.connect(trackio_dir / f"{project}.db")
    logged = Logged(runs=set(), scalars={}, config={}, videos={})
    for run_id, step, blob in db.execute("SELECT run_id, step, metrics FROM metrics ORDER BY id"):
        logged.runs.add(run_id)
        for key, value in json.loads(blob).items():
            if isinstance(value, dict) and value.get("_type") == "trackio.video":
                logged.videos[step] = (trackio_dir / "media" / value["file_path"]).read_bytes()
            else:
                logged.scalars.setdefault(key, {})[step] = float(value)  # NaN is stored as "NaN"
    for (blob,) in db.execute("SELECT config FROM configs ORDER BY id"):
        logged.config = {k: v for k, v in json.loads(blob).items() if not k.startswith("_")}
    return logged


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


# -- runs ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tracked:
    tracker: str
    run_dir: Path
    logged: Logged


@pytest.fixture(scope="module", params=TRACKERS)
def tracked(request, module_cli, tmp_path_factory) -> Tracked:
    """`tracker=<name>`: 10 steps (checkpoint and eval at 10), then `resume=auto` to step 20."""
    tracker, home = request.param, tmp_path_factory.mktemp(request.param)
    cli, run_dir = tracker_cli(module_cli, home), home / "run"
    first = cli.run(*RUN, "steps=10", f"tracker={tracker}", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli.run(*RUN, "steps=20", f"hydra.run.dir={run_dir}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return Tracked(tracker, run_dir, read_logged(tracker, home, run_dir))


@pytest.fixture(scope="module")
def plain_run(module_cli, tmp_path_factory) -> Path:
    """No tracker (the default), two episodes recorded; also the pretrained base for PEFT."""
    run_dir = tmp_path_factory.mktemp("plain")
    done = module_cli.run(*RUN, "steps=10", "policy.hidden_dim=32", "eval.video_episodes=2", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


# -- what reaches the tracker ------------------------------------------------------------------


def test_training_metrics_reach_the_tracker(tracked):
    expected = [line for line in jsonl(tracked.run_dir) if "loss" in line]
    assert [line["step"] for line in expected] == [5, 10, 15, 20]
    for key in TRAIN_KEYS:
        logged = tracked.logged.scalars[f"train/{key}"]
        assert sorted(logged) == [5, 10, 15, 20], key
        assert all(same(logged[line["step"]], line[key]) for line in expected), (key, logged)


def test_eval_success_rate_reaches_the_tracker(tracked):
    expected = {line["step"]: line["eval/success_rate"] for line in jsonl(tracked.run_dir) if "eval/success_rate" in line}
    assert sorted(expected) == [0, 10, 20]
    assert tracked.logged.scalars["eval/success_rate"] == pytest.approx(expected)


def test_the_resolved_config_reaches_the_tracker(tracked):
    saved = json.loads((tracked.run_dir / "checkpoints" / "000020" / "pretrained_model" / "train_config.json").read_text())
    assert tracked.logged.config == saved
    assert tracked.logged.config["tracker"]["name"] == tracked.tracker and tracked.logged.config["steps"] == 20


def test_a_resumed_run_continues_the_same_tracker_run(tracked):
    assert len(tracked.logged.runs) == 1, tracked.logged.runs
    assert max(tracked.logged.scalars["train/loss"]) == 20
    if tracked.tracker != "tensorboard":  # TensorBoard's run is the folder, which the run dir keeps
        state = json.loads((tracked.run_dir / "checkpoints" / "000010" / "training_state" / "tracker.json").read_text())
        assert state["name"] == tracked.tracker and state["project"] == "robotrain"


def test_the_eval_gif_reaches_the_tracker(tracked):
    assert sorted(tracked.logged.videos) == [0, 10, 20]
    assert tracked.logged.videos[10] == (tracked.run_dir / "eval" / "step_000010.gif").read_bytes()


@pytest.mark.parametrize("tracker", TRACKERS)
def test_a_peft_run_logs_the_adapter_config(module_cli, plain_run, tmp_path, tracker):
    cli, run_dir = tracker_cli(module_cli, tmp_path), tmp_path / "run"
    done = cli.run(*TINY, "steps=5", "policy.hidden_dim=32", "peft=lora", "peft.r=4", f"tracker={tracker}",
                   f"policy.pretrained_path={plain_run}", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = read_logged(tracker, tmp_path, run_dir).config["adapter_config"]
    saved = json.loads((run_dir / "checkpoints" / "000005" / "pretrained_model" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == saved["peft_type"] == "LORA" and adapter["r"] == 4
    assert adapter["base_model_name_or_path"] == saved["base_model_name_or_path"] == str(plain_run)
    assert sorted(adapter["target_modules"]) == sorted(saved["target_modules"])


def test_only_the_main_process_logs(module_cli, tmp_path):
    cli, run_dir = tracker_cli(module_cli, tmp_path), tmp_path / "run"
    done = cli.run(*RUN, "steps=5", "distributed.processes=2", "batch_size=4", "tracker=wandb",
                   f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))) == 1
    logged = read_wandb(tmp_path / "wandb" / "wandb")
    assert sorted(logged.scalars["train/loss"]) == [5] and sorted(logged.videos) == [0, 5]


def test_no_tracker_by_default_leaves_no_tracker_files(plain_run):
    assert not (plain_run / "tensorboard").exists() and not (plain_run / "wandb").exists()
    assert not (plain_run / "checkpoints" / "000010" / "training_state" / "tracker.json").exists()


# -- the evaluation video ----------------------------------------------------------------------


def test_eval_saves_a_multi_frame_gif_a_person_can_see(plain_run):
    from PIL import Image, ImageSequence

    assert sorted(p.name for p in (plain_run / "eval").glob("*.gif")) == ["step_000000.gif", "step_000010.gif"]
    with Image.open(plain_run / "eval" / "step_000010.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames > 1 and gif.info["loop"] == 0
        frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
    assert gif.size == (2 * 128 + 2, 128)  # two episodes at 128 px (the policy sees 32 px), a 2-px line between
    assert len({frame.tobytes() for frame in frames}) > 1  # something moves


def test_recording_the_eval_video_changes_neither_the_outcome_nor_training_randomness(plain_run):
    from robotrain import policies
    from robotrain.eval.synthetic import evaluate

    policy = policies.from_pretrained(plain_run / "checkpoints" / "000010" / "pretrained_model")
    torch.manual_seed(0)
    plain = evaluate(policy, episodes=4, max_steps=10, seed=3, image_size=32)
    rng = torch.get_rng_state()
    recorded = evaluate(policy, episodes=4, max_steps=10, seed=3, image_size=32, record=2, render_size=64)
    assert torch.equal(rng, torch.get_rng_state())
    assert (plain.success_rate, plain.frames) == (recorded.success_rate, None)
    assert same(plain.mean_steps, recorded.mean_steps)
    assert recorded.frames.shape[1:] == (64, 2 * 64 + 2, 3) and recorded.frames.dtype.name == "uint8"


# -- bad input ---------------------------------------------------------------------------------


BAD_TRACKER_INPUT = {
    "unknown tracker": (["tracker=nope"], "no option 'nope'"),
    "unknown tracker name": (["tracker.name=nope"], "tracker must be one of none, tensorboard, wandb, trackio"),
    "wandb setting with another tracker": (["tracker=tensorboard", "tracker.mode=offline"], "is a wandb setting"),
    "bad wandb mode": (["tracker=wandb", "tracker.mode=sometimes"], "tracker.mode must be online or offline"),
    "tracker.dir with trackio": (["tracker=trackio", "tracker.dir=/tmp"], "$TRACKIO_DIR"),
    "more recorded episodes than evaluated": (["eval.episodes=2", "eval.video_episodes=3"], "eval.video_episodes"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRACKER_INPUT))
def test_bad_tracker_input_is_a_one_line_error(cli, tmp_path, case):
    overrides, expected = BAD_TRACKER_INPUT[case]
    done = cli.run(*TINY, "steps=5", f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    assert_one_line_error(done, expected)


def test_a_missing_tracker_package_is_a_one_line_error_naming_the_extra(cli, tmp_path):
    hidden = tmp_path / "without-wandb" / "wandb"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    cli.env["PYTHONPATH"] = str(hidden.parent)
    done = cli.run(*TINY, "steps=5", "tracker=wandb", f"hydra.run.dir={tmp_path / 'run'}")
    line = assert_one_line_error(done, "tracker=wandb needs the wandb package")
    assert line == ("robotrain: error: tracker=wandb needs the wandb package (No module named 'wandb'): "
                    "pip install 'robotrain[trackers]'")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
