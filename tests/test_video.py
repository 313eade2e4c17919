"""Video datasets: items equal LeRobot 0.6.1's on a dataset its own writer made, both backends
read the v3.0 and v2.1 layouts, the writer writes LeRobot's layout, and damaged input is a
one-line error."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from robotrain.data import LeRobotDataset
from robotrain.data.metadata import load_meta
from robotrain.data.video import DecoderCache
from robotrain.data.writing import write_dataset
from robotrain.errors import UserError

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "lerobot_v3_video"  # written by LeRobot 0.6.1 (tests/data/README.md)
REPO_ID = "lerobot_ref/video_tiny"
CAMERAS = ("observation.images.cam0", "observation.images.cam1")
FPS = 15
LENGTHS = (40, 47, 54, 61)
STARTS = (0, 40, 87, 141)
#: The delta_timestamps LeRobot 0.6.1 decoded the reference items with.
DELTAS = {**{cam: [-1 / FPS, 0.0] for cam in CAMERAS}, "action": [k / FPS for k in range(10)]}
INDICES = (0, 1, 39, 40, 41, 100, 150, 200)
FRAME_TOLERANCE = 2 / 255  # decoders may convert YUV to RGB with different rounding
BACKENDS = ("torchcodec", "pyav")
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"


@pytest.fixture(scope="module")
def lerobot_items() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "lerobot_v3_video_frames.safetensors"))


def copy_reference(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(REFERENCE, root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def edit_episodes(root: Path, column: str, values: list) -> None:
    path = root / EPISODES_FILE
    table = pq.read_table(path)
    i = table.column_names.index(column)
    table = table.set_column(i, table.field(i), pa.array(values, table.schema.field(i).type))
    pq.write_table(table, path)


def decode_sequentially(path: Path) -> np.ndarray:
    """Every frame of `path`, decoded front to back with PyAV: (N, 3, H, W) uint8."""
    with av.open(str(path)) as container:
        container.streams.video[0].codec_context.thread_count = 1  # freeable in forked DataLoader workers
        return np.stack([f.to_ndarray(format="rgb24").transpose(2, 0, 1) for f in container.decode(video=0)])


# ---- parity with LeRobot 0.6.1 --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_items_equal_lerobot_0_6_1(backend, lerobot_items):
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS, video_backend=backend)
    for i in INDICES:
        item = ds[i]
        for key in (*CAMERAS, "observation.state", "action"):
            want, got = lerobot_items[f"{i}/{key}"], item[key]
            assert got.shape == want.shape and got.dtype == want.dtype, (i, key, got.shape, want.shape)
            if key in CAMERAS:
                assert (got - want).abs().max() <= FRAME_TOLERANCE, (i, key)
            else:
                assert torch.equal(got, want), (i, key)


def test_item_has_lerobots_keys_shapes_and_dtypes():
    item = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS)[40]
    assert set(item) == {*CAMERAS, "observation.state", "action", "timestamp", "frame_index", "episode_index",
                         "index", "task_index", "task", "action_is_pad", *(f"{c}_is_pad" for c in CAMERAS)}
    for key in ("frame_index", "episode_index", "index", "task_index"):
        assert item[key].dtype == torch.int64 and item[key].shape == ()
    assert item["timestamp"].dtype == torch.float32 and item["timestamp"].shape == ()
    assert item[CAMERAS[0]].dtype == torch.float32 and 0 <= item[CAMERAS[0]].min() <= item[CAMERAS[0]].max() <= 1
    # Frame 40 starts episode 1: the previous camera frame is padded with a copy of frame 40.
    assert item[f"{CAMERAS[0]}_is_pad"].tolist() == [True, False]
    assert torch.equal(item[CAMERAS[0]][0], item[CAMERAS[0]][1])
    assert item["task"] == "stack the cubes"


def test_camera_without_delta_timestamps_is_one_chw_frame():
    ds = LeRobotDataset(REPO_ID, root=REFERENCE)
    assert ds[5][CAMERAS[0]].shape == (3, 64, 64)


def test_one_offset_video_query_is_squeezed_as_lerobot_does():
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps={CAMERAS[0]: [0.0]})
    assert ds[5][CAMERAS[0]].shape == (3, 64, 64) and ds[5][f"{CAMERAS[0]}_is_pad"].tolist() == [False]
    assert ds.get_batch([5, 6])[CAMERAS[0]].shape == (2, 3, 64, 64)


def test_frames_are_the_files_frames_at_each_episodes_offset():
    # v3.0 concatenates episodes into one file: frame t of episode e is the file's frame STARTS[e] + t.
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, video_backend="pyav", return_uint8=True)
    frames = decode_sequentially(REFERENCE / "videos" / CAMERAS[1] / "chunk-000" / "file-000.mp4")
    for e, start in enumerate(STARTS):
        for t in (0, LENGTHS[e] - 1):
            assert np.array_equal(ds[start + t][CAMERAS[1]].numpy(), frames[start + t])


def test_return_uint8_gives_the_stored_pixels():
    as_float = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS)
    as_uint8 = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS, return_uint8=True)
    got = as_uint8[41][CAMERAS[0]]
    assert got.dtype == torch.uint8
    assert torch.equal(got.float() / 255, as_float[41][CAMERAS[0]])


def test_getitems_and_get_batch_equal_single_items():
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS)
    indices = [200, 3, 41, 40, 150, 3]
    items = ds.__getitems__(indices)
    batch = ds.get_batch(indices)
    for n, i in enumerate(indices):
        single = ds[i]
        for key, value in single.items():
            assert (items[n][key] == value) if key == "task" else torch.equal(items[n][key], value), (i, key)
            assert (batch[key][n] == value) if key == "task" else torch.equal(batch[key][n], value), (i, key)


def test_dataloader_batches_equal_get_batch_with_workers():
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    for n, batch in enumerate(loader):
        expected = ds.get_batch(list(range(8 * n, min(8 * n + 8, len(ds)))))
        for key in CAMERAS + ("action", "index"):
            assert torch.equal(batch[key], expected[key]), (n, key)


def test_episode_subset_reads_the_same_frames():
    full = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS)
    subset = LeRobotDataset(REPO_ID, root=REFERENCE, episodes=[2], delta_timestamps=DELTAS)
    assert len(subset) == LENGTHS[2]
    for key in (*CAMERAS, "action", f"{CAMERAS[0]}_is_pad"):
        assert torch.equal(subset[0][key], full[STARTS[2]][key])


def test_decoder_cache_stays_within_its_bounds():
    files = [REFERENCE / "videos" / cam / "chunk-000" / "file-000.mp4" for cam in CAMERAS]
    cache = DecoderCache("torchcodec", max_count=1)
    first = cache.get(files[0])
    assert cache.get(files[0]) is first and len(cache) == 1
    cache.get(files[1])
    assert len(cache) == 1 and cache.get(files[0]) is not first  # evicted, reopened
    by_bytes = DecoderCache("pyav", max_count=10, max_bytes=cache.nbytes)  # room for one decoder
    by_bytes.get(files[0])
    by_bytes.get(files[1])
    assert len(by_bytes) == 1


# ---- v2.1 ---------------------------------------------------------------------------------


def write_v21_from_reference(root: Path) -> None:
    """The reference dataset in v2.1's layout: one parquet and one MP4 per episode and camera.
    The MP4s are the reference file's packets of that episode, remuxed (not re-encoded)."""
    info = json.loads((REFERENCE / "meta" / "info.json").read_text())
    info.update(codebase_version="v2.1", data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = load_meta(REFERENCE).tasks
    (root / "meta" / "tasks.jsonl").write_text("".join(
        json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": [], "length": n}) + "\n" for e, n in enumerate(LENGTHS)))
    shutil.copy(REFERENCE / "meta" / "stats.json", root / "meta" / "stats.json")
    data = pq.read_table(REFERENCE / "data" / "chunk-000" / "file-000.parquet")
    (root / "data" / "chunk-000").mkdir(parents=True)
    for e, (start, n) in enumerate(zip(STARTS, LENGTHS)):
        pq.write_table(data.slice(start, n), root / "data" / "chunk-000" / f"episode_{e:06d}.parquet")
    for cam in CAMERAS:
        split_video(REFERENCE / "videos" / cam / "chunk-000" / "file-000.mp4", root / "videos" / "chunk-000" / cam)


def split_video(source: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        per_frame = round(1 / (FPS * stream.time_base))
        outputs = []
        for e in range(len(LENGTHS)):
            out = av.open(str(folder / f"episode_{e:06d}.mp4"), "w")
            outputs.append((out, out.add_stream_from_template(stream, opaque=True)))
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            frame = packet.pts // per_frame
            e = int(np.searchsorted(STARTS, frame, side="right")) - 1
            out, out_stream = outputs[e]
            packet.pts -= STARTS[e] * per_frame
            packet.dts -= STARTS[e] * per_frame
            packet.stream = out_stream
            out.mux(packet)
        for out, _ in outputs:
            out.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_v21_video_dataset_reads_lerobots_items(tmp_path, backend, lerobot_items):
    write_v21_from_reference(tmp_path / "v21")
    ds = LeRobotDataset(REPO_ID, root=tmp_path / "v21", delta_timestamps=DELTAS, video_backend=backend)
    assert ds.meta.codebase_version == "v2.1"
    assert ds.meta.episode_videos[CAMERAS[0]][0][3] == f"videos/chunk-000/{CAMERAS[0]}/episode_000003.mp4"
    for i in INDICES:
        item = ds[i]
        for key in CAMERAS:
            assert (item[key] - lerobot_items[f"{i}/{key}"]).abs().max() <= FRAME_TOLERANCE, (i, key)
        assert torch.equal(item["action"], lerobot_items[f"{i}/action"])


# ---- writing ------------------------------------------------------------------------------


def camera_frames(e: int, n: int, size: int = 32) -> np.ndarray:
    """Smooth moving gradients, (n, size, size, 3) uint8: content a lossy codec keeps well."""
    t = np.arange(n)[:, None, None, None]
    h = np.arange(size)[None, :, None, None]
    w = np.arange(size)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    return (128 + 90 * np.sin(0.09 * (h + 2 * t) + 0.07 * (w - t) + e + 2 * c)).astype(np.uint8)


def episodes(dtype_lengths=(12, 9, 15)):
    for e, n in enumerate(dtype_lengths):
        yield {"observation.state": np.sin(np.arange(n * 2, dtype=np.float32)).reshape(n, 2) + e,
               "observation.images.top": camera_frames(e, n), "task": "wave"}


def camera_features(dtype: str) -> dict:
    return {"observation.state": {"dtype": "float32", "shape": [2], "names": ["a", "b"]},
            "observation.images.top": {"dtype": dtype, "shape": [32, 32, 3], "names": ["height", "width", "channels"]}}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("written") / "ds"
    write_dataset(root, repo_id="a/video", fps=10, features=camera_features("video"), episodes=episodes())
    return root


def test_writer_writes_lerobots_video_layout(written):
    info = json.loads((written / "meta" / "info.json").read_text())
    reference_info = json.loads((REFERENCE / "meta" / "info.json").read_text())
    assert info["video_path"] == reference_info["video_path"]
    block, reference_block = info["features"]["observation.images.top"]["info"], reference_info["features"][CAMERAS[0]]["info"]
    assert block.keys() == reference_block.keys()
    assert {k: block[k] for k in ("video.codec", "video.pix_fmt", "video.g", "video.crf", "video.preset")} == {
        "video.codec": "av1", "video.pix_fmt": "yuv420p", "video.g": 2, "video.crf": 30, "video.preset": 12}
    assert "observation.images.top" not in pq.read_schema(written / "data" / "chunk-000" / "file-000.parquet").names
    rows = pq.read_table(written / EPISODES_FILE).to_pylist()
    prefix = "videos/observation.images.top/"
    assert [r[prefix + "from_timestamp"] for r in rows] == [0.0, 1.2, 2.1]
    assert [r[prefix + "to_timestamp"] for r in rows] == [1.2, 2.1, 3.6]
    with av.open(str(written / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4")) as container:
        assert container.streams.video[0].codec_context.name in ("libdav1d", "av1", "libaom-av1")


def test_written_video_frames_match_the_source_within_lossy_coding(written):
    ds = LeRobotDataset("a/video", root=written, return_uint8=True)
    source = np.concatenate([camera_frames(e, n) for e, n in enumerate((12, 9, 15))]).transpose(0, 3, 1, 2)
    decoded = ds.get_batch(list(range(len(ds))))["observation.images.top"].numpy()
    mse = np.mean((decoded.astype(np.float64) - source) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30  # PSNR in dB: the right frames, in order, AV1-coded


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_read_the_written_dataset_alike(written, backend):
    ds = LeRobotDataset("a/video", root=written, video_backend=backend, return_uint8=True)
    frames = decode_sequentially(written / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4")
    got = ds.get_batch(list(range(len(ds))))["observation.images.top"].numpy().astype(int)
    assert np.abs(got - frames).max() <= 2


def test_video_camera_stats_equal_the_image_writers(written, tmp_path):
    # Stats come from the frames before lossy encoding, as LeRobot computes them.
    images = write_dataset(tmp_path / "img", repo_id="a/img", fps=10, features=camera_features("image"),
                           episodes=episodes())
    video = load_meta(written)
    for stat, value in images.stats["observation.images.top"].items():
        assert np.array_equal(video.stats["observation.images.top"][stat], value), stat


def test_writer_rolls_video_files_over_at_their_size_limit(tmp_path):
    root = tmp_path / "ds"
    lengths = (30, 30, 30, 30)
    write_dataset(root, repo_id="a/video", fps=10, features=camera_features("video"), episodes=episodes(lengths),
                  video_files_size_in_mb=1e-6)
    rows = pq.read_table(root / EPISODES_FILE).to_pylist()
    prefix = "videos/observation.images.top/"
    file_of = [r[prefix + "file_index"] for r in rows]
    assert file_of[0] == 0 and len(set(file_of)) > 1 and file_of == sorted(file_of)
    ds = LeRobotDataset("a/video", root=root, return_uint8=True)
    for e, row in enumerate(rows):  # each episode starts where its file says, and reads from that file
        if e and file_of[e] != file_of[e - 1]:
            assert row[prefix + "from_timestamp"] == 0.0
        mp4 = root / "videos" / "observation.images.top" / "chunk-000" / f"file-{file_of[e]:03d}.mp4"
        first = round(row[prefix + "from_timestamp"] * 10)
        assert np.array_equal(ds[30 * e + 7]["observation.images.top"].numpy(), decode_sequentially(mp4)[first + 7])


def test_video_writer_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_dataset(tmp_path / name, repo_id="a/video", fps=10, features=camera_features("video"),
                      episodes=episodes())
    mp4 = "videos/observation.images.top/chunk-000/file-000.mp4"
    assert (tmp_path / "a" / mp4).read_bytes() == (tmp_path / "b" / mp4).read_bytes()


# ---- damaged input ----------------------------------------------------------------------------


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_video_file_is_refused_when_the_dataset_opens(tmp_path):
    root = copy_reference(tmp_path)
    (root / "videos" / CAMERAS[1] / "chunk-000" / "file-000.mp4").unlink()
    with pytest.raises(UserError) as err:
        LeRobotDataset(REPO_ID, root=root)
    assert_one_line(err, "file-000.mp4", "is missing", "re-download")


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_video_is_a_one_line_error(tmp_path, backend):
    root = copy_reference(tmp_path)
    path = root / "videos" / CAMERAS[0] / "chunk-000" / "file-000.mp4"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = LeRobotDataset(REPO_ID, root=root, video_backend=backend)
    with pytest.raises(UserError) as err:
        ds.get_batch([0, 150, 200])
    assert_one_line(err, str(path), "truncated or corrupt")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_outside_tolerance_names_episode_camera_and_times(tmp_path, backend):
    root = copy_reference(tmp_path)
    starts = [s / FPS for s in STARTS]
    starts[2] += 0.3 / FPS  # episode 2's frames now fall between the file's frames
    edit_episodes(root, f"videos/{CAMERAS[1]}/from_timestamp", starts)
    ds = LeRobotDataset(REPO_ID, root=root, video_backend=backend)
    ds[STARTS[1]]  # other episodes still read
    with pytest.raises(UserError) as err:
        ds[STARTS[2] + 5]
    assert_one_line(err, "episode 2", CAMERAS[1], "tolerance_s=0.0001", f"{starts[2] + 5 / FPS:.6f}")


def test_video_shorter_than_its_episode_is_a_one_line_error(tmp_path):
    root = copy_reference(tmp_path)
    edit_episodes(root, f"videos/{CAMERAS[0]}/from_timestamp", [0.0, 40 / FPS, 87 / FPS, 150 / FPS])
    ds = LeRobotDataset(REPO_ID, root=root)
    with pytest.raises(UserError) as err:
        ds[201]
    assert_one_line(err, "episode 3", "has 202 frames", "shorter than the episode")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_codec_is_a_one_line_error(tmp_path, backend):
    root = copy_reference(tmp_path)
    path = root / "videos" / CAMERAS[0] / "chunk-000" / "file-000.mp4"
    path.write_bytes(path.read_bytes().replace(b"av01", b"zz99"))  # the sample entry's codec tag
    ds = LeRobotDataset(REPO_ID, root=root, video_backend=backend)
    with pytest.raises(UserError) as err:
        ds[0]
    assert_one_line(err, str(path), "video codec FFmpeg cannot decode", "re-encode")


def test_unknown_video_backend_is_refused():
    with pytest.raises(UserError) as err:
        LeRobotDataset(REPO_ID, root=REFERENCE, video_backend="opencv")
    assert_one_line(err, "'opencv'", "torchcodec", "pyav")


def write_frames(path: Path, frames: np.ndarray, fps: int) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", fps)
        stream.pix_fmt, stream.height, stream.width = "yuv420p", frames.shape[1], frames.shape[2]
        for n, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = n, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def test_h264_video_reads_too(tmp_path):
    root = copy_reference(tmp_path)
    frames = decode_sequentially(REFERENCE / "videos" / CAMERAS[0] / "chunk-000" / "file-000.mp4")
    write_frames(root / "videos" / CAMERAS[0] / "chunk-000" / "file-000.mp4", frames.transpose(0, 2, 3, 1), FPS)
    ds = LeRobotDataset(REPO_ID, root=root, return_uint8=True)
    assert np.abs(ds[150][CAMERAS[0]].numpy().astype(int) - frames[150]).max() < 40  # lossy, but frame 150


# ---- training path ------------------------------------------------------------------------------


def test_training_batches_carry_uint8_frames_that_become_lerobots_floats_on_the_device():
    from robotrain.config import DatasetConfig
    from robotrain.data import open_dataset
    from robotrain.data.loader import to_device

    cfg = DatasetConfig(repo_id=REPO_ID, root=str(REFERENCE))
    training = open_dataset(cfg, load_meta(REFERENCE, REPO_ID), DELTAS)
    batch = training.get_batch([0, 40, 200])
    assert batch[CAMERAS[0]].dtype == torch.uint8 and batch["action"].dtype == torch.float32
    on_device = to_device(batch, torch.device("cpu"))
    expected = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS).get_batch([0, 40, 200])
    for key in (*CAMERAS, "action", "observation.state"):
        assert torch.equal(on_device[key], expected[key]), key


def test_without_root_the_dataset_is_read_from_the_lerobot_home(tmp_path, monkeypatch):
    shutil.copytree(REFERENCE, tmp_path / REPO_ID)
    monkeypatch.setenv("HF_LEROBOT_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = LeRobotDataset(REPO_ID)
    assert ds.root == tmp_path / REPO_ID and len(ds) == sum(LENGTHS)


def test_writer_falls_back_to_h264_with_a_warning_where_pyav_lacks_av1_encoders(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libsvtav1", "libaom-av1"})
    with caplog.at_level("WARNING", logger="robotrain"):
        write_dataset(tmp_path / "ds", repo_id="a/video", fps=10, features=camera_features("video"),
                      episodes=episodes())
    assert "no libsvtav1 encoder: writing videos with libx264" in caplog.text
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "h264"
    ds = LeRobotDataset("a/video", root=tmp_path / "ds", return_uint8=True)
    mp4 = tmp_path / "ds" / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4"
    assert np.abs(ds[20]["observation.images.top"].numpy().astype(int) - decode_sequentially(mp4)[20]).max() <= 2


# ---- decoding on the GPU (torchcodec NVDEC) ------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_decoding_on_a_gpu_without_one_is_a_one_line_error():
    with pytest.raises(UserError) as err:
        LeRobotDataset(REPO_ID, root=REFERENCE, video_device="cuda")
    assert_one_line(err, "needs a CUDA GPU", "dataset.video_device=cpu")


def test_pyav_cannot_decode_on_a_gpu():
    with pytest.raises(UserError) as err:
        LeRobotDataset(REPO_ID, root=REFERENCE, video_backend="pyav", video_device="cuda")
    assert_one_line(err, "PyAV decodes on the CPU only", "video_backend=torchcodec")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with the CUDA torchcodec (none in CI)")
def test_frames_decoded_on_the_gpu_equal_lerobots(lerobot_items):
    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS, video_device="cuda")
    for i in INDICES:
        frames = ds[i][CAMERAS[0]]
        assert frames.is_cuda
        assert (frames.cpu() - lerobot_items[f"{i}/{CAMERAS[0]}"]).abs().max() <= FRAME_TOLERANCE, i


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_step_read_as_one_batch_splits_into_exactly_its_micro_batches(num_workers):
    """Gradient accumulation reads each step's micro-batches with one get_batch (video decoded
    once per step); every feature, task strings included, equals reading each micro-batch alone."""
    from robotrain.data.loader import batches, make_loader
    from robotrain.data.sampler import EpisodeAwareSampler, GlobalBatchSampler

    ds = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS, return_uint8=True)
    alone = LeRobotDataset(REPO_ID, root=REFERENCE, delta_timestamps=DELTAS, return_uint8=True)  # its own decoders
    ends = [start + length for start, length in zip(STARTS, LENGTHS)]
    sampler = GlobalBatchSampler(EpisodeAwareSampler(STARTS, ends, seed=3), 6)
    loader = make_loader(ds, sampler, num_workers=num_workers, pin_memory=False, seed=0, micro_batches=3)
    steps = batches(loader, prefetch=2, micro_batches=3)
    for step in range(2):
        micro_batches = next(steps)
        assert len(micro_batches) == 3
        for micro, batch in enumerate(micro_batches):
            expected = alone.get_batch(sampler.batch(3 * step + micro))
            assert batch.keys() == expected.keys()
            for key, value in expected.items():
                assert value == batch[key] if key == "task" else torch.equal(batch[key], value), (step, micro, key)
    steps.close()  # the prefetch thread, or the generator over the workers
