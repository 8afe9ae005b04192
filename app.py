"""A chat demo in the browser over any saved model: upload an image or a video, talk about it over several turns,
and see where the model looked.

    python app.py [--model DIR] [--host 127.0.0.1] [--port 7860] [--repetition-penalty 1.2] [--no-repeat-ngram-size 3]

Every kind goes through the shared interface: `Answerer.prepare` encodes an upload once, a `Conversation` per
session carries the turns on its KV cache, and a change of the foveated model's mode starts a new Conversation
on the same encoding. Beside the chat, each frame as it is (its aspect ratio and colours kept; an image once, not
as the copies the model reads) next to the read's attention over it, and its entropy. Replies are greedy under
chat.py's rules against repeating.

The app stays on this machine: it binds 127.0.0.1 unless told otherwise, has no share link, sends no analytics,
uses system fonts and only the assets Gradio ships. Uploads are checked against the limits below from their
headers, before anything is decoded; whatever goes wrong with one is said in the chat. A port another program
holds is one line on stderr (exit status 2), and the folder of examples made at start-up goes when the app does.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import time

import argparse
import errno
import logging
import math
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

import cli
import registry
from chat import NO_REPEAT_NGRAM_SIZE, REPETITION_PENALTY, add_repetition_flags, check_repetition_flags
from cli import UserError
from config import FoveatedConfig
from evals.answering import Answerer, Prepared
from evals.attention_viz import beside, entropy, patch_maps
from evals.conversation import Conversation
from inputs.frames import IMAGE_EXTS, FrameSpec, Media, MediaError, letterboxed, probe_video
from layouts import toy
from vlm.base import VLM

MAX_BYTES = 64 * 2**20  # an upload's size
MAX_PIXELS = 4096 * 4096  # an image's, or a video frame's, width x height
MAX_VIDEO_SECONDS = 120.0
MAX_VIDEO_FRAMES = 7200  # frames in the container (two minutes at 60 fps)
UPLOAD_CAP_BYTES = 4 * MAX_BYTES  # Gradio refuses bigger uploads outright, before they reach the disk
MAX_NEW_TOKENS = 128  # a reply's length
MAX_SESSIONS = 64  # browser sessions whose conversation (KV cache, encoded upload) is kept; the oldest go first
VIDEO_EXTS = frozenset({"mp4", "m4v", "mov", "webm", "mkv", "avi", "mpg", "mpeg", "ogv"})
DISPLAY_PX = 224  # an attention picture's height
ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "runs" / "toy" / "final"
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]

log = logging.getLogger("fvlm.app")


class UploadError(ValueError):
    """An upload the app will not read; the message is for the person who sent it."""


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def _check_image(path: Path, name: str) -> None:
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise UploadError(f"{name} has too many pixels (the limit is {MAX_PIXELS:,}).") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UploadError(f"{name} could not be read as an image: the file is corrupt or not an image.") from e
    if w * h > MAX_PIXELS:
        raise UploadError(f"{name} is {w}x{h} = {w * h:,} pixels; the limit is {MAX_PIXELS:,}.")


def _check_video(path: Path, name: str) -> None:
    corrupt = f"{name} could not be read as a video: the file is corrupt or its format is not supported."
    try:
        with av.open(str(path)) as c:  # demuxes the header; no frame is decoded
            if not c.streams.video:
                raise UploadError(f"{name} has no video stream.")
            s = c.streams.video[0]
            w, h = s.codec_context.width, s.codec_context.height
            seconds = c.duration / av.time_base if c.duration else None
            if seconds is None and s.duration and s.time_base:
                seconds = float(s.duration * s.time_base)
            count = s.frames
    except UploadError:
        raise
    except Exception as e:  # FFmpeg raises many unrelated types
        raise UploadError(corrupt) from e
    if not w or not h:
        raise UploadError(corrupt)
    if w * h > MAX_PIXELS:
        raise UploadError(f"{name} has frames of {w}x{h} = {w * h:,} pixels; the limit is {MAX_PIXELS:,}.")
    if seconds is not None and seconds > MAX_VIDEO_SECONDS:
        raise UploadError(f"{name} lasts {seconds:.1f} s; videos are limited to {MAX_VIDEO_SECONDS:g} s.")
    if not count or seconds is None:  # the container does not say: count its packets (still no decoding)
        try:
            count, rate = probe_video(path, backend="pyav")
        except MediaError as e:
            raise UploadError(corrupt) from e
        if seconds is None and rate > 0 and count / rate > MAX_VIDEO_SECONDS:
            raise UploadError(f"{name} lasts {count / rate:.1f} s; videos are limited to {MAX_VIDEO_SECONDS:g} s.")
    if count > MAX_VIDEO_FRAMES:
        raise UploadError(f"{name} has {count:,} frames; videos are limited to {MAX_VIDEO_FRAMES:,}.")
    if not count:
        raise UploadError(corrupt)


def check_upload(path: str | Path, name: str | None = None) -> Media:
    """An uploaded file -> its Media, once its size, type, pixels and (for a video) duration and frame count are
    within the limits, all read without decoding; otherwise UploadError saying which limit and by how much."""
    path = Path(path)
    name = name or path.name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UploadError(f"{name} could not be read.") from e
    if size > MAX_BYTES:
        raise UploadError(f"{name} is {_mb(size)}; uploads are limited to {_mb(MAX_BYTES)}.")
    if size == 0:
        raise UploadError(f"{name} is empty.")
    ext = path.suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        _check_image(path, name)
        return Media("image", [path])
    if ext in VIDEO_EXTS:
        _check_video(path, name)
        return Media("video", [path])
    kinds = ", ".join(sorted(IMAGE_EXTS)) + " images or " + ", ".join(sorted(VIDEO_EXTS)) + " videos"
    raise UploadError(f"{name}: this type of file is not supported; send {kinds}.")


def prepare_upload(answerer: Answerer, path: str | Path, name: str | None = None) -> Prepared:
    """Check an upload, decode it as the model was trained to see it and encode it once."""
    media = check_upload(path, name)
    try:
        return answerer.prepare(media)
    except MediaError as e:
        log.info("upload %s failed to decode: %s", path, e)
        what = "image" if media.kind == "image" else "video"
        raise UploadError(f"{name or Path(path).name} could not be decoded as an {what}: the file is corrupt.") from e


@dataclass
class Look:
    """Where one read looked: a picture per frame shown (the frame, then each map's attention beside it)."""

    pictures: list[np.ndarray]  # (H, W, 3) uint8
    entropy: list[list[float]]  # [picture][map], nats
    uniform: float  # the entropy of an even spread over the patches, nats
    copies: int = 0  # an image read as this many copies of itself, shown once with the last copy's look; 0: a video

    def captions(self) -> list[str]:
        def nats(row: list[float]) -> str:
            return f"{' / '.join(f'{e:.2f}' for e in row)} nats"

        if self.copies:
            return [f"the image (the last of its {self.copies} copies' looks) · {nats(self.entropy[0])}"]
        return [f"frame {t + 1} · {nats(row)}" for t, row in enumerate(self.entropy)]

    def strip(self, title: str) -> Image.Image:
        """The look as one picture for the chat, beside the reply it belongs to: `title`, then the pictures side by
        side, each over its caption (its frame's entropy)."""
        pad, line = 6, 18
        width = sum(p.shape[1] for p in self.pictures) + pad * (len(self.pictures) + 1)
        height = max(p.shape[0] for p in self.pictures) + 2 * line + 3 * pad
        sheet = Image.new("RGB", (width, height), "white")
        draw, x = ImageDraw.Draw(sheet), pad
        draw.text((pad, pad), title, fill="black")
        for picture, caption in zip(self.pictures, self.captions(), strict=True):
            sheet.paste(Image.fromarray(picture), (x, line + 2 * pad))
            draw.text((x, line + 2 * pad + picture.shape[0] + pad // 2), caption, fill="black")
            x += picture.shape[1] + pad
        return sheet


def shown(picture: Any, spec: FrameSpec) -> np.ndarray:
    """A decoded frame as it is shown: DISPLAY_PX high in its own aspect ratio, so a 16:9 clip is not squashed
    square as the model may be fed it (an attention map over the squashed square stretches back with the frame,
    patch for patch), or letterboxed as the model saw it, which keeps the aspect ratio already."""
    im = (Image.fromarray(picture) if isinstance(picture, np.ndarray) else picture).convert("RGB")
    if spec.letterbox:
        return np.asarray(letterboxed(im, DISPLAY_PX))
    w, h = im.size
    return np.asarray(im.resize((max(1, round(DISPLAY_PX * w / h)), DISPLAY_PX), Image.BILINEAR))


def look_of(conversation: Conversation, still: bool = False) -> Look | None:
    """The attention pictures of a conversation's read, or None when its kind reports none (or it has no frames,
    or no turn has read the frames yet). `still`: the frames are copies of one image, shown once, with the look of
    the last copy (in the autoregressive read, the query written after the model had seen the image most)."""
    attention = conversation.attention  # (T, maps, 1+P)
    if attention is None or not len(attention):
        return None
    positions = attention.shape[-1] - 1
    side = math.isqrt(positions)
    if side * side != positions:  # frames are square, so their patch grids are
        log.warning("attention over %d patches does not fill a square grid", positions)
        return None
    maps = patch_maps(attention, (side, side))  # (T, maps, side, side)
    spec, pictures = conversation.answerer.frames, conversation.state.pictures
    chosen = [maps.shape[0] - 1] if still else range(maps.shape[0])
    drawn = [beside(shown(pictures[t], spec), maps[t]) for t in chosen]
    rows = entropy(maps).tolist()  # over the whole map, as the model read it
    return Look(drawn, [rows[t] for t in chosen], math.log(positions), maps.shape[0] if still else 0)


def look_note(answerer: Answerer, session: Session) -> str:
    """What the attention panel says beside its pictures (or instead of them)."""
    kind = answerer.model.config.kind
    conv = session.conversation
    if conv is None:
        return "Upload an image or a video (or pick an example) and ask about it."
    if not conv.state.pictures:
        return "No image or video in this conversation: there is nothing to look at."
    if session.look is None:
        if conv.attention is None and conv.messages:
            return f"This model kind (`{kind}`) does not report where it looks."
        return "Ask a question: the pictures of where the model looked appear with the reply."
    who = "the query" if kind == "foveated" else "each pooled token"
    if conv.rereads and conv.looks:  # the frames follow each question: every question has a look of its own
        who = f"{who} looked for «{conv.looks[-1][0]}», and"
    mean = [sum(row) / len(row) for row in session.look.entropy]
    copies = session.look.copies
    what = f" (the image, read as {copies} copies: the last copy's look)" if copies else ""
    return (
        f"Where {who} looked, read **{conv.read}**{what}. Left, the frame as it is; right, the attention over its "
        f"grey. Entropy per frame (nats; {session.look.uniform:.2f} is an even spread over the patches, 0 a single "
        f"patch): " + ", ".join(f"{e:.2f}" for e in mean)
    )


@dataclass
class Session:
    """One browser session: what the chat shows, and the conversation the model is in."""

    chat: list[dict[str, Any]] = field(default_factory=list)  # Gradio's message dicts
    prepared: Prepared | None = None  # the upload, encoded once
    upload: str | None = None  # its name
    conversation: Conversation | None = None
    look: Look | None = None  # drawn once per read: per conversation, or per question where each is read anew

    @property
    def still(self) -> bool:
        """Whether the upload is an image (its frames are copies of it)."""
        return self.upload is not None and Path(self.upload).suffix.lower().lstrip(".") in IMAGE_EXTS


def _say(session: Session, text: str) -> None:
    session.chat.append({"role": "assistant", "content": text})


def start_upload(answerer: Answerer, session: Session, path: str | Path, read: str, name: str | None = None) -> Session:
    """A new upload starts a new conversation (the chat goes on); UploadError leaves `session` as it was."""
    prepared = prepare_upload(answerer, path, name)
    return Session(session.chat, prepared, name or Path(path).name, Conversation(answerer, prepared, read))


def change_read(answerer: Answerer, session: Session, read: str) -> Session:
    """A change of read starts a new conversation on the same encoding: nothing is decoded or encoded again."""
    if session.prepared is None or (session.conversation is not None and session.conversation.read == read):
        return session
    new = Session(session.chat, session.prepared, session.upload, Conversation(answerer, session.prepared, read))
    if session.conversation is not None and session.conversation.messages:
        _say(new, f"Now reading in **{read}**: a new conversation about the same upload (it is not encoded again).")
    return new


def respond(
    answerer: Answerer,
    session: Session,
    message: dict[str, Any],
    read: str,
    max_new_tokens: int = MAX_NEW_TOKENS,
    repetition_penalty: float = REPETITION_PENALTY,
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE,
    shelf: Path | None = None,
) -> Iterator[Session]:
    """One message from the chat box (`{"text", "files"}`): an upload starts a new conversation, a question is
    answered in the current one; the session after every step, the reply growing by a token each time. Replies
    follow chat.py's rules against repeating unless told otherwise (1.0 and 0: plain greedy).

    Where every question is read anew (frames_at after_question), its look is drawn for it and, once the reply is
    written, put in the chat after the reply as a picture (a PNG in `shelf`, the page's own folder; default: the
    system's temporary folder), so that each answer keeps where its question looked."""
    text = (message.get("text") or "").strip()
    files = list(message.get("files") or [])
    if files:
        path = Path(files[-1])
        try:
            new = start_upload(answerer, session, path, read)
        except UploadError as e:
            session.chat.append({"role": "user", "content": f"Upload: {path.name}"})
            rest = f" The conversation goes on about {session.upload}." if session.upload else ""
            _say(session, f"{e}{rest}" + (" Your question was not asked." if text else ""))
            yield session
            return
        except Exception:  # noqa: BLE001 — the app must survive whatever a file does
            log.exception("upload %s failed", path)
            session.chat.append({"role": "user", "content": f"Upload: {path.name}"})
            _say(session, f"{path.name} could not be read.")
            yield session
            return
        session = new
        session.chat.append({"role": "user", "content": {"path": str(path)}})
        kind = "an image" if Path(path).suffix.lower().lstrip(".") in IMAGE_EXTS else "a video"
        frames = len(session.prepared.pictures)
        if len(files) > 1:
            _say(session, f"One upload at a time: reading the last, {path.name}.")
        if not text:
            _say(session, f"Got {kind}, read as {frames} frames of {answerer.frames.size} px. Ask about it.")
        yield session
    if not text:
        return
    if session.conversation is None:  # a question before any upload: a text-only conversation
        prepared = answerer.prepare(Media("none"))
        session = Session(session.chat, prepared, None, Conversation(answerer, prepared, read))
    session.chat.append({"role": "user", "content": text})
    session.chat.append({"role": "assistant", "content": "…"})
    reply = session.chat[-1]
    conversation = session.conversation
    if conversation.rereads:
        session.look = None  # this question gets a read of its own
    try:
        for so_far in conversation.ask(text, max_new_tokens, repetition_penalty, no_repeat_ngram_size):
            reply["content"] = so_far or "(the model ended its turn without a word)"
            if session.look is None:
                session.look = look_of(conversation, session.still)
            yield session
    except Exception:  # noqa: BLE001
        log.exception("generation failed")
        reply["content"] = "Something went wrong while answering; the upload and the app are still here."
        yield session
        return
    if conversation.rereads and session.look is not None:
        shelf = shelf or Path(tempfile.gettempdir())
        path = shelf / f"look-{id(conversation)}-{len(conversation.looks)}.png"
        session.look.strip(f"Where «{text}» looked ({conversation.read})").save(path)
        session.chat.append({"role": "assistant", "content": {"path": str(path)}})
        yield session


def load_model(path: str | Path | None) -> tuple[VLM, str]:
    """The model to serve, and a line about it for the page: `path`, else the toy run's checkpoint when there is
    one, else the foveated model on the packaged backbones with an untrained connector."""
    if path is not None:
        return registry.load(path), f"Model: `{path}`."
    if DEFAULT_MODEL.is_dir():
        return registry.load(DEFAULT_MODEL), f"Model: the toy run's checkpoint, `{DEFAULT_MODEL.relative_to(ROOT)}`."
    model = registry.new_model(FoveatedConfig(dino="packaged", llm="packaged"))
    note = (
        "Model: the foveated model on the packaged DINOv2-small and SmolLM2-135M. **Its connector is untrained**: "
        "it runs end to end, but its replies do not yet depend on what it sees (train one with "
        "`python toyworld.py run`, or pass `--model DIR`)."
    )
    return model, note


def _write_mp4(images: list[Image.Image], path: Path, fps: int) -> None:
    """Near-lossless H.264 (yuv420p: it plays in every browser; MPEG-4 at a high rate where FFmpeg lacks x264), so
    the frames decode to what was drawn within a level or two, as the toy world's JPEGs do."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = images[0].size
        s.pix_fmt = "yuv420p"
        if codec == "libx264":
            s.options = {"crf": "8"}
        else:
            s.bit_rate = 20_000_000
        for im in images:
            for p in s.encode(av.VideoFrame.from_image(im.convert("RGB"))):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_examples(
    folder: str | Path, clips: tuple[int, ...] = (0, 3), still: int = 6, frames: int = 4, size: int = 112
) -> list[tuple[Path, str]]:
    """Toy-world media made here (nothing downloaded): held-out clips `clips` of seed 0 as mp4 and clip `still`'s
    first frame as jpg, each labelled with its ball's colour (three different ones), so a trained toy model can be
    checked by eye. Pass the model's frame size and frames per clip (the defaults are the toy world's): a clip made
    so is the very held-out clip the toy model is evaluated on, every frame read once at its own size, not a clip
    it reads every other frame of (a ball twice as fast, past where training clips go) downscaled (noise smoothed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size += size % 2  # H.264 in yuv420p needs even sides
    out = []
    for n, index in enumerate(clips):
        s = toy.sample(0, "eval", index, size, frames)
        path = folder / f"toy_clip_{n + 1}.mp4"
        _write_mp4(s["frames"], path, fps=4)
        out.append((path, f"toy clip {n + 1} ({s['options'][s['answer']]} ball)"))
    s = toy.sample(0, "eval", still, size, frames)
    path = folder / "toy_frame.jpg"
    s["frames"][0].save(path, quality=95)  # as the toy world's shards store a frame
    out.append((path, f"toy frame ({s['options'][s['answer']]} ball)"))
    return out


# The gallery grows with its pictures, so no row is scrolled off, and starts below its label; each cell takes its
# picture's shape (a frame and its map side by side are wider than Gradio's square cells), its caption under it.
CSS = """#attention .grid-wrap, #attention .fixed-height { max-height: none; min-height: 0; }
#attention .grid-wrap { padding-top: 2.25em; }
#attention .grid-container { grid-template-rows: none; grid-auto-rows: auto; }
#attention .thumbnail-item { aspect-ratio: auto; height: auto; }
#attention .thumbnail-item img { height: auto; }
#attention .caption-label { position: static; max-width: none; font-size: 0.8em; border: none; }"""


def columns(pictures: int) -> int:
    """Gallery columns for this many pictures: one a row while that keeps a clip's frames in view at once."""
    return 1 if pictures <= 4 else 2 if pictures <= 16 else 4


def build_app(
    answerer: Answerer,
    model_note: str,
    examples: list[tuple[Path, str]],
    max_new_tokens: int = MAX_NEW_TOKENS,
    repetition_penalty: float = REPETITION_PENALTY,
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE,
    shelf: Path | None = None,
):
    """The Gradio page: chat on the left, where the model looked on the right; one Session per browser tab.
    `shelf`: the folder the page may serve pictures from (each question's look, where every question is read
    anew)."""
    import gradio as gr

    reads = list(answerer.reads)
    kind = answerer.model.config.kind
    spec = answerer.frames

    def outputs(session: Session, drawn: bool = True) -> tuple:
        look = session.look
        pictures = list(zip(look.pictures, look.captions(), strict=True)) if look else []
        gallery = gr.Gallery(pictures, columns=columns(len(pictures))) if drawn else gr.skip()
        return session.chat, session, gallery, look_note(answerer, session)

    def on_message(message: dict | None, current: Session | None, read: str):
        session = current or Session()
        locked = gr.MultimodalTextbox(value=None, interactive=False)
        looked: Any = object()  # the first step always draws (a new upload clears the last pictures)
        rules = (repetition_penalty, no_repeat_ngram_size)
        for step in respond(answerer, session, message or {}, read, max_new_tokens, *rules, shelf):
            session, drawn, looked = step, step.look is not looked, step.look
            yield locked, *outputs(session, drawn)
        yield gr.MultimodalTextbox(value=None, interactive=True), *outputs(session)

    def on_read(read: str, session: Session | None):
        session = change_read(answerer, session or Session(), read)
        return outputs(session)

    def on_clear():
        session = Session()
        return (*outputs(session), gr.MultimodalTextbox(value=None, interactive=True))

    header = (
        f"## fvlm chat\n{model_note} Kind `{kind}`; it reads {spec.max_frames} frames of a video and an image as "
        f"{spec.image_frames} copies, at {spec.size} px. Nothing leaves this machine."
    )
    with gr.Blocks(title="fvlm chat", analytics_enabled=False) as demo:
        gr.Markdown(header, elem_id="header")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(  # a notice (a change of read) is a bubble of its own, not part of the last reply
                    elem_id="chat", label="Chat", height=460, feedback_options=None, group_consecutive_messages=False
                )
                box = gr.MultimodalTextbox(
                    elem_id="message",
                    sources=["upload"],
                    file_count="single",
                    show_label=False,
                    placeholder="Ask a question, or attach an image or a video",
                    autofocus=True,
                )
                clear = gr.Button("New chat", size="sm", elem_id="clear")
                gr.Examples(
                    examples=[[{"text": "What colour is the ball?", "files": [str(p)]}] for p, _ in examples],
                    example_labels=[label for _, label in examples],
                    inputs=[box],
                    label="Toy-world examples (made at start-up)",
                )
            with gr.Column(scale=2):
                mode = gr.Radio(reads, value=reads[-1], label="Read mode", visible=len(reads) > 1, elem_id="mode")
                gallery = gr.Gallery(
                    label="Where the model looked", elem_id="attention", columns=1, height="auto", format="png",
                    object_fit="contain", interactive=False,
                )  # fmt: skip
                note = gr.Markdown(look_note(answerer, Session()), elem_id="attention-note")
        # one model, so one event at a time: a change of read waits for the reply it would otherwise cut off
        box.submit(on_message, [box, state, mode], [box, chatbot, state, gallery, note], concurrency_id="model")
        mode.change(on_read, [mode, state], [chatbot, state, gallery, note], concurrency_id="model")
        clear.click(on_clear, None, [chatbot, state, gallery, note, box])
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"a saved model directory (default: {DEFAULT_MODEL.relative_to(ROOT)} if present)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="a reply's length in tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_repetition_flags(p)
    args = p.parse_args(argv)
    if args.model is not None and not Path(args.model).is_dir():
        raise UserError(f"no saved model at {args.model}: train one (python toyworld.py run) or pass another --model")
    check_repetition_flags(p, args)
    return args


def check_port(host: str, port: int) -> None:
    """Refuse an address this app cannot serve on before the model loads, in one line that names the port and
    `--port` (Gradio's own failure, later, is a traceback that suggests GRADIO_SERVER_PORT, which this command
    does not read). Bound as uvicorn binds, with SO_REUSEADDR: a port left in TIME_WAIT is free."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise cli.UserError(f"cannot serve on {host}: {e.strerror}; pass another address with --host") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise cli.UserError(f"port {port} on {host} is in use: pass another with --port") from None
            raise cli.UserError(f"cannot serve on {host} port {port}: {e.strerror}; see --host and --port") from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the app as Ctrl-C does: through main's clean-up


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_port(args.host, args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, note = load_model(args.model)
    answerer = Answerer(model.to(args.device))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="fvlm-app-") as folder:  # the examples: gone when the app is
            serve(answerer, note, Path(folder), args)
    except KeyboardInterrupt:
        pass  # stopped: the folder is gone, and so is the server


def serve(answerer: Answerer, note: str, folder: Path, args: argparse.Namespace) -> None:
    """Serve the page until interrupted (Ctrl-C or SIGTERM), then close the server."""
    spec = answerer.frames  # the examples as this model reads a clip: for the toy model, its held-out clips exactly
    examples = write_examples(folder, frames=spec.max_frames, size=spec.size)
    demo = build_app(answerer, note, examples, args.max_new_tokens, args.repetition_penalty, args.no_repeat_ngram_size,
                     folder)  # fmt: skip
    import gradio as gr

    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)  # the default's web fonts: none needed
    try:
        demo.queue(max_size=32).launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            theme=theme,
            css=CSS,
            allowed_paths=[str(folder)],
            max_file_size=UPLOAD_CAP_BYTES,
            state_session_capacity=MAX_SESSIONS,
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            footer_links=[],
            show_error=False,
            quiet=True,  # Gradio's banner suggests a share link, which this app does not offer
            prevent_thread_lock=True,
        )
    except OSError as e:  # taken since check_port looked: Gradio's "Cannot find empty port ...", as one line
        if "port" not in str(e):
            raise
        raise cli.UserError(f"port {args.port} on {args.host} is in use: pass another with --port") from None
    try:
        print(f"fvlm chat: serving on http://{args.host}:{args.port}", flush=True)
        while demo.is_running:
            time.sleep(0.1)
    finally:
        demo.close(verbose=False)


if __name__ == "__main__":
    cli.run(main)
