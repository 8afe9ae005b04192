import pytest
import torch
from conftest import jpeg, mp4

from inputs import frames
from inputs.frames import Media, MediaError, load_image, load_video, sample_indices, to_tensor


def test_to_tensor_normalises_and_squashes():
    from PIL import Image

    x = to_tensor([Image.new("RGB", (50, 20), (255, 128, 0))], size=16)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    want = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(frames.IMAGENET_MEAN)) / torch.tensor(frames.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 5], want)


def test_sample_indices():
    assert sample_indices(5, 30, 64) == [0, 1, 2, 3, 4]  # short clip: every frame once
    idx = sample_indices(1000, 30, 64)
    assert len(idx) == 64 and idx == sorted(set(idx)) and idx[0] < 1000 / 64 and idx[-1] > 1000 - 1000 / 64
    assert sample_indices(300, 30, 64, fps=1) == [15, 45, 75, 105, 135, 165, 195, 225, 255, 285]
    assert len(sample_indices(3000, 30, 64, fps=1)) == 64  # 100 s at 1 fps, capped
    assert sample_indices(300, 30, 64, fps=1, start=2, end=4) == [75, 105]  # 2 s: frames 60..120
    win = sample_indices(300, 10, 4, start=5, end=10)
    assert len(win) == 4 and all(50 <= i <= 100 for i in win)
    assert sample_indices(10, 10, 8, start=50) == [9]  # window past the end: the last frame
    assert sample_indices(0, 30, 8) == []
    with pytest.raises(ValueError):
        sample_indices(10, 0, 8, fps=1)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_load_video_backends_agree(backend):
    clip = mp4(num_frames=12, size=32, fps=12)
    ref = load_video(clip, max_frames=64, size=32, backend="pyav")
    x = load_video(clip, max_frames=64, size=32, backend=backend)
    assert x.shape == ref.shape == (12, 3, 32, 32)
    assert (x - ref).abs().max() < 0.05
    red = x[:, 0, 20, 20] * frames.IMAGENET_STD[0] + frames.IMAGENET_MEAN[0]  # ramps 20/255 per frame
    assert torch.allclose(red, torch.arange(12) * 20 / 255, atol=0.03)
    assert load_video(clip, max_frames=4, backend=backend, size=32).shape[0] == 4
    assert load_video(clip, fps=2, backend=backend, size=32).shape[0] == 2  # 1 s clip at 2 fps


def test_load_video_from_path_and_probe(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4(num_frames=24, fps=12))
    assert frames.probe_video(path) == frames.probe_video(path, "pyav") == (24, 12.0)
    x = Media.at(path).frames(frames.FrameSpec(size=32, max_frames=8))
    assert x.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("backend", ["decord", "pyav", None])
def test_truncated_video_raises(backend):
    clip = mp4()
    with pytest.raises(MediaError, match="bytes"):
        load_video(clip[: len(clip) // 2], backend=backend)
    with pytest.raises(MediaError):
        frames.probe_video(b"not a video", backend)


def test_images(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg((10, 200, 30)))
    assert load_image(path, size=8).shape == (1, 3, 8, 8)
    x = Media.at(path).frames(frames.FrameSpec(size=8, image_frames=8))
    assert x.shape == (8, 3, 8, 8) and torch.equal(x[0], x[7])
    good = jpeg((0, 0, 0))
    for bad in (b"garbage", good[: len(good) // 2]):
        with pytest.raises(MediaError):
            load_image(bad)
    (tmp_path / "bad.png").write_bytes(b"x")
    with pytest.raises(MediaError, match="bad.png"):
        Media.at(tmp_path / "bad.png").frames(frames.FrameSpec())


def test_every_reader_feeds_a_video_at_the_trained_fps(tmp_path, tokenizer):
    """A 10 s clip at 10 fps, for a model fed at most 64 frames at 1 fps: 10 frames, not 64, on every path from a
    media file to frames. Training's processor (a shard's mp4, or its numbered frames with their stated rate),
    the benchmark harness and chat (Media: a video file, an MVBench-style frame folder) all decode as trained."""
    import json

    from inputs.processors import ChatProcessor

    spec = frames.FrameSpec(size=16, max_frames=64, fps=1.0)
    clip = mp4(num_frames=100, size=16, fps=10)
    (tmp_path / "clip.mp4").write_bytes(clip)
    stills = [jpeg((3 * i, 0, 0), (16, 16)) for i in range(100)]
    processor = ChatProcessor(tokenizer, spec)
    shard_video = {"__key__": "v", "json": json.dumps({"caption": "a clip"}).encode(), "mp4": clip}
    shard_frames = {"__key__": "f", "json": json.dumps({"caption": "a clip", "fps": 10}).encode()}
    shard_frames |= {f"{i:03d}.jpg": still for i, still in enumerate(stills)}
    for raw in (shard_video, shard_frames):
        assert len(processor.pictures(raw)) == processor.num_frames(raw) == 10
    assert Media.at(tmp_path / "clip.mp4").frames(spec).shape[0] == 10
    assert len(Media("frames", stills, fps=10).pictures(spec)) == 10
    assert len(Media("frames", stills, start=2.0, end=3.95, fps=10).pictures(spec)) == 2  # a 2 s window
    unknown_rate = {k: v for k, v in shard_frames.items() if k != "json"} | {"json": b'{"caption": "x"}'}
    assert len(processor.pictures(unknown_rate)) == 64  # frames of unstated rate: taken as at the training rate


def test_a_missing_file_is_not_undecodable_and_decoders_print_nothing_of_their_own(tmp_path, capfd):
    """A file that is not there is said to be missing (a FileNotFoundError, and a MediaError where media are skipped
    and counted), not "cannot decode"; a corrupt one is one
    MediaError, with nothing that FFmpeg or decord print on their own before it."""
    for read in (frames.video_frames, frames.probe_video, frames.read_image):
        with pytest.raises(FileNotFoundError, match="gone.mp4: no such file") as e:
            read(tmp_path / "gone.mp4")
        assert isinstance(e.value, MediaError)
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 200)
    with pytest.raises(MediaError, match="cannot decode video .*bad.mp4"):
        frames.video_frames(tmp_path / "bad.mp4")
    with pytest.raises(MediaError, match="bad.mp4"):
        frames.probe_video(tmp_path / "bad.mp4")
    assert capfd.readouterr().err == ""
