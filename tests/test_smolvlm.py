import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Idefics3Config, Idefics3ForConditionalGeneration

from smolvlm import (
    attach_connector,
    build_smolvlm,
    connector_config,
    load_pretrained,
    offline_processor,
    param_groups,
    save_pretrained,
)

TILE = 64  # vision image_size: 16×16 patches of 4 px; the stock connector (scale 2) makes 64 tokens, as SmolVLM's
S = 16  # tokens per image from the TokenLearner-QFormer: deliberately not the stock 64
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def vlm_tokenizer(tokenizer):
    """SmolLM2's tokenizer (conftest) with Idefics3's tokens, copied: the session fixture stays untouched."""
    return offline_processor(copy.deepcopy(tokenizer), S, TILE).tokenizer


@pytest.fixture(scope="module")
def config(vlm_tokenizer) -> Idefics3Config:
    return Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=TILE, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=len(vlm_tokenizer), hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        scale_factor=2,
        image_token_id=vlm_tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,  # lm_head shares embed_tokens: save/load must cope with the shared tensor
    )


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return {
        "wide": Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)),
        "small": Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),  # upscaled, split too
    }


def tiny_model(config, dtype=torch.float32):
    torch.manual_seed(0)
    connector = connector_config(config, num_queries=S, num_tokens=24, bottleneck=16, hidden_size=32, num_heads=4,
                                 num_kv_heads=2, intermediate_size=64)
    return build_smolvlm(config, connector).to(dtype).eval()


def make_processor(tokenizer, image_seq_len=S):
    return offline_processor(tokenizer, image_seq_len, TILE, longest_edge=2 * TILE)  # at most 2×2 tiles


def process(processor, images, messages=MESSAGES, **kwargs):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[prompt], images=[images], return_tensors="pt", **kwargs)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_stock_connector_put_back_gives_identical_logits(vlm_tokenizer, config, images):
    torch.manual_seed(0)
    reference = Idefics3ForConditionalGeneration(config).eval()
    inputs = process(make_processor(vlm_tokenizer, 64), [images["wide"]])
    model = tiny_model(config)
    attach_connector(model, copy.deepcopy(reference.model.connector))
    model.load_state_dict(reference.state_dict())
    assert torch.equal(logits(model, inputs), logits(reference, inputs))


def test_split_image_prompt_layout(vlm_tokenizer, config, images):
    inputs = process(make_processor(vlm_tokenizer), [images["wide"]])
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(config.image_token_id) == S * 5  # 2×2 tiles + the global view
    assert ids.count(vlm_tokenizer.convert_tokens_to_ids("<global-img>")) == 1
    assert [ids.count(vlm_tokenizer.convert_tokens_to_ids(f"<row_{r}_col_{c}>")) for r in (1, 2) for c in (1, 2)] \
        == [1] * 4
    assert ids.count(vlm_tokenizer.unk_token_id) == 0


@pytest.mark.parametrize("split", [False, True])
def test_processed_images_fit_the_connector(vlm_tokenizer, config, images, split):
    """S ≠ 64 tokens per view, a 1-image and a 2-image sample in one batch (so all-zero padding images)."""
    model = tiny_model(config)
    processor = make_processor(vlm_tokenizer)
    two_images = [{"role": "user", "content": [{"type": "image"}, *MESSAGES[0]["content"]]}]
    prompts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in (MESSAGES, two_images)]
    inputs = processor(text=prompts, images=[[images["wide"]], [images["small"]] * 2], do_image_splitting=split,
                       padding=True, return_tensors="pt")
    views = 5 if split else 1
    assert inputs["pixel_values"].shape[1] == 2 * views
    assert (inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist() == [S * views, 2 * S * views]
    out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert out.image_hidden_states.shape == (3 * views * S, config.text_config.hidden_size)


def test_bf16_model_forward(vlm_tokenizer, config, images):
    model = tiny_model(config, torch.bfloat16)
    inputs = process(make_processor(vlm_tokenizer), [images["small"]], do_image_splitting=False)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    assert features.dtype == torch.bfloat16 and features.shape == (S, config.text_config.hidden_size)
    assert logits(model, inputs).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_reproduces_logits(vlm_tokenizer, config, images, tmp_path, dtype):
    model = tiny_model(config, dtype)
    processor = make_processor(vlm_tokenizer)
    save_pretrained(model, processor, tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded, loaded_processor = load_pretrained(tmp_path)
    assert loaded.dtype == dtype and loaded_processor.image_seq_len == S
    inputs = process(loaded_processor, [images["wide"]])
    assert torch.equal(inputs["input_ids"], process(processor, [images["wide"]])["input_ids"])
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_save_refuses_mismatched_processor(vlm_tokenizer, config, tmp_path):
    with pytest.raises(ValueError):
        save_pretrained(tiny_model(config), make_processor(vlm_tokenizer, 64), tmp_path)


def test_param_groups_cover_every_parameter_once(config):
    model = tiny_model(config)
    groups = param_groups(model)
    names = [name for group in groups.values() for name, _ in group]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    assert all(n.startswith("model.connector.") for n, _ in groups["connector"]) and groups["connector"]
    assert all(n.startswith("model.vision_model.") for n, _ in groups["vision"]) and groups["vision"]
    assert "model.text_model.embed_tokens.weight" in dict(groups["llm"])  # also serves as the tied lm_head
