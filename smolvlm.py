"""SmolVLM (Idefics3) with its pixel-shuffle connector swapped for a TokenLearner-QFormer (seed 000).

Idefics3Model calls `self.connector(image_hidden_states)` with one tensor (N, P, vision_hidden) per real
image or tile and scatters the result, flattened, into the `<image>` positions of the prompt. So the
connector's S tokens per image must match the processor's `image_seq_len`: every builder here sets both.
It has to be the processor attribute: transformers 5.23 ignores `processor(..., image_seq_len=...)`.

Training samples (`encode_example`, `collate`) and inference (`generate`) build prompts with the same chat
template and processor, so the prompt tokens seen in training are exactly those seen at inference.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedTokenizerBase,
)

from collate import pad_text
from connectors import TokenLearnerQFormer, TokenLearnerQFormerConfig
from tokenization import answer_labels

HUB_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"
CONNECTOR_CONFIG = "connector_config.json"
WEIGHTS = "model.safetensors"

# SmolVLM's own chat template, so that prompts built offline look like the hub processor's.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The tokens Idefics3Processor writes into prompts: global-image tag, tile positions (up to 6×6), image
# delimiters, image placeholder, end of turn.
IMAGE_TOKENS = [
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
]

# Prefixes of Idefics3ForConditionalGeneration's parameter names, per learning-rate group.
GROUP_PREFIXES = {
    "vision": ("model.vision_model.",),
    "connector": ("model.connector.",),
    "llm": ("model.text_model.", "lm_head."),
}


def offline_processor(
    tokenizer: PreTrainedTokenizerBase,
    image_seq_len: int,
    tile_size: int,
    longest_edge: int | None = None,
    do_image_splitting: bool = True,
) -> Idefics3Processor:
    """An Idefics3Processor built without the hub, around a text tokenizer (e.g. SmolLM2's, offline from
    the packaged GGUF).

    Idefics3's prompt tokens are added to `tokenizer` in place, as Idefics3Processor itself does; size the
    model's vocabulary after this call. `tile_size` must equal the vision tower's `image_size`. Images are
    resized so that their longest edge is `longest_edge` (default 4 tiles), then cut into tile_size² tiles
    plus one global view. Uses the PIL image processor: the default one needs torchvision.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge or 4 * tile_size},
        max_image_size={"longest_edge": tile_size},
        do_image_splitting=do_image_splitting,
    )
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)


def connector_config(config: Idefics3Config, **overrides) -> TokenLearnerQFormerConfig:
    """A TokenLearnerQFormerConfig whose input/output widths fit `config`; other fields from `overrides`."""
    return TokenLearnerQFormerConfig(
        vision_hidden=config.vision_config.hidden_size, text_hidden=config.text_config.hidden_size, **overrides
    )


def attach_connector(
    model: Idefics3ForConditionalGeneration, connector: nn.Module
) -> Idefics3ForConditionalGeneration:
    """Replace `model.model.connector`, moved to the model's device and dtype."""
    model.model.connector = connector.to(device=model.device, dtype=model.dtype)
    return model


def build_smolvlm(
    config: Idefics3Config, connector: TokenLearnerQFormerConfig
) -> Idefics3ForConditionalGeneration:
    """A randomly initialised SmolVLM-TokenLearner-QFormer, for tests, smoke runs and loading saved weights."""
    return attach_connector(Idefics3ForConditionalGeneration(config), TokenLearnerQFormer(connector))


def from_hub(
    name: str = HUB_ID, dtype: torch.dtype = torch.bfloat16, **connector: Any
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """Pretrained SmolVLM with a fresh TokenLearner-QFormer connector and its processor (needs the hub, or
    `name` a local copy). `connector`: TokenLearnerQFormerConfig fields other than the widths.

    The vision tower and language model keep their pretrained weights; the connector starts from scratch.
    """
    model = Idefics3ForConditionalGeneration.from_pretrained(name, dtype=dtype)
    processor = Idefics3Processor.from_pretrained(name)
    connector = connector_config(model.config, **connector)
    attach_connector(model, TokenLearnerQFormer(connector))
    processor.image_seq_len = connector.num_queries
    return model, processor


def save_pretrained(
    model: Idefics3ForConditionalGeneration, processor: Idefics3Processor, directory: str | Path
) -> None:
    """Write config.json, connector_config.json, model.safetensors and the processor's files."""
    connector = model.model.connector
    if processor.image_seq_len != connector.config.num_queries:
        raise ValueError(f"processor writes {processor.image_seq_len} <image> tokens per image, "
                         f"connector makes {connector.config.num_queries}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    (directory / CONNECTOR_CONFIG).write_text(json.dumps(asdict(connector.config), indent=2))
    # save_model drops the duplicate name of tied tensors (lm_head / embed_tokens) that save_file rejects
    save_model(model, str(directory / WEIGHTS), metadata={"dtype": str(model.dtype).removeprefix("torch.")})
    processor.save_pretrained(directory)


def load_pretrained(directory: str | Path) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """Inverse of `save_pretrained`: the model (in its saved dtype, eval mode, CPU) and its processor."""
    directory = Path(directory)
    connector = TokenLearnerQFormerConfig(**json.loads((directory / CONNECTOR_CONFIG).read_text()))
    with safe_open(directory / WEIGHTS, framework="pt") as f:
        dtype = getattr(torch, f.metadata()["dtype"])
    model = build_smolvlm(Idefics3Config.from_pretrained(directory), connector).to(dtype)
    load_model(model, directory / WEIGHTS, strict=True)
    return model.eval(), Idefics3Processor.from_pretrained(directory)


def group_of(name: str) -> str:
    """The learning-rate group ("vision", "connector" or "llm") of a parameter, by its name."""
    group = next((g for g, prefixes in GROUP_PREFIXES.items() if name.startswith(prefixes)), None)
    if group is None:
        raise ValueError(f"parameter {name} belongs to no group")
    return group


def param_groups(model: Idefics3ForConditionalGeneration) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named parameters split into "vision", "connector" and "llm" so the trainer can give each group its
    own learning rate (0 freezes it). Tied weights appear once, under the name named_parameters() keeps."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {group: [] for group in GROUP_PREFIXES}
    for name, param in model.named_parameters():
        groups[group_of(name)].append((name, param))
    return groups


def _user_turn(images: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}]


def encode_example(
    processor: Idefics3Processor, images: list[Image.Image], question: str, answer: str
) -> dict[str, Any]:
    """One training sample: the processed prompt (images expanded to their `<image>` tokens) then the answer.

    The answer and its end-of-turn token are tokenised apart from the prompt, so the prompt tokens equal
    what `generate` feeds the model, and only they carry labels (-100 elsewhere, image tokens included).
    Returns input_ids and labels (lists), pixel_values (N, 3, H, W) and pixel_attention_mask (N, H, W).
    """
    user = _user_turn(len(images), question)
    prompt = processor.apply_chat_template(user, add_generation_prompt=True)
    full = processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}])
    reply = full[len(prompt) :]  # e.g. " yes<end_of_utterance>\n": the template puts a space before the answer
    if not full.startswith(prompt) or answer not in reply:
        raise ValueError("the chat template does not continue the generation prompt with the answer")
    cut = reply.index(answer) + len(answer)
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    answer_ids, suffix_ids = (
        processor.tokenizer(text, add_special_tokens=False)["input_ids"] for text in (reply[:cut], reply[cut:])
    )
    return {
        "input_ids": ids + answer_ids + suffix_ids,
        "labels": answer_labels(ids, answer_ids, suffix_ids),
        "pixel_values": inputs["pixel_values"][0],
        "pixel_attention_mask": inputs["pixel_attention_mask"][0],
    }


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """`encode_example` samples → one Idefics3 batch: input_ids, attention_mask, labels (B, L) right-padded
    (collate.pad_text); pixel_values (B, N, 3, H, W) and pixel_attention_mask (B, N, H, W) padded as the
    image processor pads them: missing views are all-zero images (Idefics3 skips those), and pixels past
    a view's own size are zero and masked out."""
    batch = pad_text([s["input_ids"] for s in samples], [s["labels"] for s in samples], pad_id)
    views = [s["pixel_values"] for s in samples]
    n, h, w = max(len(v) for v in views), max(v.shape[-2] for v in views), max(v.shape[-1] for v in views)
    pixels = torch.zeros(len(samples), n, 3, h, w, dtype=views[0].dtype)  # (B, N, 3, H, W)
    mask = torch.zeros(len(samples), n, h, w, dtype=samples[0]["pixel_attention_mask"].dtype)  # (B, N, H, W)
    for i, (v, m) in enumerate(zip(views, (s["pixel_attention_mask"] for s in samples), strict=True)):
        pixels[i, : len(v), :, : v.shape[-2], : v.shape[-1]] = v
        mask[i, : len(v), : v.shape[-2], : v.shape[-1]] = m
    return {**batch, "pixel_values": pixels, "pixel_attention_mask": mask}


@torch.no_grad()
def generate(
    model: Idefics3ForConditionalGeneration,
    processor: Idefics3Processor,
    images: list[Image.Image],
    question: str,
    max_new_tokens: int = 16,
) -> str:
    """Greedy answer to `question` about `images`, up to the end-of-turn token."""
    prompt = processor.apply_chat_template(_user_turn(len(images), question), add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt").to(model.device)
    end = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
