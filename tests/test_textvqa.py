"""SmolVLM with a TokenLearner-QFormer trained through train.py on a tiny TextVQA fixture (published layout),
read by the shared data pipeline: labels, subset, rank split and exact resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Crash, jpeg
from safetensors.torch import load_file
from transformers import Idefics3ForConditionalGeneration

import data
import registry
import train
from config import Config, ConfigError, DataConfig, QFormerOptions, SmolVLMConfig, TextVQASource, from_dict, load_config
from connectors import TokenLearnerQFormer
from inputs.processors import processor_for
from inputs.tokenization import IGNORE_INDEX
from layouts import textvqa
from tests.tiny import tiny_smolvlm
from training.schedule import Schedule
from vlm import saved

REPO = Path(__file__).resolve().parent.parent
TILE = 32  # vision image_size: 4×4 patches of 8 px
S = 8  # <image> tokens per image, not SmolVLM's 64
COLOURS = {"red": (220, 20, 30), "green": (20, 200, 40), "dark blue": (30, 40, 110)}  # answer: image colour


pytestmark = pytest.mark.usefixtures("single_thread")


def question(qid: int, image: str, answer: str, other: str = "crimson") -> dict:
    return {"question_id": qid, "question": "what colour is this image?", "image_id": image,
            "answers": [other] * 3 + [answer] * 6 + [other], "question_tokens": ["what"]}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Train: 7 questions about 3 colours and one whose image is corrupt (4 batches of 2, none all bad);
    val: one per colour."""
    root = tmp_path_factory.mktemp("textvqa")
    (root / "train_images").mkdir()
    for i, rgb in enumerate(COLOURS.values()):
        (root / "train_images" / f"img_{i}.jpg").write_bytes(jpeg(rgb, (48, 36)))
    (root / "train_images" / "img_bad.jpg").write_bytes(b"not a jpeg")
    train_qs = [question(10 + i, f"img_{i % 3}", list(COLOURS)[i % 3]) for i in range(7)]
    train_qs.insert(2, question(99, "img_bad", "red"))
    val_qs = [question(20 + i, f"img_{i}", c) for i, c in enumerate(COLOURS)]
    for split, qs in (("train", train_qs), ("val", val_qs)):
        (root / textvqa.FILES[split]).write_text(json.dumps({"dataset_name": "textvqa", "data": qs}))
    return root


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny SmolVLM-TokenLearner-QFormer with its offline processor, saved as train.init_from reads it."""
    path = tmp_path_factory.mktemp("start") / "model"
    tiny_smolvlm(tokenizer, S, TILE, patch=8).save_pretrained(path)
    return path


def sources(root: Path, **train_source) -> dict:
    return {"train": [{"kind": "textvqa", "root": str(root), **train_source}],
            "val": [{"kind": "textvqa", "root": str(root), "split": "val"}]}  # fmt: skip


def make_config(root: Path, start: Path, out: Path, **train_keys) -> Config:
    return from_dict(Config, {
        "model": {"kind": "smolvlm"},
        "data": {**sources(root), "stage": 2, "batch_size": 2, "num_workers": 0},
        "optim": {"lr_connector": 1e-2, "lr_vision": 0.0, "lr_llm": 1e-2, "schedule": "linear", "warmup": 0.1},
        "train": {"init_from": str(start), "epochs": 4, "val_every": 3, "val_batches": 2, "save_every": 3,
                  "out_dir": str(out), **train_keys},
    })  # fmt: skip


def log_rows(out: Path) -> list[dict]:
    with (out / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(root, start_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train.train(make_config(root, start_model, out))
    return out


def test_training_lowers_the_loss_and_leaves_the_vision_tower_untouched(run, start_model):
    rows = log_rows(run)
    assert len(rows) == 4 * 4  # epochs × (8 questions / batch 2)
    loss = [float(r["loss"]) for r in rows]
    assert sum(loss[-4:]) < 0.75 * sum(loss[:4]), loss  # the last epoch against the first
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert val[-1] < val[0] - 1.0, val
    assert sum(int(r["skipped"]) for r in rows) == 4  # the corrupt image, once per epoch
    assert all(r["lr_vision"] == "" for r in rows) and float(rows[1]["lr_llm"]) == pytest.approx(1e-2)

    before, after = load_file(str(start_model / saved.WEIGHTS)), load_file(str(run / "final" / saved.WEIGHTS))
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("llm.model.vision_model.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # bit-identical
    for prefix in ("llm.model.connector.", "llm.model.text_model."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix


def test_final_model_loads_with_connector_and_processor_and_answers(run, capsys, root, start_model, tmp_path):
    model = registry.load(run / "final")
    assert isinstance(model.llm.model.connector, TokenLearnerQFormer) and model.processor.image_seq_len == S
    train.train(make_config(root, start_model, tmp_path / "again", epochs=1))
    out = capsys.readouterr().out  # a run ends with one validation question answered, as an example
    assert "question:" in out and "reply:" in out and "reference: red" in out


def test_resumed_run_repeats_the_uninterrupted_losses(run, root, start_model, tmp_path, monkeypatch):
    cut = make_config(root, start_model, tmp_path / "cut")
    real = train.Trainer.step

    def step(self):
        if self.state.step == 5:  # dies after step 5; the last checkpoint is step 3, in epoch 0
            raise Crash
        return real(self)

    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "step", step)
        with pytest.raises(Crash):
            train.train(cut)
    train.train(cut)
    key = ("step", "epoch", "loss", "val_loss", "lr_llm", "skipped")
    assert [[r[k] for k in key] for r in log_rows(tmp_path / "cut")] == [[r[k] for k in key] for r in log_rows(run)]


@pytest.fixture(scope="module")
def processor(start_model):
    return processor_for(registry.load(start_model))


def loader(root, processor, split="train", rank=0, world=1, epoch=0, skip=0, **kw):
    cfg = from_dict(DataConfig, {**sources(root, **kw.pop("source", {})), "stage": 2, "num_workers": 0, **kw})
    return list(data.make_loader(cfg, processor, rank, world, epoch, skip, split))


def test_batches_label_the_majority_answer_only(root, processor):
    (batch,) = loader(root, processor, "val", batch_size=3)
    assert batch["keys"] == ["20", "21", "22"] and batch["skipped"] == {}
    assert batch["pixel_values"].shape == (3, 1, 3, TILE, TILE)
    assert batch["pixel_attention_mask"].shape == (3, 1, TILE, TILE)
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image).sum(1).tolist() == [S] * 3
    for ids, labels, colour in zip(batch["input_ids"], batch["labels"], COLOURS, strict=True):
        assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == f" {colour}<end_of_utterance>"
        prompt = processor.tokenizer.decode(ids[labels == IGNORE_INDEX])
        assert "What colour is this image?\nAnswer the question using a single word or phrase." in prompt
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == IGNORE_INDEX).all()  # "dark blue" is longer than "red"


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_resumes_after_skipped_batches_and_counts_bad_images(root, processor, workers):
    whole = loader(root, processor, epoch=1, batch_size=2, num_workers=workers, seed=3)
    assert sum(len(b["keys"]) for b in whole) == 7 and sum(b["skipped"].get("bad_media", 0) for b in whole) == 1
    for skip in (1, 3):
        resumed = loader(root, processor, epoch=1, skip=skip, batch_size=2, num_workers=workers, seed=3)
        assert [b["keys"] for b in resumed] == [b["keys"] for b in whole[skip:]]
        assert torch.equal(resumed[-1]["input_ids"], whole[-1]["input_ids"])
    again = loader(root, processor, epoch=2, batch_size=2, num_workers=workers, seed=3)
    assert [b["keys"] for b in again] != [b["keys"] for b in whole]


def test_subset_and_rank_split(root, processor):
    kw = {"source": {"subset": 4}, "batch_size": 1}
    epochs = [{k for b in loader(root, processor, epoch=e, **kw) for k in b["keys"]} for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2] and 3 <= len(epochs[0]) <= 4  # the bad image may be drawn
    ranks = [[k for b in loader(root, processor, rank=r, world=2, **kw) for k in b["keys"]] for r in range(2)]
    assert set(ranks[0]).isdisjoint(ranks[1])
    cfg = from_dict(DataConfig, {**sources(root, subset=4), "batch_size": 1})
    assert data.epoch_batches(cfg, processor, 2) == 2
    q = textvqa.TextVQAQuestion("1", "what is it?", Path("x.jpg"), ("b", "a", "a", "b", "c"))
    assert q.answer == "b"  # a tie goes to the answer given first


def test_keys_the_kind_would_not_read_are_refused(root):
    with pytest.raises(ConfigError, match=r"unknown config key 'model.glimpses' \(model.kind smolvlm\)"):
        from_dict(Config, {"model": {"kind": "smolvlm", "glimpses": 2}})
    with pytest.raises(ConfigError, match="unknown config key 'data.train.*path'"):
        from_dict(Config, {"data": {"train": [{"kind": "textvqa", "root": str(root), "path": "a.tar"}]}})
    with pytest.raises(ConfigError, match="smolvlm trains stages 1 and 2"):
        from_dict(Config, {"model": {"kind": "smolvlm"}, "data": {"stage": 3}})
    with pytest.raises(FileNotFoundError, match="TextVQA_0.5.1_train.json"):
        data.SourceDataset(DataConfig(train=[TextVQASource(root=str(root / "nowhere"))]), None)


def test_new_model_from_a_stock_smolvlm_dir(start_model, tmp_path):
    """model.hub may name a local Idefics3 directory: its connector is replaced and S set on both sides."""
    saved = registry.load(start_model)
    stock = Idefics3ForConditionalGeneration(saved.llm.config)  # the pixel-shuffle connector, as on the hub
    stock.save_pretrained(tmp_path / "stock")
    saved.processor.save_pretrained(tmp_path / "stock")
    config = SmolVLMConfig(hub=str(tmp_path / "stock"), qformer=QFormerOptions(num_queries=5, num_tokens=6))
    new = registry.new_model(config)
    connector = new.llm.model.connector
    assert isinstance(connector, TokenLearnerQFormer) and next(new.parameters()).dtype == torch.float32
    assert (connector.config.num_queries, connector.config.num_tokens, new.processor.image_seq_len) == (5, 6, 5)


def test_shipped_config_and_linear_schedule():
    cfg = load_config(REPO / "configs" / "smolvlm_textvqa.yaml")
    assert (cfg.model.kind, cfg.optim.lr_vision, cfg.optim.lr_llm, cfg.train.epochs) == ("smolvlm", 0.0, 1e-5, 3)
    assert cfg.model.hub == "HuggingFaceTB/SmolVLM-256M-Instruct" and cfg.data.train[0].subset == 5000
    linear = Schedule("linear", max_steps=100, warmup=0.1, target_lr=0.0, min_lr_ratio=0.0)
    assert linear.lr(9, 1e-5) == pytest.approx(1e-5) and linear.lr(99, 1e-5) == 0.0
    assert linear.lr(54, 1e-5) == pytest.approx(0.5e-5) and math.isclose(linear.lr(0, 1e-5), 1e-6)
