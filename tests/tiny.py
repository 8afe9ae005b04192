"""Tiny random backbones for fast tests: every weight, bias, norm and layer scale is non-trivial."""

from __future__ import annotations

import torch
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

from config import ModelConfig
from frames import FrameSpec
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
) -> FoveatedVLM:
    """With a tokenizer (e.g. the real SmolLM2 one), the LLM's vocabulary is sized to it and the model carries it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        dino="tiny",
        llm="tiny",
        query_dim=16,
        visual_scale=0.5,
        deep_query=deep,
        glimpses=glimpses,
        frames_at=frames_at,
    )
    llm = tiny_llm(seed + 1, vocab=len(tokenizer) if tokenizer is not None else 64)
    return FoveatedVLM(cfg, tiny_dino(seed), llm, tokenizer, FrameSpec(size=IMAGE, max_frames=4, image_frames=2)).eval()


def frames(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
