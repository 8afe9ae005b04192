"""The chat demo: its upload limits, session transitions, attention pictures (each frame as it is, in its own aspect
ratio, beside its map; an image once) and examples as plain functions; the command's failure on a port in use; then
the app itself in a real browser (Debian's chromium through Playwright), with every request the page makes checked
to stay on this machine, every picture of where the model looked in view, a notice in a bubble of its own, and no
folder of examples left behind once it stops."""

from __future__ import annotations

import io
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import av
import numpy as np
import pytest
from PIL import Image

import app
import cli
from cli import UserError
from encoder import FoveatedEncoder
from evals.answering import Answerer
from evals.attention_viz import entropy, patch_maps
from evals.conversation import Conversation
from inputs.frames import FrameSpec, Media
from layouts import toy
from tests.conftest import jpeg, mp4
from tests.tiny import tiny_connector_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # without these chromium calls Google's hosts on its own
    "--disable-component-update",
    "--disable-sync",
]
LOCAL = {"127.0.0.1", "localhost", "::1", "[::1]"}
# The app has answered a message: a new reply is there and the chat's status tracker is hidden again (it hides after
# the last update lands; the reply appears a moment before the box is locked, so neither alone says it is over).
DONE = """n => document.querySelectorAll('#chat [data-testid="bot"]').length > n
  && document.querySelector('#chat [data-testid="status-tracker"]').classList.contains('hide')
  && !document.querySelector('#message textarea').disabled"""
READ = "autoregressive"
DRAWN = "i => i.complete && i.naturalWidth > 0"
# Where each picture of the gallery is: inside the gallery's visible box, below its label, and the gallery not scrolling
# within itself.
IN_VIEW = """() => { const wrap = document.querySelector('#attention .grid-wrap'), box = wrap.getBoundingClientRect();
  const imgs = [...document.querySelectorAll('#attention img')];
  const label = document.querySelector('#attention [data-testid="block-label"]').getBoundingClientRect();
  return {scrolled: wrap.scrollHeight - wrap.clientHeight,
    below_label: imgs.every(i => i.getBoundingClientRect().top >= label.bottom - 1),
    inside: imgs.map(i => { const r = i.getBoundingClientRect();
      return r.height > 0 && r.top >= box.top - 1 && r.bottom <= box.bottom + 1 && r.left >= box.left - 1
        && r.right <= box.right + 1; }),
    ratios: imgs.map(i => i.getBoundingClientRect().width / i.getBoundingClientRect().height)}; }"""


@pytest.fixture(scope="module")
def answerer(tokenizer):
    return Answerer(tiny_model(tokenizer=tokenizer, frames_at="user_turn"))


def noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def media(tmp_path):
    """Small uploads of every sort, by name."""
    files = {
        "red.jpg": jpeg((200, 30, 30)),
        "clip.mp4": mp4(12, 32, fps=12),  # 1 s, 12 frames of 32x32
        "broken.jpg": b"\xff\xd8 not really a jpeg" * 8,
        "broken.mp4": b"not a video at all" * 16,
        "truncated.jpg": noisy_jpeg()[:3000],  # a valid header, most of the pixels cut off
        "notes.txt": b"just some text",
        "empty.png": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize(
    "name, limit, value, message",
    [
        ("red.jpg", "MAX_BYTES", 100, "uploads are limited to"),
        ("red.jpg", "MAX_PIXELS", 1000, "40x30 = 1,200 pixels; the limit is 1,000"),
        ("clip.mp4", "MAX_PIXELS", 1000, "frames of 32x32 = 1,024 pixels"),
        ("clip.mp4", "MAX_VIDEO_SECONDS", 0.5, "lasts 1.0 s; videos are limited to 0.5 s"),
        ("clip.mp4", "MAX_VIDEO_FRAMES", 5, "has 12 frames; videos are limited to 5"),
        ("notes.txt", None, None, "this type of file is not supported"),
        ("broken.jpg", None, None, "could not be read as an image"),
        ("broken.mp4", None, None, "could not be read as a video"),
        ("empty.png", None, None, "is empty"),
    ],
)
def test_an_upload_past_a_limit_is_refused_with_its_reason(media, monkeypatch, name, limit, value, message):
    if limit:
        monkeypatch.setattr(app, limit, value)
    with pytest.raises(app.UploadError, match=message) as e:
        app.check_upload(media[name])
    assert name in str(e.value)


def test_uploads_within_the_limits_become_media(media):
    assert app.check_upload(media["red.jpg"]).kind == "image"
    assert app.check_upload(media["clip.mp4"]).kind == "video"
    assert app.check_upload(media["truncated.jpg"]).kind == "image"  # the header is fine: decoding finds it out


def test_a_refused_or_undecodable_upload_is_said_in_the_chat_and_nothing_is_decoded(answerer, media, monkeypatch):
    prepared = []
    real = Answerer.prepare
    monkeypatch.setattr(Answerer, "prepare", lambda self, m: prepared.append(m.kind) or real(self, m))
    monkeypatch.setattr(app, "MAX_BYTES", 400)
    session = app.Session()
    for name in ("clip.mp4", "notes.txt", "broken.mp4"):  # the clip is over 400 bytes
        *_, session = app.respond(answerer, session, {"text": "Hi?", "files": [str(media[name])]}, READ)
    assert prepared == [] and session.conversation is None
    monkeypatch.setattr(app, "MAX_BYTES", 2**20)
    *_, session = app.respond(answerer, session, {"text": "", "files": [str(media["truncated.jpg"])]}, READ)
    assert prepared == ["image"] and session.conversation is None  # decoding was tried, and failed
    said = [m["content"] for m in session.chat if m["role"] == "assistant"]
    assert len(said) == 4 and "limited to" in said[0] and "not supported" in said[1]
    assert "could not be read as a video" in said[2] and "could not be decoded as an image" in said[3]
    assert not any("Traceback" in s or "/tmp" in s for s in said)


def test_a_new_upload_starts_a_new_conversation_and_a_change_of_read_reuses_the_encoding(answerer, media, monkeypatch):
    prepared, encoded = [], []
    real_prepare, real_encode = Answerer.prepare, FoveatedEncoder.encode_patches
    monkeypatch.setattr(Answerer, "prepare", lambda self, m: prepared.append(m.kind) or real_prepare(self, m))
    monkeypatch.setattr(FoveatedEncoder, "encode_patches", lambda s, x: encoded.append(len(x)) or real_encode(s, x))

    def say(session, text, files=()):
        steps = list(app.respond(answerer, session, {"text": text, "files": [str(f) for f in files]}, READ, 4))
        return steps[-1], steps

    session, steps = say(app.Session(), "What colour is it?", [media["red.jpg"]])
    first = session.conversation
    assert len(steps) >= 2 and prepared == ["image"] and encoded == [2]  # the image's two copies, once
    session, _ = say(session, "And its shape?")
    assert session.conversation is first and len(first.messages) == 4 and encoded == [2]
    moved = app.change_read(answerer, session, "coarse_only")
    assert moved.conversation is not first and moved.prepared is session.prepared
    assert moved.conversation.read == "coarse_only" and moved.chat[-1]["content"].startswith("Now reading in")
    moved, _ = say(moved, "What colour is it?")
    assert prepared == ["image"] and encoded == [2]  # a new conversation on the same encoding
    assert app.change_read(answerer, moved, "coarse_only") is moved  # the same read: nothing to change
    video, _ = say(moved, "", [media["clip.mp4"]])
    assert video.conversation is not moved.conversation and video.conversation.messages == []
    assert prepared == ["image", "video"] and encoded == [2, 4] and video.upload == "clip.mp4"
    assert video.chat[: len(moved.chat)] == moved.chat  # the chat goes on
    kept, _ = say(video, "", [media["notes.txt"]])
    assert kept.conversation is video.conversation and prepared == ["image", "video"]


def test_a_question_without_an_upload_is_a_text_only_conversation(answerer):
    *_, session = app.respond(answerer, app.Session(), {"text": "Hello?"}, READ, 3)
    assert session.conversation is not None and session.conversation.state.pictures == []
    assert session.look is None and "nothing to look at" in app.look_note(answerer, session)


def test_the_attention_pictures_are_one_per_frame_with_an_entropy_each(answerer, media):
    *_, session = app.respond(answerer, app.Session(), {"text": "Where?", "files": [str(media["clip.mp4"])]}, READ, 3)
    look = session.look
    assert look is not None  # drawn with the reply
    frames = answerer.frames.max_frames
    assert len(look.pictures) == len(look.entropy) == len(look.captions()) == frames
    side = (app.DISPLAY_PX, 2 * app.DISPLAY_PX + 4, 3)  # a square frame, then its map, 4 px apart
    assert all(p.shape == side and p.dtype == np.uint8 for p in look.pictures)
    assert all(len(row) == 1 and 0 <= row[0] <= look.uniform + 1e-5 for row in look.entropy)
    assert look.uniform == pytest.approx(math.log(16))  # 16 px frames, 4 px patches
    note = app.look_note(answerer, session)
    assert "read **autoregressive**" in note and f"{look.entropy[0][0]:.2f}" in note


def test_with_the_frames_after_the_question_each_reply_keeps_its_own_look(tokenizer, media, tmp_path):
    """frames_at after_question: every question is read anew; its look is drawn for it, shown in the panel and put
    in the chat after its reply, so two questions about one clip show two looks."""
    answerer = Answerer(tiny_model(glimpses=1, tokenizer=tokenizer, frames_at="after_question"))
    message = {"text": "What colour is the triangle?", "files": [str(media["clip.mp4"])]}
    *_, first = app.respond(answerer, app.Session(), message, READ, 3, shelf=tmp_path)
    first_look = first.look
    *_, second = app.respond(answerer, first, {"text": "And the circle?"}, READ, 3, shelf=tmp_path)
    assert second.conversation is first.conversation and second.look is not first_look
    assert "looked for «And the circle?»" in app.look_note(answerer, second)
    said = [m["content"] for m in second.chat if m["role"] == "assistant"]
    pictures = [c["path"] for c in said if isinstance(c, dict)]
    assert len(pictures) == 2 and all(Path(p).parent == tmp_path for p in pictures)
    assert second.chat[-1]["content"]["path"] == pictures[1]  # right after the second reply
    one, two = (np.asarray(Image.open(p)) for p in pictures)
    assert one.shape == two.shape and not np.array_equal(one, two)  # two reads, two looks
    (_, a), (_, b) = second.conversation.looks
    assert not np.allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_other_kinds_show_their_maps_or_say_they_have_none(tokenizer, media):
    tokenlearner = Answerer(tiny_connector_model("tokenlearner_qformer", tokenizer))
    message = {"text": "?", "files": [str(media["red.jpg"])]}
    *_, session = app.respond(tokenlearner, app.Session(), message, "default", 2)
    look = session.look
    maps = session.conversation.attention.shape[1]
    width = round(app.DISPLAY_PX * 40 / 30)  # red.jpg is 40x30: shown in its aspect ratio
    assert maps > 1 and len(look.pictures) == 1  # an image, once
    assert look.pictures[0].shape[1] == (maps + 1) * width + maps * 4  # the image, then each pooled token's map
    assert all(len(row) == maps for row in look.entropy) and "each pooled token" in app.look_note(tokenlearner, session)
    mlp = Answerer(tiny_connector_model("mlp", tokenizer))
    *_, session = app.respond(mlp, app.Session(), message, "default", 2)
    assert session.look is None and "does not report where it looks" in app.look_note(mlp, session)


def test_the_examples_are_made_here_and_pass_the_checks(tmp_path):
    examples = app.write_examples(tmp_path, frames=4, size=112)
    assert [p.suffix for p, _ in examples] == [".mp4", ".mp4", ".jpg"]
    assert len({label.split("(")[1] for _, label in examples}) == 3  # three colours
    assert [app.check_upload(p).kind for p, _ in examples] == ["video", "video", "image"]


def test_an_example_clip_is_the_held_out_clip_the_toy_model_reads(tmp_path):
    """Made at the model's frame size and count, the example decodes, as the app reads it, to the held-out clip's
    own frames (within what the toy world's JPEGs change: the ball's colour within two levels), every frame once;
    the still is that clip's first frame."""
    spec = FrameSpec(size=112, max_frames=4)
    examples = app.write_examples(tmp_path, clips=(3,), still=3, frames=spec.max_frames, size=spec.size)
    held_out = toy.sample(0, "eval", 3, 112, 4)
    assert "(red ball)" in examples[0][1] and held_out["options"][held_out["answer"]] == "red"
    decoded = Media("video", [examples[0][0]]).pictures(spec)
    assert len(decoded) == 4 and decoded[0].shape == (112, 112, 3)
    for drawn, read in zip(held_out["frames"], decoded, strict=True):
        drawn = np.asarray(drawn).astype(int)
        assert np.abs(drawn - read).mean() < 1.5  # the toy world's JPEGs (quality 95) differ by 1.7 on average
    x, y = held_out["scene"]["ball"]["path"][2]
    assert np.abs(decoded[2][y, x].astype(int) - (225, 30, 30)).max() <= 3  # red stays red
    still = Media("image", [examples[1][0]]).pictures(spec)[0]
    assert np.abs(np.asarray(still).astype(int) - np.asarray(held_out["frames"][0])).mean() < 3


def wide_mp4(frames: int = 4, width: int = 64, height: int = 36) -> bytes:
    """A 16:9 clip, grey with a red square in its top-left corner."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt, s.bit_rate = width, height, "yuv420p", 4_000_000
        for _ in range(frames):
            a = np.full((height, width, 3), 110, np.uint8)
            a[4:16, 4:16] = (225, 30, 30)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_a_wide_video_is_shown_in_its_aspect_ratio_with_its_colours_as_they_are(answerer, tmp_path):
    """16:9 stays 16:9 in the pictures while the model is still fed its square frames; the frame's half of each
    picture is the decoded frame itself (the red square red), the map's half has none of its colours."""
    path = tmp_path / "wide.mp4"
    path.write_bytes(wide_mp4())
    *_, session = app.respond(answerer, app.Session(), {"text": "Where?", "files": [str(path)]}, READ, 2)
    fed = answerer.frames.tensor(session.prepared.pictures)
    assert fed.shape[-2:] == (16, 16)  # the model is fed its square frames as before
    width = round(app.DISPLAY_PX * 64 / 36)
    for picture, frame in zip(session.look.pictures, session.prepared.pictures, strict=True):
        assert picture.shape == (app.DISPLAY_PX, 2 * width + 4, 3)
        assert np.array_equal(picture[:, :width], app.shown(frame, answerer.frames))
        red = picture[20:80, 20:80].reshape(-1, 3).astype(int).mean(0)  # inside the red square, in the frame
        assert red[0] > 180 and red[1] < 70 and red[2] < 70
        heat = picture[20:80, width + 4 + 20 : width + 4 + 80].reshape(-1, 3).astype(int)
        assert not ((heat[:, 0] > 180) & (heat[:, 1] < 70) & (heat[:, 2] < 70)).all()  # not the square's red


def test_an_image_is_shown_once_with_its_last_copys_look(answerer, media):
    *_, session = app.respond(answerer, app.Session(), {"text": "?", "files": [str(media["red.jpg"])]}, READ, 2)
    look, copies = session.look, answerer.frames.image_frames
    assert len(session.prepared.pictures) == copies > 1  # the model still reads its copies
    assert len(look.pictures) == len(look.entropy) == 1 and look.copies == copies
    attention = session.conversation.attention
    assert look.entropy[0] == pytest.approx(entropy(patch_maps(attention, (4, 4)))[-1].tolist())
    assert f"the last of its {copies} copies" in look.captions()[0]
    assert f"read as {copies} copies" in app.look_note(answerer, session)


def test_replies_follow_the_chats_rules_against_repeating_unless_told_otherwise(answerer, monkeypatch):
    asked = []
    real = Conversation.ask
    monkeypatch.setattr(Conversation, "ask", lambda self, *a: asked.append(a[1:]) or real(self, *a))
    list(app.respond(answerer, app.Session(), {"text": "Hi?"}, READ, 2))
    list(app.respond(answerer, app.Session(), {"text": "Hi?"}, READ, 2, 1.0, 0))
    assert asked == [(2, 1.2, 3), (2, 1.0, 0)]
    defaults, off = app.parse_args([]), app.parse_args(["--repetition-penalty", "1", "--no-repeat-ngram-size", "0"])
    assert (defaults.repetition_penalty, defaults.no_repeat_ngram_size) == (1.2, 3)
    assert (off.repetition_penalty, off.no_repeat_ngram_size) == (1.0, 0)


def test_the_command_binds_this_machine_and_has_no_share_link(tmp_path, capsys):
    assert app.parse_args([]).host == "127.0.0.1"
    with pytest.raises(SystemExit):
        app.parse_args(["--share"])
    with pytest.raises(UserError, match="no saved model"):  # one line, exit 2, through cli.run
        app.parse_args(["--model", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        app.parse_args(["--repetition-penalty", "-1"])
    assert "--repetition-penalty must be positive" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_naming_it_and_exit_status_2(tmp_path):
    """Another program listens on the port: the command says so in one line, before loading any model, and
    leaves no folder behind."""
    (tmp_path / "model").mkdir()
    (tmp_path / "tmp").mkdir()
    with socket.create_server(("127.0.0.1", 0)) as taken:  # listening, as a server on that port would be
        port = taken.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
        done = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), "--model", str(tmp_path / "model"), "--port", str(port)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: port {port} on 127.0.0.1 is in use: pass another with --port"]
    assert "GRADIO_SERVER_PORT" not in done.stderr and "Traceback" not in done.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_port_taken_after_the_check_is_the_same_one_line(answerer, tmp_path, monkeypatch):
    """Between check_port and Gradio's bind another program may take the port: Gradio's OSError, which suggests
    GRADIO_SERVER_PORT, becomes the command's own failure."""

    class Taken:
        is_running = False

        def queue(self, **kw):
            return self

        def launch(self, **kw):
            raise OSError(f"Cannot find empty port in range: {kw['server_port']}-{kw['server_port']}. You can specify "
                          "a different port by setting the GRADIO_SERVER_PORT environment variable")  # fmt: skip

        def close(self, verbose=True):
            pass

    monkeypatch.setattr(app, "build_app", lambda *a, **k: Taken())
    args = app.parse_args(["--port", "7999"])
    with pytest.raises(cli.UserError, match="^port 7999 on 127.0.0.1 is in use: pass another with --port$"):
        app.serve(answerer, "", tmp_path, args)


# --- the app in a browser ---------------------------------------------------------------------------------------


class ProxyRecorder:
    """A local 'proxy' the server is pointed at: any request it tries to send off the machine lands here instead."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.seen.append(conn.recv(512).split(b"\r\n", 1)[0].decode(errors="replace"))
                except OSError:
                    self.seen.append("(a connection)")

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_served(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the app exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not serve {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def test_the_app_in_a_browser(tokenizer, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) is not installed")
    model_dir = tmp_path / "model"
    tiny_model(tokenizer=tokenizer, frames_at="user_turn").save_pretrained(model_dir)
    (image,) = [p for p, _ in app.write_examples(tmp_path / "upload", clips=(), size=112)]
    video = tmp_path / "clip.mp4"
    video.write_bytes(wide_mp4(12))  # 16:9
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 16)

    proxy = ProxyRecorder()
    port, log = free_port(), tmp_path / "server.log"
    temp = tmp_path / "tmp"  # where the app makes its folder of examples
    temp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "TMPDIR": str(temp)}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[var] = f"http://127.0.0.1:{proxy.port}"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    command = [sys.executable, str(ROOT / "app.py"), "--model", str(model_dir), "--port", str(port)]
    with log.open("w") as out:
        server = subprocess.Popen([*command, "--max-new-tokens", "16"], cwd=ROOT, env=env, stdout=out, stderr=out)
    outside: list[str] = []

    def route(r) -> None:
        if urlparse(r.request.url).hostname in LOCAL:
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    try:
        url = f"http://127.0.0.1:{port}/"
        wait_served(url, server, log)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1200, "height": 820},
            )  # fmt: skip
            browser.set_default_timeout(30_000)
            browser.route("**/*", route)
            page = browser.new_page()
            page.on("websocket", lambda ws: urlparse(ws.url).hostname in LOCAL or outside.append(ws.url))
            page.goto(url)
            box = page.locator("#message textarea")
            bots, users = page.locator('#chat [data-testid="bot"]'), page.locator('#chat [data-testid="user"]')
            box.wait_for()

            def send(text: str = "", upload: Path | None = None) -> str:
                """Send a message; wait for the app to finish answering; the last thing it said."""
                before = bots.count()
                if upload is not None:
                    page.locator("#message input[type=file]").set_input_files(str(upload))
                    page.locator("#message .thumbnail-item").wait_for()
                box.fill(text)
                box.press("Enter")
                page.wait_for_function(DONE, arg=before, timeout=60_000)
                return bots.last.inner_text()

            page.evaluate(  # every length the newest reply shows, as it streams in
                """() => { window.lengths = []; const chat = document.querySelector('#chat');
                new MutationObserver(() => { const b = chat.querySelectorAll('[data-testid="bot"]');
                  if (b.length) window.lengths.push(b[b.length - 1].innerText.trim().length); })
                .observe(chat, {subtree: true, childList: true, characterData: true}); }"""
            )
            reply = send("What colour is the ball?", image)
            lengths = [n for n in page.evaluate("window.lengths") if n > 1]  # past the "…" placeholder
            assert reply.strip() and lengths and lengths[-1] == len(reply.strip())
            assert len(set(lengths)) >= 2, f"the reply did not grow as it streamed: {lengths}"
            pictures = page.locator("#attention img")
            pictures.first.wait_for()
            assert pictures.count() == 1  # the image is read as two copies, and shown once
            assert "Entropy per frame" in page.locator("#attention-note").inner_text()
            assert len(list(temp.glob("fvlm-app-*"))) == 1  # the examples' folder, while the app runs
            page.screenshot(path=str(tmp_path / "app.png"))  # the test's own: docs/app.png is a trained model's

            follow = send("And where is it going?")
            assert follow.strip() and bots.count() == 2
            asked = [users.nth(i).get_attribute("aria-label") for i in range(users.count())]
            assert sum("What colour is the ball?" in a for a in asked) == 1
            assert sum("And where is it going?" in a for a in asked) == 1

            page.locator("#mode label", has_text="coarse_only").click()  # a notice: a bubble of its own
            page.wait_for_function("n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length > n", arg=2)
            assert bots.count() == 3 and bots.last.inner_text().startswith("Now reading in coarse_only")
            assert "Now reading" not in bots.nth(1).inner_text() and bots.nth(1).inner_text().strip() == follow.strip()

            said = send("", video)
            assert "Got a video, read as 4 frames" in said
            send("What happens?")
            page.wait_for_function("() => document.querySelectorAll('#attention img').length === 4")
            page.wait_for_function(f"() => [...document.querySelectorAll('#attention img')].every({DRAWN})")
            shown = page.evaluate(IN_VIEW)  # every frame of the clip in the gallery, none cut off or scrolled away
            assert shown["scrolled"] <= 1 and shown["inside"] == [True] * 4 and shown["below_label"], shown
            wide = (2 * round(app.DISPLAY_PX * 64 / 36) + 4) / app.DISPLAY_PX  # 16:9 frame and map, side by side
            assert all(abs(r - wide) < 0.05 * wide for r in shown["ratios"]), shown  # drawn undistorted
            page.screenshot(path=str(tmp_path / "video.png"))

            said = send("", broken)
            assert "broken.mp4 could not be read as a video" in said and "goes on about clip.mp4" in said
            last = bots.count()
            again = send("Are you still there?")
            assert again.strip() and again != said and bots.count() == last + 1
            assert server.poll() is None
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        proxy.close()
    assert list(temp.glob("fvlm-app-*")) == []  # stopped (SIGTERM), the app took its folder with it
    assert outside == [], f"the page asked hosts off this machine: {outside}"
    assert proxy.seen == [], f"the server tried to reach off this machine: {proxy.seen}"
    assert (tmp_path / "app.png").stat().st_size > 10_000  # a page was drawn
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
