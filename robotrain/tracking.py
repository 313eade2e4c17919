"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, trackio.

    tracker = tracking.start(cfg, run_dir, continued, step, model, enabled=is_main)
    tracker.log(step, metrics)                  # a metrics window, or an evaluation's numbers
    tracker.log_video(step, "eval/video", gif)  # an evaluation episode, as a GIF file
    tracker.run_state()                         # what tracker.json in each checkpoint holds
    tracker.close()

- Only the main process logs: every other process, and `tracker=none`, gets the base
  `Tracker`, which does nothing. metrics.jsonl is written either way (`robotrain.progress`).
- Names: training metrics are logged under `train/` (`loss` -> `train/loss`, also lr,
  grad_norm, steps_per_s, samples_per_s, data_wait_frac, peak_memory_mb); evaluation metrics keep theirs
  (`eval/success_rate`). The x axis is the optimizer step (in wandb the `train/step`
  metric, since wandb's own `_step` only counts log calls).
- When the run starts each tracker receives the resolved config (what train_config.json
  holds) and, for a PEFT run, the adapter's config under `adapter_config`.
- Resuming: training_state/tracker.json in each checkpoint names the tracker run (wandb run
  id, trackio run name). A run resumed from that checkpoint with the same tracker and
  project continues that run; another tracker or project starts a new one. TensorBoard
  appends to the same folder and hides what a crashed attempt logged after the checkpoint
  (`purge_step`).
- The tracker packages are imported only when selected; a missing one is a one-line
  `UserError` naming the extra: pip install 'robotrain[trackers]'.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from robotrain.config import to_dict
from robotrain.errors import UserError

log = logging.getLogger("robotrain")

#: The file in a checkpoint's training_state/ that names the tracker run to continue.
STATE_FILE = "tracker.json"

_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_installed(cfg) -> None:
    """Import the selected tracker's package now (before any data is fetched), or fail in one line."""
    if cfg.name != "none":
        _import(cfg.name)


def start(cfg, run_dir: Path, continued: "TrackerRun | None" = None, step: int = 0, model=None,
          enabled: bool = True) -> Tracker:
    """The tracker `cfg.tracker` names, started with the run's config; a do-nothing `Tracker`
    when `enabled` is false (every process but the main one) or the tracker is none.

    `continued` (the checkpoint part a resume loaded) names the tracker run to continue, and
    records the started tracker for the next checkpoint; `step` is the step the run starts at;
    `model` (unwrapped) gives the adapter config of a PEFT run."""
    continued = continued if continued is not None else TrackerRun()
    if not enabled or cfg.tracker.name == "none":
        return Tracker()
    config = to_dict(cfg)
    adapter = adapter_config(model)
    if adapter is not None:
        config["adapter_config"] = adapter
    saved = continued.saved
    if saved is not None and (saved.get("name"), saved.get("project")) != (cfg.tracker.name, cfg.tracker.project):
        saved = None  # another tracker or project: a new run there
    backend = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio}[cfg.tracker.name]
    continued.tracker = backend(cfg.tracker, Path(run_dir), config, saved, step)
    return continued.tracker


class TrackerRun:
    """The tracker run a checkpoint continues: the object behind training_state/tracker.json, a
    checkpoint part (`robotrain.checkpoint.Json`, optional). A resume loads the saved run into
    it before the tracker starts; a save asks the started tracker."""

    def __init__(self) -> None:
        self.saved: dict | None = None
        self.tracker: Tracker | None = None

    def state_dict(self) -> dict | None:
        return self.tracker.run_state() if self.tracker is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        self.saved = state


def adapter_config(model) -> dict[str, Any] | None:
    """A PEFT model's adapter config as JSON data (what adapter_config.json holds); None otherwise."""
    from robotrain import peft

    if model is None or not peft.is_adapted(model):
        return None
    return json.loads(json.dumps(model.peft_config["default"].to_dict(), default=_jsonable))


class Tracker:
    """The interface, logging nothing: `tracker=none`, and every process but the main one."""

    name = "none"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars at optimizer step `step`; bare names go under `train/`."""

    def log_video(self, step: int, key: str, path: Path) -> None:
        """A GIF file (an evaluation episode) at optimizer step `step`."""

    def run_state(self) -> dict[str, Any] | None:
        """What a resumed run needs to continue this tracker run (training_state/tracker.json)."""
        return None

    def close(self) -> None:
        """Flush and finish the run."""


class _TensorBoard(Tracker):
    """Event files in `<run_dir>/tensorboard/`, or `<tracker.dir>/<run_name or run dir name>/`."""

    name = "tensorboard"

    def __init__(self, cfg, run_dir: Path, config: dict, saved: dict | None, step: int):
        writer_cls = _import("tensorboard").SummaryWriter
        self.folder = Path(cfg.dir) / (cfg.run_name or run_dir.name) if cfg.dir else run_dir / "tensorboard"
        # Resuming at `step`: hide anything a crashed attempt logged after it.
        self.writer = writer_cls(str(self.folder), purge_step=step + 1 if step else None)
        adapter = config.pop("adapter_config", None)
        self.writer.add_text("config", _markdown_json(config), step)
        if adapter is not None:
            self.writer.add_text("adapter_config", _markdown_json(adapter), step)
        log.info("tensorboard: logging to %s (view with: tensorboard --logdir %s)", self.folder, self.folder)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in _named(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_video(self, step: int, key: str, path: Path) -> None:
        # TensorBoard's image dashboard plays an animated GIF: the same summary `add_video`
        # writes, without re-encoding the frames (add_video needs moviepy for that).
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        with Image.open(path) as image:
            width, height = image.size
        encoded = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=Path(path).read_bytes())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=key, image=encoded)]), step)

    def close(self) -> None:
        self.writer.close()


class _Wandb(Tracker):
    """A wandb run (online, or offline under `<dir>/wandb/offline-run-*`), continued on resume by its id."""

    name = "wandb"

    def __init__(self, cfg, run_dir: Path, config: dict, saved: dict | None, step: int):
        self.wandb = wandb = _import("wandb")
        self.project = cfg.project
        run_id = saved["run_id"] if saved is not None else None  # None: wandb makes a new id
        directory = cfg.dir or (None if os.environ.get("WANDB_DIR") else str(run_dir))
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name, id=run_id,
                                  resume="allow", mode=cfg.mode, dir=directory, config=config)
        except Exception as err:  # no API key, no network, bad entity...: say so in one line
            raise UserError(f"wandb could not start the run ({_first_line(err)}); run `wandb login`, "
                            "or log offline with tracker.mode=offline and `wandb sync` later") from None
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        log.info("wandb: run %s of project %s%s", self.run.id, cfg.project, " (resumed)" if saved is not None else "")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"train/step": step, **_named(metrics)})

    def log_video(self, step: int, key: str, path: Path) -> None:
        self.run.log({"train/step": step, key: self.wandb.Video(str(path), format="gif")})

    def run_state(self) -> dict[str, Any]:
        return {"name": self.name, "project": self.project, "run_id": self.run.id}

    def close(self) -> None:
        self.run.finish()


class _Trackio(Tracker):
    """A run in trackio's local database ($TRACKIO_DIR/<project>.db), continued on resume by its name."""

    name = "trackio"

    def __init__(self, cfg, run_dir: Path, config: dict, saved: dict | None, step: int):
        self.trackio = trackio = _import("trackio")
        self.project = cfg.project
        name = saved["run_name"] if saved is not None else cfg.run_name
        said = io.StringIO()  # trackio prints a banner; one log line says the same
        try:
            with contextlib.redirect_stdout(said):
                self.run = trackio.init(project=cfg.project, name=name, resume="allow" if saved else "never",
                                        config=config, embed=False)
        except Exception as err:
            raise UserError(f"trackio could not start the run ({_first_line(err)}); check tracker.project") from None
        log.info("trackio: run %s of project %s%s in %s (view with: trackio show --project %s)", self.run.name,
                 cfg.project, " (resumed)" if saved is not None else "", trackio.utils.TRACKIO_DIR, cfg.project)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(_named(metrics), step=step)

    def log_video(self, step: int, key: str, path: Path) -> None:
        self.run.log({key: self.trackio.Video(str(path), format="gif")}, step=step)

    def run_state(self) -> dict[str, Any]:
        return {"name": self.name, "project": self.project, "run_name": self.run.name}

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.trackio.finish()


def _import(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as err:
        raise UserError(f"tracker={name} needs the {name} package ({_first_line(err)}): "
                        "pip install 'robotrain[trackers]'") from None


def _named(metrics: dict[str, float]) -> dict[str, float]:
    return {key if "/" in key else f"train/{key}": value for key, value in metrics.items()}


def _markdown_json(data: dict) -> str:
    """JSON in a code block: TensorBoard's text dashboard renders markdown."""
    return "```json\n" + json.dumps(data, indent=2, default=str) + "\n```"


def _jsonable(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
