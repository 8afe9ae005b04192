import json
import logging

import huggingface_hub
import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModel,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from connectors.towers import VisionTower, tower_config, tower_from_config
from inputs import frames
from tests.tiny_towers import DIM, FAMILIES, IMAGE, PATCH, pixels, tiny_tower, tiny_vision_model
from vlm import weights

# the family variants whose pooled token comes from somewhere else
VARIANTS = [(f, {}) for f in FAMILIES] + [("siglip", {"vision_use_head": False}), ("vit", {"pooler": False})]
IDS = [f + "".join(f"-{k}={v}" for k, v in o.items()) for f, o in VARIANTS]
CLASSES = {"dinov2": Dinov2Model, "clip": CLIPVisionModel, "siglip": SiglipVisionModel, "vit": ViTModel}


def _same_outputs(a: VisionTower, b: VisionTower, x: torch.Tensor) -> None:
    with torch.no_grad():
        for u, v in zip(a(x), b(x), strict=True):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=IDS)
def test_shapes_at_native_and_other_sizes(family, overrides):
    tower = tiny_tower(family, **overrides)
    assert (tower.family, tower.dim, tower.patch_size, tower.image_size) == (family, DIM, PATCH, IMAGE)
    assert tower.has_cls == (family != "siglip")
    assert tower.grid(IMAGE) == 4 and tower.grid(24) == 6
    with torch.no_grad():
        for size, p in ((IMAGE, 16), (24, 36), ((16, 24), 24)):  # native, interpolated square, non-square
            patches, pooled = tower(pixels(2, size))
            assert patches.shape == (2, p, DIM) and pooled.shape == (2, DIM)
            assert torch.isfinite(patches).all() and torch.isfinite(pooled).all()


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=IDS)
def test_patches_and_pooled_are_the_documented_states(family, overrides):
    tower = tiny_tower(family, **overrides)
    x = pixels(2)
    with torch.no_grad():
        patches, pooled = tower(x)
        out = tower.model(pixel_values=x)
    seq = out.last_hidden_state
    if family == "clip":  # the raw residual stream: the tower norms every token as the CLS is normed
        seq = tower.model.post_layernorm(seq)
        torch.testing.assert_close(seq[:, 0], out.pooler_output)
    torch.testing.assert_close(patches, seq if family == "siglip" else seq[:, 1:], rtol=0, atol=0)
    if family == "siglip":
        expected = out.pooler_output if overrides.get("vision_use_head", True) else patches.mean(1)
    elif family in ("clip", "vit") and out.pooler_output is not None:
        expected = out.pooler_output
    else:
        expected = seq[:, 0]
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)


def test_mean_std_are_each_familys_image_processor_defaults():
    expected = {
        "clip": CLIPImageProcessorPil(),
        "siglip": SiglipImageProcessorPil(),
        "vit": ViTImageProcessorPil(),
    }
    for family, processor in expected.items():
        tower = tiny_tower(family)
        assert tower.mean == tuple(processor.image_mean) and tower.std == tuple(processor.image_std), family
    # DINOv2 has no processor class of its own: its hub configs set ImageNet statistics on BitImageProcessor
    # (whose defaults are CLIP's), and the project's frame reader normalises the same way for the foveated model.
    dino = tiny_tower("dinov2")
    assert dino.mean == tuple(IMAGENET_DEFAULT_MEAN) == frames.IMAGENET_MEAN
    assert dino.std == tuple(IMAGENET_DEFAULT_STD) == frames.IMAGENET_STD
    assert tiny_tower("clip").mean == (0.48145466, 0.4578275, 0.40821073)
    assert tiny_tower("siglip").std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=IDS)
def test_config_round_trip_rebuilds_the_tower(family, overrides):
    tower = tiny_tower(family, **overrides)
    saved = json.loads(json.dumps(tower_config(tower)))  # as it comes back from the checkpoint JSON
    rebuilt = tower_from_config(saved).eval()
    assert rebuilt.family == family and type(rebuilt.model) is type(tower.model)
    shapes = {k: v.shape for k, v in tower.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert all(k.startswith("model.") for k in shapes)
    rebuilt.load_state_dict(tower.state_dict(), strict=True)
    _same_outputs(tower, rebuilt, pixels(2, 24))


def test_unknown_family_and_model_are_refused():
    with pytest.raises(ValueError, match="unknown tower family"):
        tower_from_config({"family": "resnet", "config": {}})
    with pytest.raises(TypeError, match="unsupported vision tower"):
        VisionTower(LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)))


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=IDS)
def test_load_tower_reads_a_saved_directory_of_each_family(family, overrides, tmp_path):
    model = tiny_vision_model(family, **overrides)
    model.save_pretrained(tmp_path)
    loaded = weights.load_tower(str(tmp_path))
    assert type(loaded) is CLASSES[family] and not loaded.training
    _same_outputs(VisionTower(model), VisionTower(loaded), pixels(2))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_load_tower_takes_the_vision_half_of_a_full_checkpoint(family, tmp_path):
    text = dict(hidden_size=DIM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    vision = tiny_vision_model(family).config.to_dict()
    if family == "clip":
        full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        full = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    full.save_pretrained(tmp_path)
    loaded = weights.load_tower(str(tmp_path))
    assert type(loaded) is CLASSES[family]
    expected = full.vision_model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_load_tower_drops_the_random_pooler_of_a_vit_classifier(tmp_path):
    classifier = ViTForImageClassification(ViTConfig(**tiny_vision_model("vit").config.to_dict()))
    classifier.save_pretrained(tmp_path)
    loaded = weights.load_tower(str(tmp_path))
    assert type(loaded) is ViTModel and loaded.pooler is None
    tower = VisionTower(loaded)
    assert tower_config(tower)["pooler"] is False
    with torch.no_grad():
        patches, pooled = tower(pixels(1))
        torch.testing.assert_close(pooled, classifier.vit(pixels(1)).last_hidden_state[:, 0])


def test_load_tower_refuses_what_is_not_a_tower(tmp_path):
    LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(OSError, match="not a vision tower"):
        weights.load_tower(str(tmp_path))


def test_load_tower_packaged_and_offline_hub_id_give_dinov2_small(tmp_path, monkeypatch, caplog):
    try:
        packaged = weights.load_tower(weights.PACKAGED)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert type(packaged) is Dinov2Model and packaged.config.hidden_size == 384
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with caplog.at_level(logging.WARNING, logger=weights.__name__):
        offline = weights.load_tower(weights.DINO_HUB_ID)
    assert "using the packaged weights" in caplog.text
    expected = packaged.state_dict()
    assert offline.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in offline.state_dict().items())
    tower = VisionTower(offline)
    assert (tower.grid(224), tower.patch_size, tower.image_size) == (16, 14, 518)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_changes_no_gradient(family):
    grads = []
    for checkpointed in (False, True):
        tower = tiny_tower(family).train()
        if checkpointed:
            tower.gradient_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) is True for m in tower.modules())
        patches, pooled = tower(pixels(2))
        (patches.square().mean() + pooled.square().mean()).backward()
        grads.append({k: p.grad for k, p in tower.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, msg=k)
