"""Tiny random backbones for fast tests: every weight, bias, norm and layer scale is non-trivial."""

from __future__ import annotations

import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from config import FoveatedConfig
from inputs.frames import FrameSpec
from model import FoveatedVLM

IMAGE = 16  # px; patch 4 -> 16 patches + CLS


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    return module


def tiny_dino(seed: int = 0) -> Dinov2Model:
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=4,
        image_size=IMAGE,
        layerscale_value=0.5,
    )
    return randomize(Dinov2Model(cfg), seed).eval()


def tiny_llm(seed: int = 1, vocab: int = 64) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=2,
    )
    return randomize(LlamaForCausalLM(cfg), seed).eval()


def tiny_model(
    glimpses: int = 1,
    deep: bool = True,
    seed: int = 0,
    tokenizer=None,
    frames_at: str = "start",
    **options,
) -> FoveatedVLM:
    """With a tokenizer (e.g. the real SmolLM2 one), the LLM's vocabulary is sized to it and the model carries it;
    `options`: other FoveatedConfig fields (query_dim 16 unless given)."""
    torch.manual_seed(seed)
    cfg = FoveatedConfig(
        dino="tiny",
        llm="tiny",
        visual_scale=0.5,
        deep_query=deep,
        glimpses=glimpses,
        frames_at=frames_at,
        **{"query_dim": 16, **options},
    )
    llm = tiny_llm(seed + 1, vocab=len(tokenizer) if tokenizer is not None else 64)
    return FoveatedVLM(cfg, tiny_dino(seed), llm, tokenizer, FrameSpec(size=IMAGE, max_frames=4, image_frames=2)).eval()


def frames(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def tiny_smolvlm(
    tokenizer, num_queries: int = 8, tile: int = 32, connector: str = "tokenlearner_qformer", patch: int = 4
):
    """A tiny SmolVLM (Idefics3) around SmolLM2's real tokenizer, copied (Idefics3's tokens are added to it):
    a SigLIP of `tile` px and `patch`-px patches, a 2-layer Llama; images at most one tile, never split."""
    import copy

    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from config import QFormerOptions, SmolVLMConfig
    from connectors.smolvlm import SmolVLM

    scale = 2
    stock = (tile // patch // scale) ** 2  # the pixel-shuffle connector's tokens per image
    processor = offline_processor(copy.deepcopy(tokenizer), stock, tile, longest_edge=tile, do_image_splitting=False)
    tok = processor.tokenizer
    idefics = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=tile, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=True,
    )  # fmt: skip
    options = QFormerOptions(num_queries=num_queries, num_tokens=8, bottleneck=16, hidden_size=32, num_heads=4,
                             num_kv_heads=2, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    config = SmolVLMConfig(hub="tiny", connector=connector, qformer=options)
    return SmolVLM(config, Idefics3ForConditionalGeneration(idefics), processor).eval()


CONNECTOR_KINDS = ("pixel_shuffle", "mlp", "cls_gate", "tokenlearner_qformer")
# small sizes for each connector on the tiny 4x4-patch tower
CONNECTOR_OPTIONS = {
    "pixel_shuffle": {"scale": 2},
    "mlp": {},
    "cls_gate": {"hidden": 8},
    "tokenlearner_qformer": {"num_queries": 3, "num_tokens": 5, "bottleneck": 8, "hidden_size": 16, "num_layers": 1,
                             "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32},
}  # fmt: skip


def tiny_connector_model(
    kind: str, tokenizer=None, family: str = "dinov2", seed: int = 0, lora=None, frames_at: str = "start", **options
):
    """A tower + connector model of `kind` on a tiny random tower of `family` and the tiny LLM."""
    from config import ModelConfig
    from connectors.tower_vlm import TowerVLM
    from tests.tiny_towers import tiny_tower

    torch.manual_seed(seed)
    config = ModelConfig.kinds[kind](
        tower="tiny", llm="tiny", lora=lora, frames_at=frames_at, **{**CONNECTOR_OPTIONS[kind], **options}
    )
    llm = tiny_llm(seed + 1, vocab=len(tokenizer) if tokenizer is not None else 64)
    frames = FrameSpec(size=IMAGE, max_frames=4, image_frames=2)
    return TowerVLM(config, tiny_tower(family, seed), llm, tokenizer, frames).eval()


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
