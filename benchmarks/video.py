"""Video datasets: robotrain's batched MP4 reads against LeRobot 0.6.1's per-item path, worker
memory over an epoch, and data-loader wait in training, measured side by side in one run.

    python benchmarks/video.py [--quick] [--workdir DIR] [--only throughput memory train]

Datasets are generated once with `robotrain.data.writing.write_dataset` (AV1 MP4 with
LeRobot's encoder settings; deterministic drifting gradients, a texture and moving shapes) into
`--workdir` (default `<tmp>/robotrain-bench-video`) and reused by later runs; the reference
dataset written by LeRobot 0.6.1 is tests/data/lerobot_v3_video. Default run ~8 min on 2 cores
the first time (~2 min writing datasets), `--quick` ~2 min.

1. Throughput: samples/s through a plain `torch.utils.data.DataLoader` (batch_size=16,
   shuffle=True, num_workers=2, persistent_workers=True) of
   - robotrain: `robotrain.data.LeRobotDataset`, float32 frames (`return_uint8=False`) as the
     baseline returns them; the DataLoader calls its `__getitems__`, which decodes each MP4 once
     per batch, frames sorted by time. Also shown, not in the ratio: `return_uint8=True`.
   - lerobot: `LeRobotPerItem` below, LeRobot 0.6.1's `DatasetReader.get_item` item by item: per
     camera a torchcodec `VideoDecoder(path, seek_mode="approximate")` cached per file and worker
     (its `VideoDecoderCache`, 100 decoders), `get_frames_at(indices=[round(ts * fps)])` per
     sample and camera, the tolerance check, `(frames / 255.0).type(torch.float32)` in the
     worker, and with several cameras a new `ThreadPoolExecutor(max_workers=n_cameras)` per item.
     State/action come from numpy arrays on both sides (LeRobot's Hugging Face `datasets` reads
     cost more), so the comparison is about video. LeRobot opens each file through an fsspec
     file object; the baseline passes the path unless `--fsspec`.
   on (a) the reference dataset (64x64, 2 cameras; delta_timestamps: cameras [-1/15, 0], action
   10 frames) and (b) a generated 240x320 3-camera dataset (`--episodes` x 60 frames at 15 fps,
   the same delta_timestamps). Each round runs every loader in turn (alternating the order),
   each after every worker has gone idle, so that one loader's prefetching never overlaps
   another's timing: `--warmup` untimed batches, then at least `--batches` timed batches and
   `--min-seconds`. Headline: the median over rounds of robotrain/lerobot (target >= 2x).
   Before timing, one batch read by each side is checked to be equal, key by key.
2. Memory: every DataLoader worker's RSS (psutil; the main process' children), sampled every
   `--rss-interval` s over `--memory-epochs` full epochs (default one) of a generated
   200-episode 96x96 2-camera dataset (30 frames per episode, same loader and
   delta_timestamps as 1), its MP4s rolled over at 0.02 MB so that it has more files (~120)
   than robotrain's decoder cache keeps open (100 by default; `--decoder-cache`): decoders are
   evicted and reopened all epoch long. Flat (PASS)
   when, for every worker, the mean of the last 10 % of samples is within 10 % of the mean of
   the first 10 %; the means of each tenth show the trend. `--memory-baseline` samples the
   lerobot baseline's workers too (reported, not judged).
3. Data wait: tiny ACT (dim_model 64, 4 heads, feed-forward 256, chunk 10, resnet18 without
   pretrained weights) trained on dataset (b) through the CLI in a subprocess (num_workers=2,
   OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1, no eval); `data_wait_frac` of the last window of
   `<run dir>/metrics.jsonl` (the first window holds worker start-up), target <= 5 %.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_list, median, use_benchmark_cache  # noqa: E402

use_benchmark_cache()

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from robotrain.data.metadata import load_meta  # noqa: E402
from robotrain.data.reading import LeRobotDataset  # noqa: E402
from robotrain.data.video import DEFAULT_DECODER_CACHE_SIZE  # noqa: E402
from robotrain.data.writing import write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "data" / "lerobot_v3_video"
BATCH_SIZE = 16
NUM_WORKERS = 2


# --------------------------------------------------------------------------------------------
# Generated datasets
# --------------------------------------------------------------------------------------------


def _frames(episode: int, camera: int, length: int, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3): a drifting colour gradient, a fixed texture and two moving shapes;
    a pure function of its arguments."""
    t = np.arange(length, dtype=np.float32)[:, None, None]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy[None] / height, xx[None] / width
    phase = 0.3 * episode + 1.7 * camera
    texture = np.random.default_rng(1000 * camera + 7).integers(0, 24, (height, width), dtype=np.uint8)
    out = np.empty((length, height, width, 3), dtype=np.uint8)
    for channel in range(3):
        wave = np.sin(2 * np.pi * (xx + 0.5 * yy + 0.02 * t + phase + channel / 3))
        out[..., channel] = (100 + 70 * wave).astype(np.uint8) + texture
    cx = (0.5 + 0.35 * np.sin(0.1 * t[:, 0, 0] + phase)) * width
    cy = (0.5 + 0.35 * np.cos(0.13 * t[:, 0, 0] + phase)) * height
    size = max(3, min(height, width) // 8)
    rows, cols = np.mgrid[0:height, 0:width]
    for i in range(length):  # a red square, and a green disc moving the other way
        y0, x0 = int(cy[i]) - size // 2, int(cx[i]) - size // 2
        out[i, max(0, y0): y0 + size, max(0, x0): x0 + size] = (230, 40, 40)
        out[i][(rows - (height - cy[i])) ** 2 + (cols - (width - cx[i])) ** 2 < size**2] = (30, 200, 60)
    return out


def _episodes(num: int, length: int, height: int, width: int, cameras: int) -> Iterator[dict]:
    for e in range(num):
        t = np.arange(length, dtype=np.float32)[:, None] / 10 + e
        joints = np.sin(t + np.arange(6, dtype=np.float32)).astype(np.float32)
        episode = {"observation.state": joints, "action": np.roll(joints, -1, axis=0), "task": f"task {e % 3}"}
        for c in range(cameras):
            episode[f"observation.images.cam{c}"] = _frames(e, c, length, height, width)
        yield episode


def ensure_video_dataset(workdir: Path, episodes: int, length: int, height: int, width: int, cameras: int,
                         fps: int, video_file_mb: float | None = None) -> Path:
    """A generated video dataset under `workdir`, named after its parameters, written once."""
    name = f"ep{episodes}x{length}-{height}x{width}-cam{cameras}-fps{fps}" + (
        f"-files{video_file_mb:g}mb" if video_file_mb else "")
    root = workdir / name
    if (root / "meta" / "info.json").is_file():
        return root
    features = {
        "observation.state": {"dtype": "float32", "shape": [6], "names": [f"j{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": [6], "names": [f"j{i}" for i in range(6)]},
        **{f"observation.images.cam{c}": {"dtype": "video", "shape": [height, width, 3],
                                          "names": ["height", "width", "channels"]} for c in range(cameras)},
    }
    extra = {"video_files_size_in_mb": video_file_mb} if video_file_mb else {}
    t0 = time.perf_counter()
    write_dataset(root, repo_id=f"bench/{name}", fps=fps, features=features,
                  episodes=_episodes(episodes, length, height, width, cameras), **extra)
    print(f"  (wrote {root} in {time.perf_counter() - t0:.0f} s)", flush=True)
    return root


# --------------------------------------------------------------------------------------------
# The baseline: LeRobot 0.6.1's per-item video path
# --------------------------------------------------------------------------------------------


class _DecoderCache:
    """LeRobot's VideoDecoderCache: an LRU of torchcodec decoders (100 by default), per process."""

    def __init__(self, max_size: int = 100, use_fsspec: bool = False):
        self.max_size, self.use_fsspec = max_size, use_fsspec
        self._cache: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get_decoder(self, path: str):
        from torchcodec.decoders import VideoDecoder

        with self._lock:
            if self._pid != os.getpid():  # a forked worker never touches its parent's decoders
                self._cache, self._pid = OrderedDict(), os.getpid()
            entry = self._cache.get(path)
            if entry is not None:
                self._cache.move_to_end(path)
                return entry[0]
            if self.use_fsspec:
                import fsspec

                handle = fsspec.open(path).__enter__()
                decoder = VideoDecoder(handle, seek_mode="approximate")
            else:
                handle, decoder = None, VideoDecoder(path, seek_mode="approximate")
            self._cache[path] = (decoder, handle)
            while len(self._cache) > self.max_size:
                _, (_, old) = self._cache.popitem(last=False)
                if old is not None:
                    old.close()
            return decoder


def _decode_torchcodec(cache: _DecoderCache, path: str, timestamps: list[float], tolerance_s: float) -> torch.Tensor:
    """LeRobot 0.6.1's decode_video_frames_torchcodec (return_uint8=False)."""
    decoder = cache.get_decoder(path)
    average_fps = decoder.metadata.average_fps
    frames_batch = decoder.get_frames_at(indices=[round(ts * average_fps) for ts in timestamps])
    loaded_frames, loaded_ts = [], []
    for frame, pts in zip(frames_batch.data, frames_batch.pts_seconds, strict=True):
        loaded_frames.append(frame)
        loaded_ts.append(pts.item())
    query_ts, loaded = torch.tensor(timestamps), torch.tensor(loaded_ts)
    min_, argmin_ = torch.cdist(query_ts[:, None], loaded[:, None], p=1).min(1)
    if not (min_ < tolerance_s).all():
        raise ValueError(f"frames of {path} at {loaded_ts} are not within {tolerance_s} s of {timestamps}")
    closest = torch.stack([loaded_frames[i] for i in argmin_])
    return (closest / 255.0).type(torch.float32)


class LeRobotPerItem(torch.utils.data.Dataset):
    """What LeRobot 0.6.1's `LeRobotDataset[idx]` does per item (DatasetReader.get_item with
    `_query_videos`), over the whole dataset; non-video columns are numpy arrays."""

    def __init__(self, root: Path, delta_timestamps: dict[str, list[float]], tolerance_s: float = 1e-4,
                 use_fsspec: bool = False):
        self.meta = meta = load_meta(root)
        self.tolerance_s = tolerance_s
        self.delta_indices = {k: [round(d * meta.fps) for d in v] for k, v in delta_timestamps.items()}
        reader = LeRobotDataset("bench/baseline", root, meta=meta)  # only to load the parquet columns
        frames = reader._data()
        self.arrays = {k: v for k, v in frames.arrays.items() if v.dtype != object}
        self.keys = [k for k in meta.features if meta.features[k]["dtype"] != "video"]
        position = {int(e): p for p, e in enumerate(meta.episode_index)}
        self.episode_pos = np.array([position[int(e)] for e in self.arrays["episode_index"]])
        self.video_keys = meta.video_keys
        self.decoders = _DecoderCache(use_fsspec=use_fsspec)

    def __len__(self) -> int:
        return len(self.arrays["index"])

    def __getitem__(self, idx: int) -> dict:
        meta = self.meta
        item = {k: torch.tensor(self.arrays[k][idx]) for k in self.keys}  # hf_dataset[idx]
        pos = int(self.episode_pos[idx])
        abs_idx = int(item["index"])
        ep_start, ep_end = int(meta.episode_from[pos]), int(meta.episode_to[pos])
        query = {k: [max(ep_start, min(ep_end - 1, abs_idx + d)) for d in deltas]
                 for k, deltas in self.delta_indices.items()}
        for key, deltas in self.delta_indices.items():
            item[f"{key}_is_pad"] = torch.BoolTensor([(abs_idx + d < ep_start) | (abs_idx + d >= ep_end)
                                                      for d in deltas])
            if key not in self.video_keys:
                item[key] = torch.stack([torch.tensor(self.arrays[key][i]) for i in query[key]])
        stamps = {k: [float(self.arrays["timestamp"][i]) for i in query[k]] if k in query
                  else [float(item["timestamp"])] for k in self.video_keys}
        item = {**self._query_videos(stamps, pos), **item}
        item["task"] = meta.tasks[int(item["task_index"])]
        return item

    def _query_videos(self, query_timestamps: dict[str, list[float]], pos: int) -> dict[str, torch.Tensor]:
        def decode_single(key: str, query_ts: list[float]) -> tuple[str, torch.Tensor]:
            files, starts = self.meta.episode_videos[key]
            shifted = [float(starts[pos]) + ts for ts in query_ts]
            path = str(self.meta.root / files[pos])
            return key, _decode_torchcodec(self.decoders, path, shifted, self.tolerance_s).squeeze(0)

        items = list(query_timestamps.items())
        if len(items) <= 1:
            return {key: decode_single(key, ts)[1] for key, ts in items}
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(items)) as pool:  # one per item, as LeRobot
            futures = [pool.submit(decode_single, k, ts) for k, ts in items]
            return dict(f.result() for f in futures)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def make_loader(dataset, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=NUM_WORKERS,
                      persistent_workers=True, generator=torch.Generator().manual_seed(seed))


def _forever(loader: DataLoader) -> Iterator[dict]:
    """Batches across epochs (a short dataset ends inside a timed span)."""
    while True:
        yield from loader


def wait_workers_idle(quiet_s: float = 0.3, timeout_s: float = 60.0) -> None:
    """Block until no child process used CPU for `quiet_s` (prefetching finished)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        total = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                cpu = child.cpu_times()
                total += cpu.user + cpu.system
            except psutil.Error:
                pass
        if last is not None and total - last < 0.01:
            return
        last = total
        time.sleep(quiet_s)


def samples_per_s(batches: Iterator[dict], warmup: int, timed: int, min_seconds: float) -> float:
    """Throughput over at least `timed` batches and `min_seconds`, after `warmup` batches."""
    for _ in range(warmup):
        next(batches)
    t0 = time.perf_counter()
    samples, n, elapsed = 0, 0, 0.0
    while n < timed or elapsed < min_seconds:
        samples += len(next(batches)["index"])
        n, elapsed = n + 1, time.perf_counter() - t0
    return samples / elapsed


def check_same(ours, base, indices: list[int]) -> None:
    """One batch read by both sides, in a worker (decoding in the main process before forking is
    what LeRobot warns against): same keys, equal values."""
    def one_batch(dataset):
        loader = DataLoader(dataset, batch_sampler=[indices], num_workers=1)
        return next(iter(loader))

    a, b = one_batch(ours), one_batch(base)
    if set(a) != set(b):
        raise SystemExit(f"robotrain and baseline items differ in keys: {sorted(set(a) ^ set(b))}")
    for key in a:
        same = a[key] == b[key] if isinstance(a[key], list) else torch.equal(a[key], b[key])
        if not same:
            raise SystemExit(f"robotrain and baseline differ at {key!r} for indices {indices}")


def bench_throughput(label: str, root: Path, delta_timestamps: dict, args) -> float:
    """Part 1 on one dataset; returns the headline ratio robotrain/lerobot."""
    base = LeRobotPerItem(root, delta_timestamps, use_fsspec=args.fsspec)
    ours = LeRobotDataset(f"bench/{root.name}", root, delta_timestamps=delta_timestamps, return_uint8=False)
    check_same(ours, base, sorted(np.random.default_rng(0).choice(len(ours), BATCH_SIZE, replace=False).tolist()))
    sides: dict[str, Iterator[dict]] = {
        "robotrain": _forever(make_loader(ours)),
        "lerobot": _forever(make_loader(base)),
    }
    if not args.no_uint8:
        uint8 = LeRobotDataset(f"bench/{root.name}", root, delta_timestamps=delta_timestamps, return_uint8=True)
        sides["robotrain uint8"] = _forever(make_loader(uint8))
    names = list(sides)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            wait_workers_idle()
            warmup = args.warmup + (2 if round_ == 0 else 0)  # worker start, first decoders
            results[name].append(samples_per_s(sides[name], warmup, args.batches, args.min_seconds))
    del sides
    ratio = median([a / b for a, b in zip(results["robotrain"], results["lerobot"])])
    meta = ours.meta
    shape = meta.features[meta.video_keys[0]]["shape"]
    print(f"throughput {label} ({meta.num_frames} frames, {len(meta.video_keys)} cameras "
          f"{shape[0]}x{shape[1]}): robotrain/lerobot = {ratio:.2f}x (target >= 2x)")
    for name in names:
        print(f"    {name:16s} median {median(results[name]):7.1f} samples/s; per round "
              f"{fmt_list(results[name], '.1f')}")
    return ratio


class RssSampler:
    """Samples the RSS of every child process of this one on a thread, every `interval` s."""

    def __init__(self, interval: float):
        self.interval = interval
        self.samples: dict[int, list[int]] = {}
        self._before = {p.pid for p in psutil.Process().children()}  # not this loader's workers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children():
                if child.pid in self._before:
                    continue
                try:
                    self.samples.setdefault(child.pid, []).append(child.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)


def _epochs_rss(dataset, epochs: int, interval: float) -> tuple[dict[int, list[int]], int, float]:
    """Every worker's RSS samples over `epochs` full epochs (persistent workers), batches, seconds."""
    loader = make_loader(dataset)
    t0 = time.perf_counter()
    with RssSampler(interval) as sampler:
        batches = sum(1 for _ in range(epochs) for _ in loader)
    seconds = time.perf_counter() - t0
    del loader
    return {pid: rss for pid, rss in sampler.samples.items() if len(rss) >= 10}, batches, seconds


def bench_memory(root: Path, delta_timestamps: dict, args) -> bool:
    """Part 2: worker RSS over a full epoch; PASS when every worker's memory is flat."""
    cache = args.decoder_cache or DEFAULT_DECODER_CACHE_SIZE
    sides = {"robotrain": LeRobotDataset(f"bench/{root.name}", root, delta_timestamps=delta_timestamps,
                                         decoder_cache_size=cache)}
    if args.memory_baseline:
        sides["lerobot"] = LeRobotPerItem(root, delta_timestamps)
    meta = sides["robotrain"].meta
    files = len({f for files, _ in meta.episode_videos.values() for f in files})
    print(f"memory: {meta.num_episodes} episodes / {meta.num_frames} frames, {len(meta.video_keys)} cameras, "
          f"{files} MP4 files; robotrain decoder_cache_size={cache}, lerobot's cache 100; {args.memory_epochs} "
          f"epoch(s), worker RSS every {args.rss_interval} s")
    flat = True
    for name, dataset in sides.items():
        samples, batches, seconds = _epochs_rss(dataset, args.memory_epochs, args.rss_interval)
        print(f"    {name}: {batches} batches in {seconds:.0f} s")
        if not samples:
            print("    no worker was sampled: FAIL")
            flat = False
        for pid, rss in sorted(samples.items()):
            tenth = max(1, len(rss) // 10)
            first, last = statistics.fmean(rss[:tenth]), statistics.fmean(rss[-tenth:])
            ok = abs(last - first) <= 0.1 * first
            flat &= ok or name != "robotrain"
            deciles = [statistics.fmean(rss[i * tenth:(i + 1) * tenth]) / 2**20 for i in range(10)]
            print(f"      worker {pid}: first 10% {first / 2**20:.0f} MB, last 10% {last / 2**20:.0f} MB "
                  f"({100 * (last / first - 1):+.1f}%), peak {max(rss) / 2**20:.0f} MB {'PASS' if ok else 'FAIL'}; "
                  f"by tenths {fmt_list(deciles, '.0f')} MB")
    print(f"    robotrain memory flat (last 10% within 10% of first 10%): {'PASS' if flat else 'FAIL'}")
    return flat


def bench_data_wait(root: Path, workdir: Path, args) -> float | None:
    """Part 3: tiny ACT through the CLI; data_wait_frac of the last logged window."""
    run_dir = Path(tempfile.mkdtemp(prefix="act-run-", dir=workdir))
    overrides = [
        "policy=act", "policy.dim_model=64", "policy.n_heads=4", "policy.dim_feedforward=256",
        "policy.chunk_size=10", "policy.n_action_steps=5", "policy.pretrained_backbone_weights=null",
        "dataset=local", "dataset.repo_id=bench/video240", f"dataset.root={root}",
        f"batch_size={args.act_batch_size}", f"num_workers={NUM_WORKERS}", f"steps={args.act_steps}",
        f"log_every={args.act_log_every}", "eval.enabled=false", "checkpoint.every=0", "checkpoint.fsync=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ROBOTRAIN_CACHE": str(workdir / "cache")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "robotrain", *overrides], env=env, cwd=REPO,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        metrics_path = run_dir / "metrics.jsonl"
        if proc.returncode != 0 or not metrics_path.is_file():
            print(f"data wait: training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            return None
        lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    windows = [m for m in lines if "data_wait_frac" in m]
    if not windows:
        print(f"data wait: no data_wait_frac in {metrics_path}")
        return None
    last = windows[-1]
    print(f"data wait: tiny ACT, batch {args.act_batch_size}, num_workers={NUM_WORKERS}, {args.act_steps} steps "
          f"({seconds:.0f} s): data_wait_frac {100 * last['data_wait_frac']:.1f}% at step {last['step']} "
          f"(target <= 5%), {last['steps_per_s']:.2f} steps/s")
    print(f"    every window: {fmt_list([100 * m['data_wait_frac'] for m in windows], '.1f')} % at steps "
          f"{[m['step'] for m in windows]}")
    return last["data_wait_frac"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller datasets and fewer batches (~3 min)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "robotrain-bench-video",
                        help="generated datasets (kept for later runs) and scratch run folders")
    parser.add_argument("--only", nargs="+", choices=["throughput", "memory", "train"],
                        default=["throughput", "memory", "train"])
    parser.add_argument("--rounds", type=int, help="interleaved rounds per dataset (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per round")
    parser.add_argument("--batches", type=int, help="timed batches per round (default 30, quick 12)")
    parser.add_argument("--min-seconds", type=float, help="and at least this long (default 4, quick 2)")
    parser.add_argument("--episodes", type=int, help="episodes of the 240x320 dataset (default 50, quick 20)")
    parser.add_argument("--memory-episodes", type=int, help="episodes of the memory dataset (default 200)")
    parser.add_argument("--memory-epochs", type=int, default=1, help="epochs the RSS is sampled over")
    parser.add_argument("--decoder-cache", type=int, help="robotrain's decoder_cache_size in part 2 (default: its own)")
    parser.add_argument("--memory-baseline", action="store_true", help="also sample the lerobot baseline's workers")
    parser.add_argument("--rss-interval", type=float, default=0.02, help="seconds between RSS samples")
    parser.add_argument("--act-steps", type=int, help="ACT training steps (default 60, quick 20)")
    parser.add_argument("--act-log-every", type=int, help="steps per metrics window (default 20, quick 10)")
    parser.add_argument("--act-batch-size", type=int, help="ACT batch size (default 8, quick 4)")
    parser.add_argument("--no-uint8", action="store_true", help="skip the return_uint8=True loader")
    parser.add_argument("--fsspec", action="store_true", help="baseline opens files through fsspec, as LeRobot")
    args = parser.parse_args()
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 3)
    args.batches = args.batches or (12 if quick else 30)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (2.0 if quick else 4.0)
    args.episodes = args.episodes or (20 if quick else 50)
    args.memory_episodes = args.memory_episodes or 200
    args.act_steps = args.act_steps or (20 if quick else 60)
    args.act_batch_size = args.act_batch_size or (4 if quick else 8)
    args.act_log_every = args.act_log_every or (10 if quick else 20)
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the main process only collects batches; workers run single-threaded anyway

    fps = 15
    big = None
    if "throughput" in args.only or "train" in args.only:
        big = ensure_video_dataset(args.workdir, args.episodes, 60, 240, 320, 3, fps)
    cams = lambda root: load_meta(root).video_keys  # noqa: E731
    chunk = {"action": [k / fps for k in range(10)]}
    if "throughput" in args.only:
        history = {key: [-1 / fps, 0.0] for key in cams(REFERENCE)}
        bench_throughput("reference 64x64", REFERENCE, {**history, **chunk}, args)
        history = {key: [-1 / fps, 0.0] for key in cams(big)}
        bench_throughput("240x320", big, {**history, **chunk}, args)
    if "memory" in args.only:
        small = ensure_video_dataset(args.workdir, args.memory_episodes, 30, 96, 96, 2, fps, video_file_mb=0.02)
        history = {key: [-1 / fps, 0.0] for key in cams(small)}
        bench_memory(small, {**history, **chunk}, args)
    if "train" in args.only:
        bench_data_wait(big, args.workdir, args)


if __name__ == "__main__":
    main()
