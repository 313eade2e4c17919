"""MP4 cameras of LeRobot video datasets: decoding, a bounded decoder cache, and the encoder.

Decoding
- Two backends behind one small interface (`_VideoFile.frames_at(indices)` -> uint8 NCHW
  frames and their presentation times): **torchcodec** (the default; LeRobot's default too,
  through the system's FFmpeg 4-8 shared libraries) and **PyAV** (bundles its own FFmpeg with
  dav1d). A file torchcodec cannot open is retried with PyAV once, with a warning.
- `VideoColumn.take(rows)` is the batched path: it collects every frame a whole batch needs,
  groups them by file, sorts them by time and asks each file once, instead of one decoder call
  per sample and camera (LeRobot 0.6.1). Frames that share keyframes are decoded once; random
  samples of AV1 with LeRobot's keyframe every 2 frames share few, so at larger frame sizes the
  decoding itself dominates (see benchmarks/video.py).
- Frames are matched to the query times as LeRobot does: frame index `round(t * fps)`, then the
  decoded frame's timestamp must be within `tolerance_s` of the query (else a one-line error
  naming the episode, camera and times). The check is done in float64; LeRobot compares in
  float32, which cannot resolve 1e-4 s past ~500 s into a concatenated file.
- Decoders are cached per process in an LRU bounded by count and by (estimated) bytes, and the
  memory evicted decoders free is handed back to the OS, so memory stays flat over an epoch
  however many files a dataset has (FFmpeg/torchcodec keep ~4 KB per reopened file). A forked
  DataLoader worker never uses its parent's decoders (FFmpeg state does not survive a fork).

Encoding
- `VideoEncoder` writes one camera's frames as LeRobot 0.6.1 does: libsvtav1, yuv420p, g=2,
  crf=30, preset 12 (`fast-decode=0`); where PyAV lacks libsvtav1 it falls back to libaom-av1,
  then h264, with a warning. `encoder_info` is the `features[key]["info"]` block of info.json.

Decoding on the GPU: `device="cuda"` gives torchcodec's NVDEC decoder (CUDA torch and the CUDA
torchcodec build); frames then stay on the GPU, and the batched path is the same torch code
that runs on the CPU. CUDA cannot start in forked DataLoader workers, so decoding on the GPU
happens in the training process (the config refuses it with workers). Unverified without a
GPU: no test machine has one.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from robotrain.errors import UserError

log = logging.getLogger("robotrain")

BACKENDS = ("torchcodec", "pyav")
DEFAULT_BACKEND = "torchcodec"
DEFAULT_DECODER_CACHE_SIZE = 100  # LeRobot 0.6.1 keeps as many
DEFAULT_DECODER_CACHE_MB = 512.0
# A decoder holds decoded reference frames (AV1: up to 8 slots) plus frames in flight in its
# threads; this many frames' worth of YUV420 is the estimate its entry in the cache is charged.
_FRAMES_HELD_PER_DECODER = 16
# Evicted decoders between two returns of freed memory to the OS (`_release_freed_memory`).
_TRIM_EVERY = 16
_MALLOC_TRIM: Any = None
# PyAV decodes forward up to this many frames to reach the next requested one rather than seek.
_PYAV_MAX_FORWARD_FRAMES = 32

_INSTALL_HINT = "pip install 'robotrain[video]'"
_FFMPEG_HINT = ("install FFmpeg's shared libraries (Debian/Ubuntu: apt-get install ffmpeg), or set "
                "dataset.video_backend=pyav (PyAV bundles its own FFmpeg)")


def check_backend(backend: str | None) -> str:
    """The backend to decode with (None: the default), after checking that it loads here."""
    backend = backend or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise UserError(f"dataset.video_backend={backend!r} is not a video backend; choose one of {list(BACKENDS)}")
    if backend == "pyav":
        _import_av()
        return backend
    try:
        importlib.import_module("torchcodec.decoders")  # loads FFmpeg's shared libraries
    except ModuleNotFoundError:
        raise UserError(f"decoding video needs torchcodec or PyAV: {_INSTALL_HINT}, "
                        "or set dataset.video_backend=pyav") from None
    except (RuntimeError, OSError):  # torchcodec present, FFmpeg's shared libraries (4 to 8) absent
        raise UserError(f"torchcodec found no FFmpeg 4-8 shared libraries it can load: {_FFMPEG_HINT}") from None
    return backend


def check_device(device: str | torch.device, backend: str | None) -> str:
    """Where video frames are decoded: "cpu", or a CUDA device for torchcodec's NVDEC."""
    device = str(device)
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise UserError(f"video device {device!r} is not 'cpu' or 'cuda'; choose one of them")
    if backend == "pyav":
        raise UserError("PyAV decodes on the CPU only: use dataset.video_backend=torchcodec to decode on the GPU")
    if not torch.cuda.is_available():
        raise UserError(f"decoding video on {device!r} needs a CUDA GPU and CUDA torch; this machine has none — "
                        "use dataset.video_device=cpu")
    return device


def require_file(path: Path, key: str | None = None) -> None:
    """A one-line error unless the MP4 `path` (of camera `key`) exists."""
    if not path.is_file():
        of = f" of {key!r}" if key else ""
        raise UserError(f"video file {path}{of} is missing (meta/info.json's video_path names it); "
                        "re-download the dataset")


def _import_av():
    try:
        import av
    except ModuleNotFoundError:
        raise UserError(f"PyAV is not installed: {_INSTALL_HINT}") from None
    return av


# --------------------------------------------------------------------------------------------
# Backends: an open file that returns frames by index
# --------------------------------------------------------------------------------------------


class _VideoFile:
    """One open video stream. `frames_at` takes sorted, unique frame indices."""

    path: Path
    num_frames: int
    fps: float
    height: int
    width: int

    def frames_at(self, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """uint8 frames (N, 3, H, W) at `indices` and their timestamps in seconds (N,)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """What this decoder is charged in the cache (an estimate, see `_FRAMES_HELD_PER_DECODER`)."""
        return _FRAMES_HELD_PER_DECODER * self.height * self.width * 3 // 2

    def close(self) -> None:
        pass


class _TorchcodecFile(_VideoFile):
    def __init__(self, path: Path, device: str = "cpu"):
        from torchcodec.decoders import VideoDecoder

        self.path = path
        # "approximate": no scan of the whole file on open; frame indices come from the header.
        self.decoder = VideoDecoder(str(path), seek_mode="approximate", device=device)
        meta = self.decoder.metadata
        self.num_frames, self.fps = int(meta.num_frames), float(meta.average_fps)
        self.height, self.width = int(meta.height), int(meta.width)

    def frames_at(self, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        batch = self.decoder.get_frames_at(indices=indices.tolist())
        return batch.data, batch.pts_seconds.numpy().astype(np.float64)


class _PyAVFile(_VideoFile):
    def __init__(self, path: Path):
        av = _import_av()
        self.path = path
        self.container = av.open(str(path))
        if not self.container.streams.video:
            raise UserError(f"{path} has no video stream; re-download the dataset")
        self.stream = self.container.streams.video[0]
        if self.stream.codec_context is None:  # FFmpeg knows no decoder for the stream's codec tag
            raise UserError(f"{path} is in a video codec FFmpeg cannot decode; re-encode it as AV1 or H.264 "
                            "(LeRobot's encoder: libsvtav1)")
        # One thread, as torchcodec's default: data-loading parallelism comes from the workers, and a
        # decoder without threads can be freed in a forked child (dav1d's would wait on threads
        # that the fork did not copy, and hang the worker).
        self.stream.codec_context.thread_count = 1
        rate = self.stream.average_rate or self.stream.base_rate
        self.fps, self.time_base = float(rate), self.stream.time_base
        self.num_frames = int(self.stream.frames) or int(round(float(self.container.duration or 0) / 1e6 * self.fps))
        self.height, self.width = self.stream.codec_context.height, self.stream.codec_context.width
        self._frames: Any = None  # the decode iterator, positioned after `_next_time`
        self._next_time = float("inf")

    def frames_at(self, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        half_frame = 0.5 / self.fps
        out, times = [], []
        for index in indices.tolist():
            target = index / self.fps
            behind = target < self._next_time - half_frame
            if behind or target - self._next_time > _PYAV_MAX_FORWARD_FRAMES / self.fps:
                self._seek(target)
            frame = self._decode_until(target - half_frame)
            out.append(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1))
            times.append(float(frame.pts * self.time_base))
        return torch.stack(out), np.array(times, dtype=np.float64)

    def _seek(self, target: float) -> None:
        # One frame's margin before the target, to the keyframe at or before it.
        self.container.seek(max(0, round(target / self.time_base) - 1), backward=True, any_frame=False,
                            stream=self.stream)
        self._frames = self.container.decode(self.stream)
        self._next_time = 0.0

    def _decode_until(self, earliest: float):
        for frame in self._frames:
            if frame.pts is None:
                continue
            time = float(frame.pts * self.time_base)
            self._next_time = time + 1.0 / self.fps
            if time >= earliest:
                return frame
        self._next_time = float("inf")
        raise EOFError(f"no frame at or after {earliest:.4f} s")

    def close(self) -> None:
        self.container.close()


# --------------------------------------------------------------------------------------------
# The per-process decoder cache
# --------------------------------------------------------------------------------------------


#: Decoders a forked process inherited from its parent's caches, kept referenced so that they are
#: never freed (or used) in the child.
_INHERITED: list[OrderedDict] = []


class DecoderCache:
    """Open `_VideoFile`s, least recently used evicted first beyond `max_count` decoders or
    `max_bytes` (estimated). One per process: entries made before a fork are never reused."""

    def __init__(self, backend: str, max_count: int = DEFAULT_DECODER_CACHE_SIZE,
                 max_bytes: int = int(DEFAULT_DECODER_CACHE_MB * 2**20), device: str = "cpu"):
        self.backend, self.max_count, self.max_bytes = backend, max(1, max_count), max_bytes
        self.device = torch.device(device)  # where decoded frames are returned
        self._files: OrderedDict[Path, _VideoFile] = OrderedDict()
        self._bytes, self._evictions = 0, 0
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._files)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, path: Path) -> _VideoFile:
        with self._lock:
            if self._pid != os.getpid():  # a forked worker: start empty, leave the parent's alone
                _INHERITED.append(self._files)  # never freed here: FFmpeg state does not survive a fork
                self._files, self._bytes, self._pid = OrderedDict(), 0, os.getpid()
            video = self._files.get(path)
            if video is not None:
                self._files.move_to_end(path)
                return video
            video = self._open(path)
            self._files[path] = video
            self._bytes += video.nbytes
            while len(self._files) > 1 and (len(self._files) > self.max_count or self._bytes > self.max_bytes):
                _, evicted = self._files.popitem(last=False)
                self._bytes -= evicted.nbytes
                evicted.close()
                self._evictions += 1
                if self._evictions % _TRIM_EVERY == 0:
                    _release_freed_memory()
            return video

    def _open(self, path: Path) -> _VideoFile:
        require_file(path)
        try:
            if self.backend == "torchcodec":
                return _TorchcodecFile(path, str(self.device))
            return _PyAVFile(path)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder failure is reported the same way
            first = err
        if self.backend == "torchcodec":  # PyAV's own FFmpeg may know what the system's does not
            try:
                video = _PyAVFile(path)
                log.warning("torchcodec could not open %s (%s); decoding it with PyAV", path, _reason(first))
                return video
            except UserError:
                raise
            except Exception:  # noqa: BLE001
                pass
        raise UserError(f"cannot decode {path} ({_reason(first)}): the file is truncated, corrupt or in a codec "
                        "this FFmpeg lacks; re-download the dataset or re-encode the video (AV1 or H.264)")

    def close(self) -> None:
        with self._lock:
            for video in self._files.values():
                video.close()
            self._files.clear()
            self._bytes = 0


def _release_freed_memory() -> None:
    """Hand memory freed by closed decoders back to the OS (glibc only; elsewhere nothing).

    A decoder's buffers are many mid-sized allocations; opened and closed over and over (a
    dataset with more files than the cache holds, read in random order), glibc keeps the freed
    pages in its heaps and a worker's RSS grows epoch after epoch though nothing is leaked."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return text[:200]


# --------------------------------------------------------------------------------------------
# One camera of a dataset, read in batches
# --------------------------------------------------------------------------------------------


@dataclass
class VideoColumn:
    """Where each frame row of one camera lives: its file and its time in that file."""

    key: str
    root: Path
    files: list[str]  # relative MP4 paths of this camera
    row_file: np.ndarray  # int (N,): row -> index into `files`
    row_time: np.ndarray  # float64 (N,): the episode's from_timestamp + the row's timestamp
    row_episode: np.ndarray  # int64 (N,): for error messages
    shape: tuple[int, int, int]  # (H, W, C) as info.json says

    def take(self, rows: np.ndarray, cache: DecoderCache, tolerance_s: float) -> torch.Tensor:
        """uint8 frames (*rows.shape, C, H, W) at `rows` on the decoders' device, each file
        decoded once, in time order."""
        flat = rows.reshape(-1)
        unique, inverse = np.unique(flat, return_inverse=True)
        height, width, channels = self.shape
        frames = torch.empty((len(unique), channels, height, width), dtype=torch.uint8, device=cache.device)
        order = np.lexsort((self.row_time[unique], self.row_file[unique]))  # by file, then by time
        files = self.row_file[unique][order]
        for start, stop in _runs(files):
            picked = order[start:stop]
            decoded = self._decode(int(files[start]), unique[picked], cache, tolerance_s)
            frames[torch.from_numpy(picked)] = decoded.to(cache.device)  # a PyAV fallback decodes on the CPU
        return frames[torch.from_numpy(inverse)].reshape(*rows.shape, channels, height, width)

    def _decode(self, file: int, rows: np.ndarray, cache: DecoderCache, tolerance_s: float) -> torch.Tensor:
        video = cache.get(self.root / self.files[file])
        times = self.row_time[rows]
        indices = np.round(times * video.fps).astype(np.int64)  # LeRobot's frame index for a time
        beyond = indices >= video.num_frames
        if beyond.any():
            row = rows[np.argmax(beyond)]
            raise UserError(
                f"episode {int(self.row_episode[row])} needs frame {int(indices[beyond].max())} of {video.path} "
                f"({self.key}), which has {video.num_frames} frames: the video is shorter than the episode "
                "the metadata describes; re-download or re-encode the dataset")
        wanted, position = np.unique(indices, return_inverse=True)
        try:
            decoded, pts = video.frames_at(wanted)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a decoder failing mid-file is a damaged file
            raise UserError(f"decoding {video.path} failed ({_reason(err)}): the file is truncated or corrupt; "
                            "re-download the dataset") from None
        self._check_times(times, pts[position], rows, video.path, tolerance_s)
        pixels = decoded[torch.from_numpy(position)]
        if tuple(pixels.shape[1:]) != (self.shape[2], self.shape[0], self.shape[1]):
            raise UserError(f"{video.path} holds {pixels.shape[2]}x{pixels.shape[3]} frames, not "
                            f"{self.shape[0]}x{self.shape[1]} as info.json says for {self.key}; fix the dataset")
        return pixels

    def _check_times(self, wanted: np.ndarray, got: np.ndarray, rows: np.ndarray, path: Path,
                     tolerance_s: float) -> None:
        off = np.abs(got - wanted) >= tolerance_s  # LeRobot keeps frames strictly within tolerance
        if off.any():
            i = int(np.argmax(off))
            raise UserError(
                f"episode {int(self.row_episode[rows[i]])}, {self.key}: the frame for t={wanted[i]:.6f} s in {path} "
                f"is at {got[i]:.6f} s, {abs(got[i] - wanted[i]):.6f} s away (tolerance_s={tolerance_s}): video and "
                "data timestamps disagree; raise dataset.tolerance_s or re-encode the episode")


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal values in a sorted array."""
    if len(values) == 0:
        return []
    edges = np.flatnonzero(values[1:] != values[:-1]) + 1
    bounds = [0, *edges.tolist(), len(values)]
    return list(zip(bounds[:-1], bounds[1:]))


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

#: LeRobot 0.6.1's default RGB encoder settings.
LEROBOT_ENCODER = {"vcodec": "libsvtav1", "pix_fmt": "yuv420p", "g": 2, "crf": 30, "preset": 12, "fast_decode": 0}
_FALLBACK_CODECS = ("libaom-av1", "libx264")


def pick_codec() -> str:
    """libsvtav1 where PyAV has it; else libaom-av1, else H.264, with a warning."""
    av = _import_av()
    for codec in (LEROBOT_ENCODER["vcodec"], *_FALLBACK_CODECS):
        if codec in av.codecs_available:
            if codec != LEROBOT_ENCODER["vcodec"]:
                log.warning("PyAV has no libsvtav1 encoder: writing videos with %s instead", codec)
            return codec
    raise UserError("PyAV has none of the encoders libsvtav1, libaom-av1, libx264: reinstall PyAV from PyPI "
                    f"({_INSTALL_HINT})")


def _codec_options(codec: str) -> dict[str, str]:
    options = {"g": str(LEROBOT_ENCODER["g"]), "crf": str(LEROBOT_ENCODER["crf"])}
    if codec == "libsvtav1":
        options.update(preset=str(LEROBOT_ENCODER["preset"]), **{"svtav1-params": "fast-decode=0"})
    return options


class VideoEncoder:
    """Appends frames of one camera to an MP4 file; frame n is at time n / fps."""

    def __init__(self, path: Path, fps: int, height: int, width: int, codec: str):
        av = _import_av()
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr unless told not to
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps, self.codec, self.frames, self.bytes_written = path, fps, codec, 0, 0
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(codec, fps, options=_codec_options(codec))
        self.stream.pix_fmt = LEROBOT_ENCODER["pix_fmt"]
        self.stream.width, self.stream.height = width, height
        self._frame_class = av.VideoFrame

    def add(self, frames_hwc: np.ndarray) -> None:
        """Append uint8 (T, H, W, 3) frames."""
        for image in frames_hwc:
            frame = self._frame_class.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.frames, Fraction(1, self.fps)
            self._mux(self.stream.encode(frame))
            self.frames += 1

    def _mux(self, packets: list) -> None:
        # Counted as they leave the encoder (the file on disk lags behind the muxer's buffer).
        self.bytes_written += sum(packet.size for packet in packets)
        self.container.mux(packets)

    def close(self) -> None:
        self._mux(self.stream.encode())  # flush the encoder
        self.container.close()


def encoder_info(codec: str, fps: int, height: int, width: int) -> dict[str, Any]:
    """The `info` block LeRobot 0.6.1 records for a video feature in info.json."""
    canonical = {"libsvtav1": "av1", "libaom-av1": "av1", "libx264": "h264"}.get(codec, codec)
    return {
        "video.height": height, "video.width": width, "video.codec": canonical,
        "video.pix_fmt": LEROBOT_ENCODER["pix_fmt"], "video.fps": fps, "video.channels": 3, "has_audio": False,
        "video.g": LEROBOT_ENCODER["g"], "video.crf": LEROBOT_ENCODER["crf"],
        "video.preset": LEROBOT_ENCODER["preset"], "video.fast_decode": LEROBOT_ENCODER["fast_decode"],
        "video.video_backend": "pyav", "video.extra_options": {}, "is_depth_map": False,
    }


def video_keys(features: dict[str, dict[str, Any]]) -> list[str]:
    return [k for k, ft in features.items() if ft.get("dtype") == "video"]


def frames_shape(feature: dict[str, Any]) -> tuple[int, int, int]:
    """(H, W, C) of a camera feature, whichever order info.json's `names` use."""
    shape: Sequence[int] = feature["shape"]
    names = list(feature.get("names") or [])
    if names[:1] == ["channels"]:
        return int(shape[1]), int(shape[2]), int(shape[0])
    return int(shape[0]), int(shape[1]), int(shape[2])
