"""SmolVLM (Idefics3) behind the base VLM interface: its own prompt layout, the TokenLearner-QFormer swap,
save/load, parameter groups, the processor's labels and generation (tiny random configs)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Idefics3ForConditionalGeneration

import registry
from inputs.processors import processor_for
from inputs.tokenization import IGNORE_INDEX
from tests.tiny import tiny_smolvlm

TILE = 64  # vision image_size: 16×16 patches of 4 px
S = 16  # tokens per image from the TokenLearner-QFormer: deliberately not the stock connector's 64


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return {
        "wide": Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)),
        "small": Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
    }


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_smolvlm(tokenizer, S, TILE)


def inputs(model, pictures, question="What is this?"):
    processor = processor_for(model)
    ids = torch.tensor([processor.prompt(question, pictures)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **processor.visual(pictures)}


def test_stock_connector_put_back_gives_the_plain_idefics3_logits(tokenizer, images):
    model = tiny_smolvlm(tokenizer, S, TILE, connector="idefics3")
    reference = Idefics3ForConditionalGeneration(model.llm.config).eval()
    reference.load_state_dict(model.llm.state_dict())
    batch = inputs(model, [images["wide"]])
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = reference(**batch).logits
    assert torch.equal(ours, theirs)
    assert (batch["input_ids"] == model.llm.config.image_token_id).sum() == (TILE // 4 // 2) ** 2  # 64 per image


def test_prompt_layout_and_connector_tokens(model, images):
    batch = inputs(model, [images["wide"], images["small"]])
    ids = batch["input_ids"][0].tolist()
    tok = model.processor.tokenizer
    assert ids.count(model.llm.config.image_token_id) == 2 * S  # one view each (no splitting), S tokens a view
    assert ids.count(tok.convert_tokens_to_ids("<global-img>")) == 2 and ids.count(tok.unk_token_id) == 0
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_a_padded_batch_gives_each_row_its_own_logits(model, images, tokenizer):
    """A 2-image and a 1-image sample in one batch (all-zero padding views, padded text) against each alone."""
    processor = processor_for(model)
    raws = [{"__key__": "a", "json": {"user": "What is it?", "assistant": "Noise."}, "000.jpg": _jpeg(images["wide"]),
             "001.jpg": _jpeg(images["small"])},
            {"__key__": "b", "json": {"user": "And this, in many more words than before?", "assistant": "No."},
             "jpg": _jpeg(images["small"])}]  # fmt: skip
    samples = [processor.encode(r) for r in raws]
    batch = processor.collate(samples)
    assert batch["pixel_values"].shape[:2] == (2, 2) and not batch["pixel_values"][1, 1].any()
    with torch.no_grad():
        together = model(**batch)
        for i, s in enumerate(samples):
            alone = model(**processor.collate([s]))
            n = len(s["input_ids"])
            assert (together.logits[i, :n] - alone.logits[0]).abs().max() <= 1e-4
            assert (together.nll[i] - alone.nll[0]).abs() <= 1e-4


def _jpeg(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("stage", [1, 2])
def test_processor_labels(model, images, stage):
    processor = processor_for(model, stage=stage)
    raw = {"__key__": "k", "json": {"user": "What colour?", "assistant": "red"}, "jpg": _jpeg(images["small"])}
    s = processor.encode(raw)
    ids, labels = torch.tensor(s["input_ids"]), torch.tensor(s["labels"])
    tok = processor.tokenizer
    image_tokens = torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(["<image>", "<fake_token_around_image>",
                                                                           "<global-img>"])))  # fmt: skip
    assert (labels[image_tokens] == IGNORE_INDEX).all()
    if stage == 2:
        assert tok.decode(labels[labels != IGNORE_INDEX]) == " red<end_of_utterance>"
    else:
        assert torch.equal(labels[~image_tokens], ids[~image_tokens])
    prompt = processor.prompt("What colour?", [images["small"]])
    assert s["input_ids"][: len(prompt)] == prompt  # training sees the tokens generation is fed


def test_multi_turn_labels_cover_every_answer(model, images):
    processor = processor_for(model, stage=2)
    turns = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A picture."},
             {"role": "user", "content": "Of what?"}, {"role": "assistant", "content": "Noise."}]  # fmt: skip
    s = processor.encode({"__key__": "k", "json": {"turns": turns}, "jpg": _jpeg(images["small"])})
    labels = torch.tensor(s["labels"])
    text = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert text == " A picture.<end_of_utterance> Noise.<end_of_utterance>"


def test_save_load_reproduces_logits(model, images, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.bin")) and not list((tmp_path / "m").glob("*.pt"))
    loaded = registry.load(tmp_path / "m")
    assert loaded.kind == "smolvlm" and loaded.processor.image_seq_len == S
    batch = inputs(model, [images["wide"]])
    assert torch.equal(inputs(loaded, [images["wide"]])["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_param_groups_cover_every_parameter_once(model):
    groups = {}
    for name, _ in model.named_parameters():
        groups.setdefault(model.group_of(name), []).append(name)
    assert set(groups) == {"vision", "connector", "llm"}
    assert all(n.startswith("llm.model.connector.") for n in groups["connector"])
    assert all(n.startswith("llm.model.vision_model.") for n in groups["vision"])
    assert "llm.model.text_model.embed_tokens.weight" in groups["llm"]  # also serves as the tied lm_head


def test_generate_is_the_argmax_continuation(model, images):
    batch = inputs(model, [images["small"]])
    visual = model.prepare(batch["pixel_values"], batch["pixel_attention_mask"])
    new = model.generate(visual, batch["input_ids"], batch["attention_mask"], max_new_tokens=3, eos_token_id=[0])
    ids = batch["input_ids"]
    for j in range(new.shape[1]):
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids), batch["pixel_values"], batch["pixel_attention_mask"]).logits
        assert logits[0, -1].argmax() == new[0, j]
        ids = torch.cat([ids, new[:, j : j + 1]], 1)


def test_bf16_forward(model, images):
    half = copy.deepcopy(model).to(torch.bfloat16)
    batch = inputs(half, [images["small"]])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        assert half(**batch).logits.dtype == torch.bfloat16
