"""A model's processor: raw samples (media + conversation) → the tensors it trains on, and questions → prompts.

A raw sample is what a reader yields (readers.py): `__key__`, `json` (the conversation: bytes or a dict) and
media members named as in the shards — numbered frames `000.jpg, 001.jpg …`, one `mp4` (or webm/mkv/avi/mov),
one `jpg` (or png/webp/…), or none for a text-only sample — whose values are bytes or a path to a file.
Labels are built here, once (tokenization.py's chat functions), for every kind of model:

- `ChatProcessor`: every kind that puts frame tokens before (or inside the first user turn of) a chat
  LLM's text (the foveated model and the tower + connector kinds); frames as the model is fed (its FrameSpec:
  size, frames per clip, copies per image, fps, the tower's mean/std, resize or letterbox);
- `SmolVLMProcessor` (smolvlm.py): SmolVLM's own prompt layout, images expanded to their image tokens.

Numbered frames are sampled at the model's fps when the sample's JSON states the rate they were extracted at
(`fps`); without it they are taken to be at the training rate already (the published shards hold frames
extracted at 1 fps), and up to `max_frames` of them are spread over the clip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from collate import collate, pad_frames, pad_text, pad_views
from inputs.frames import FrameSpec, Media, probe_video, sample_indices
from inputs.tokenization import DESCRIBE_PROMPT, IGNORE_INDEX, answer_labels, chat_ids, encode_sample, prompt_ids
from layouts.shards import media_of, meta_of, stated_fps


class ChatProcessor:
    """Samples and questions for a frames-first model (see the module docstring)."""

    def __init__(self, tokenizer: Any, frames: FrameSpec, stage: int = 2, max_text_len: int = 1024) -> None:
        if tokenizer is None:
            raise ValueError("the model carries no tokenizer: the processor needs one to build its text")
        self.tokenizer, self.frames, self.stage, self.max_text_len = tokenizer, frames, stage, max_text_len
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad

    # ---- pictures ------------------------------------------------------------------------------

    @staticmethod
    def media(raw: dict) -> Media:
        """A raw sample's media, with the rate its numbered frames were extracted at when its JSON states one."""
        kind, items = media_of(raw)
        return Media("none" if kind == "text" else kind, items, fps=stated_fps(raw) if kind == "frames" else None)

    def num_frames(self, raw: dict) -> int:
        """The T a sample will decode to, from member names (and a container probe for videos)."""
        media = self.media(raw)
        if media.kind == "frames":
            return len(media.frame_indices(len(media.items), self.frames))
        if media.kind == "image":
            return self.frames.image_frames
        if media.kind == "video":
            try:
                return len(sample_indices(*probe_video(media.items[0]), self.frames.max_frames, self.frames.fps))
            except ValueError:  # MediaError included: decoding fails too and counts the sample
                return 0
        return 0

    def pictures(self, raw: dict) -> list[Image.Image | np.ndarray]:
        """The sample's frames decoded, before resizing and normalisation (frames.Media's one rule)."""
        return self.media(raw).pictures(self.frames)

    def clip(self, pictures: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Decoded frames → (T, 3, S, S) as the model is fed."""
        if not pictures:
            return torch.zeros(0, 3, self.frames.size, self.frames.size)
        return self.frames.tensor(pictures)

    # ---- training samples ----------------------------------------------------------------------

    def encode(self, raw: dict) -> dict[str, Any]:
        """A raw sample → token lists with labels and frames (T, 3, S, S); ValueError for a bad conversation,
        frames.MediaError for undecodable media."""
        sample = encode_sample(self.tokenizer, meta_of(raw), self.stage, self.max_text_len)
        sample["frames"] = self.clip(self.pictures(raw))
        return sample

    def collate(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate(samples, self.pad_id)

    # ---- questions -----------------------------------------------------------------------------

    @property
    def end_ids(self) -> list[int]:
        """The tokens that end the model's turn."""
        return [self.tokenizer.eos_token_id]

    def visual(self, pictures: Sequence[Image.Image | np.ndarray]) -> dict[str, torch.Tensor]:
        """A batch of one clip for the model's `prepare`."""
        return self.visual_batch([pictures])

    def visual_batch(self, pictures: Sequence[Sequence[Image.Image | np.ndarray]]) -> dict[str, torch.Tensor]:
        """Several clips, padded to the longest, for one `prepare`: clip b is batch row b."""
        return pad_frames([self.clip(p) for p in pictures])

    def prompt(self, question: str, pictures: Sequence[Any] = ()) -> list[int]:
        """The tokens of a user turn and the generation prompt: what the model continues (the frames come as
        tokens of their own, so the prompt does not depend on them)."""
        return prompt_ids(self.tokenizer, question)

    def answers(self, question: str, answers: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(continuations, labels): each answer as the assistant turn after the prompt, scored over the answer and
        its end-of-turn token (what stage-2 training labels)."""
        head = len(self.prompt(question))
        pairs = [chat_ids(self.tokenizer, question, a, stage=2) for a in answers]
        return [ids[head:] for ids, _ in pairs], [labels[head:] for _, labels in pairs]

    def render(
        self, messages: list[dict[str, str]], pictures: Sequence[Any] = (), generation_prompt: bool = True
    ) -> str:
        """The chat template's text of a conversation (the frames come as tokens of their own)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def turn_ids(self, text: str, pictures: Sequence[Any] = (), first: bool = False) -> list[int]:
        """The tokens of a piece of rendered conversation."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class SmolVLMProcessor:
    """Samples and questions for SmolVLM: every frame of a clip is one image of the prompt (an image is one
    image), expanded by its Idefics3 processor into image tokens; the answer and its end-of-turn token are
    tokenised apart from the prompt, so the prompt tokens are exactly those generation is fed."""

    def __init__(self, processor: Any, frames: FrameSpec, stage: int = 2, max_text_len: int = 1024) -> None:
        self.processor, self.frames, self.stage, self.max_text_len = processor, frames, stage, max_text_len
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self._chat = ChatProcessor(tokenizer, dataclasses.replace(frames, image_frames=1), stage, max_text_len)

    def num_frames(self, raw: dict) -> int:
        return self._chat.num_frames(raw)

    def pictures(self, raw: dict) -> list[Image.Image]:
        return [p if isinstance(p, Image.Image) else Image.fromarray(p) for p in self._chat.pictures(raw)]

    @staticmethod
    def _turn(images: int, text: str, role: str = "user") -> dict:
        content = [{"type": "image"}] * images if role == "user" else []
        return {"role": role, "content": content + [{"type": "text", "text": text}]}

    def _messages(self, meta: dict, images: int) -> tuple[list[dict], list[str]]:
        """(messages up to each answer, the answers): the images go into the first user turn."""
        if "turns" in meta:
            turns = [t for t in meta["turns"] if t["role"] != "system"]
        elif "caption" in meta:
            turns = [{"role": "user", "content": DESCRIBE_PROMPT}, {"role": "assistant", "content": meta["caption"]}]
        elif "user" in meta and "assistant" in meta:
            turns = [{"role": "user", "content": meta["user"]}, {"role": "assistant", "content": meta["assistant"]}]
        else:
            raise ValueError("a SmolVLM sample needs user/assistant, turns or caption")
        messages, first = [], True
        for t in turns:
            messages.append(self._turn(images if first and t["role"] == "user" else 0, t["content"], t["role"]))
            first = first and t["role"] != "user"
        return messages, [t["content"] for t in turns if t["role"] == "assistant"]

    def encode(self, raw: dict) -> dict[str, Any]:
        """Prompt ids (images expanded) + answers; stage 1 labels every text token but the image tokens,
        later stages each answer and its end-of-turn token."""
        meta = meta_of(raw)
        if "chosen" in meta or "token_ids" in meta:
            raise ValueError("SmolVLM trains on user/assistant, turns or caption samples")
        images = self.pictures(raw)
        messages, answers = self._messages(meta, len(images))
        ids, labels, pixels, said = [], [], None, ""  # `said`: the rendering consumed so far
        for i, at in enumerate(k for k, m in enumerate(messages) if m["role"] == "assistant"):
            prompt = self.processor.apply_chat_template(messages[:at], add_generation_prompt=True)
            full = self.processor.apply_chat_template(messages[: at + 1])
            reply = full[len(prompt) :]
            if not (prompt.startswith(said) and full.startswith(prompt) and answers[i] in reply):
                raise ValueError("the chat template does not continue the generation prompt with the answer")
            context = prompt[len(said) :]
            if i == 0:  # the first user turn holds the images
                inputs = self.processor(text=[context], images=[images] if images else None, return_tensors="pt")
                context_ids = inputs["input_ids"][0].tolist()
                pixels = (inputs["pixel_values"][0], inputs["pixel_attention_mask"][0]) if images else None
            else:
                context_ids = self._ids(context)
            cut = reply.index(answers[i]) + len(answers[i])
            answer, suffix = self._ids(reply[:cut]), self._ids(reply[cut:])
            piece = context_ids + answer + suffix
            ids += piece
            labels += answer_labels(context_ids, answer, suffix) if self.stage > 1 else self._text_labels(piece)
            said = full
        out = {"input_ids": ids[: self.max_text_len], "labels": labels[: self.max_text_len]}
        if pixels is not None:
            out["pixel_values"], out["pixel_attention_mask"] = pixels
        return out

    def _ids(self, text: str) -> list[int]:
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _text_labels(self, ids: list[int]) -> list[int]:
        image = set(self.processor.tokenizer.convert_tokens_to_ids(["<image>", "<fake_token_around_image>",
                                                                   "<global-img>"]))  # fmt: skip
        return [IGNORE_INDEX if t in image else t for t in ids]

    def collate(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels (B, L) right-padded; pixel_values (B, N, 3, H, W) and
        pixel_attention_mask (B, N, H, W) padded as the image processor pads them: missing views are all-zero
        images (Idefics3 skips those), and pixels past a view's own size are zero and masked out."""
        batch = pad_text([s["input_ids"] for s in samples], [s["labels"] for s in samples], self.pad_id)
        views = [(s["pixel_values"], s["pixel_attention_mask"]) if "pixel_values" in s else None for s in samples]
        return {**batch, **pad_views(views)}

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def end_ids(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids("<end_of_utterance>"), self.tokenizer.eos_token_id]

    def _inputs(self, pictures: Sequence[Any], question: str) -> Any:
        images = [p if isinstance(p, Image.Image) else Image.fromarray(p) for p in pictures]
        prompt = self.processor.apply_chat_template([self._turn(len(images), question)], add_generation_prompt=True)
        return self.processor(text=[prompt], images=[images] if images else None, return_tensors="pt")

    def visual(self, pictures: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The pixel inputs of the images (one batch row) for the model's `prepare`."""
        if not pictures:
            return {}
        inputs = self._inputs(pictures, "")
        return {"pixel_values": inputs["pixel_values"], "pixel_attention_mask": inputs["pixel_attention_mask"]}

    def visual_batch(self, pictures: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        """Several questions' images for one `prepare`, views padded as in training batches: row b is question b."""
        rows = [self.visual(p) for p in pictures]
        return pad_views([(r["pixel_values"][0], r["pixel_attention_mask"][0]) if r else None for r in rows])

    def prompt(self, question: str, pictures: Sequence[Any] = ()) -> list[int]:
        """The prompt's ids, every image expanded into its image tokens."""
        return self._inputs(pictures, question)["input_ids"][0].tolist()

    def render(
        self, messages: list[dict[str, str]], pictures: Sequence[Any] = (), generation_prompt: bool = True
    ) -> str:
        """The chat template's text of a conversation, the images in its first user turn."""
        turns = [self._turn(len(pictures) if i == 0 else 0, m["content"], m["role"]) for i, m in enumerate(messages)]
        return self.processor.apply_chat_template(turns, add_generation_prompt=generation_prompt)

    def turn_ids(self, text: str, pictures: Sequence[Any] = (), first: bool = False) -> list[int]:
        """The tokens of a piece of rendered conversation; the first piece's images expanded into image tokens."""
        if first and pictures:
            images = [p if isinstance(p, Image.Image) else Image.fromarray(p) for p in pictures]
            return self.processor(text=[text], images=[images], return_tensors="pt")["input_ids"][0].tolist()
        return self._ids(text)

    def answers(self, question: str, answers: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Each answer's tokens (through its end-of-turn token) after the generation prompt, and their labels."""
        conts = []
        user = self._turn(0, question)
        prompt = self.processor.apply_chat_template([user], add_generation_prompt=True)
        for a in answers:
            full = self.processor.apply_chat_template([user, self._turn(0, a, "assistant")])
            if not full.startswith(prompt):
                raise ValueError("the chat template does not continue the generation prompt with the answer")
            conts.append(self._ids(full[len(prompt) :].rstrip("\n")))
        return conts, [list(c) for c in conts]


def processor_for(
    model: Any, stage: int = 2, max_text_len: int = 1024, frames: FrameSpec | None = None
) -> ChatProcessor | SmolVLMProcessor:
    """The processor that feeds `model` (any kind): its frame settings (or `frames`), its tokenizer or SmolVLM's
    processor."""
    frames = frames or model.frames
    if getattr(model, "kind", "") == "smolvlm":
        return SmolVLMProcessor(model.processor, frames, stage, max_text_len)
    return ChatProcessor(model.tokenizer, frames, stage, max_text_len)
