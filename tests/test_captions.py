"""`benchmark.py --bench captions` end to end on fixtures in each layout (Karpathy JSON, COCO 2017, caption
shards), its perplexity against a forward pass done by hand, its beam search, and a tiny model that learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import jpeg, mp4

import benchmark
import registry
import train
from config import MODES, Config, from_dict
from evals import captioning
from evals.answering import Answerer
from evals.results import read_predictions
from inputs.frames import Media
from inputs.tokenization import CAPTION_PROMPT, DESCRIBE_PROMPT, IGNORE_INDEX, chat_ids, prompt_ids
from layouts import toy
from tests.tiny import IMAGE, tiny_connector_model, tiny_model, tiny_smolvlm

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 230), "yellow": (235, 210, 30)}


def one(colour: str) -> list[str]:
    return [f"a {colour} square."]


def two(colour: str) -> list[str]:
    return [f"a {colour} square.", f"a plain {colour} square on its own."]


pytestmark = pytest.mark.usefixtures("single_thread")


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def karpathy(root: Path, split: str = "test", refs=two) -> Path:
    """dataset_flickr30k.json and flickr30k-images/: one solid-colour image per colour."""
    images = []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        name = f"{1000 + i}.jpg"
        write(root / "flickr30k-images" / name, jpeg(rgb, (24, 20)))
        sentences = [
            {"raw": r, "tokens": r.split(), "imgid": i, "sentid": 10 * i + k} for k, r in enumerate(refs(colour))
        ]
        images.append({"filename": name, "imgid": i, "split": split, "sentids": [], "sentences": sentences})
    write(root / "flickr30k-images" / "999.jpg", jpeg((128, 128, 128), (24, 20)))
    images.append({"filename": "999.jpg", "imgid": 9, "split": "val", "sentences": [{"raw": "A grey square."}]})
    return write(root / "dataset_flickr30k.json", json.dumps({"images": images, "dataset": "flickr30k"}))


def coco2017(root: Path, split: str = "val", refs=two) -> Path:
    """annotations/captions_<split>2017.json and <split>2017/: the same colours in COCO 2017's layout."""
    images, annotations = [], []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        image_id = 139 + i
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 20, "width": 24})
        write(root / f"{split}2017" / f"{image_id:012d}.jpg", jpeg(rgb, (24, 20)))
        annotations += [{"image_id": image_id, "id": 10 * i + k, "caption": r} for k, r in enumerate(refs(colour))]
    write(
        root / "annotations" / f"captions_{split}2017.json", json.dumps({"images": images, "annotations": annotations})
    )
    return root


def shards(root: Path) -> Path:
    """Caption shards in the training format: numbered frames, a video, an image; one or several references."""
    root.mkdir(parents=True)
    with wds.TarWriter(str(root / "caption-000000.tar")) as sink:
        frames = {f"{t:03d}.jpg": jpeg((60 * t, 90, 30)) for t in range(3)}
        sink.write({"__key__": "c0", "json": {"caption": "A ball moves to the right."}, **frames})
        sink.write({"__key__": "c1", "json": {"caption": ["A ramp of red.", "Red rises."], "id": "v-1"}, "mp4": mp4(6)})
        sink.write({"__key__": "c2", "json": {"caption": "A blue picture."}, "jpg": jpeg((20, 40, 220))})
    return root


@pytest.fixture(scope="module")
def fvlm_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fvlm")
    tiny_model(tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gate_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cls_gate")
    tiny_connector_model("cls_gate", tokenizer).save_pretrained(path)
    return path


def run(model_dir: Path, root, out: Path, *extra: str) -> dict:
    return benchmark.main(
        ["--model", str(model_dir), "--bench", "captions", "--data-root", str(root), "--out", str(out)]
        + ["--frame-size", str(IMAGE), "--max-frames", "4", "--image-frames", "2", "--max-new-tokens", "8", *extra]
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def check_summary(summary: dict, out: Path, modes: list[str], n: int) -> list[dict]:
    """Every metric of every read present and finite, the summary saved, one JSONL record per image."""
    assert summary["reads"] == modes and summary["num_images"] == n and summary["errors"] == 0
    assert json.loads((out / "captions.json").read_text()) == summary
    assert set(summary["tokenisation"]) == {"bleu", "rouge", "cider_d", "token_f1"}
    assert set(summary["decoding"]) == {"num_beams", "length_penalty", "no_repeat_ngram_size", "max_new_tokens"}
    for mode in modes:
        m = summary["metrics"][mode]
        assert set(m) == set(captioning.METRICS) and all(math.isfinite(v) for v in m.values())
        assert m["perplexity"] > 1
    records = read_predictions(out / "captions.jsonl")  # the last line of an id wins
    assert len(records) == n
    for r in records.values():
        assert set(r["reads"]) >= set(modes)
        for x in r["reads"].values():
            assert isinstance(x["caption"], str) and x["nll"] > 0 and x["tokens"] > len(r["references"])
    return list(records.values())


def count_prepares(monkeypatch) -> dict[str, int]:
    calls = {"prepare": 0}
    original = Answerer.prepare

    def counted(self, media):
        calls["prepare"] += 1
        return original(self, media)

    monkeypatch.setattr(Answerer, "prepare", counted)
    return calls


def test_karpathy_flickr30k_end_to_end_modes_and_resume(fvlm_dir, tmp_path, monkeypatch):
    path, out = karpathy(tmp_path / "flickr30k"), tmp_path / "out"
    calls = count_prepares(monkeypatch)
    summary = run(fvlm_dir, path, out, "--reads", "coarse_only,autoregressive")
    assert calls["prepare"] == 4  # one encoding per image serves both reads
    assert (summary["layout"], summary["split"], summary["data_root"]) == ("karpathy", "test", str(path))
    assert summary["prompt"] == CAPTION_PROMPT and summary["answered_now"] == 4
    assert summary["decoding"] == {"num_beams": 3, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                                   "max_new_tokens": 8}  # fmt: skip
    records = check_summary(summary, out, ["coarse_only", "autoregressive"], 4)
    assert [(r["id"], r["references"]) for r in records] == [(str(1000 + i), two(c)) for i, c in enumerate(COLOURS)]

    again = run(fvlm_dir, path, out, "--reads", "coarse_only,autoregressive")  # resume: nothing left to do
    assert again["answered_now"] == 0 and calls["prepare"] == 4 and again["metrics"] == summary["metrics"]

    path_out = out / "captions.jsonl"
    path_out.write_text(path_out.read_text() + '{"id": "1003", "refer')  # a crash mid-write is ignored
    every = run(fvlm_dir, tmp_path / "flickr30k", out)  # the folder holding the JSON; all modes: coarse_fine added
    assert every["answered_now"] == 4 and calls["prepare"] == 8 and every["reads"] == list(MODES)
    records = check_summary(every, out, list(MODES), 4)
    assert [x for x in path_out.read_text().splitlines() if not x.endswith("}")] == ['{"id": "1003", "refer']
    for mode in ("coarse_only", "autoregressive"):  # the reads already there are kept, not redone
        assert every["metrics"][mode] == summary["metrics"][mode]
    assert run(fvlm_dir, path, out, "--reads", "coarse_fine")["answered_now"] == 0

    other_split = run(fvlm_dir, path, tmp_path / "val", "--split", "val", "--reads", "coarse_only")
    assert other_split["num_images"] == 1 and other_split["split"] == "val"


def test_coco2017_and_karpathy_coco_with_images_elsewhere(gate_dir, tmp_path):
    root = coco2017(tmp_path / "coco")
    summary = run(gate_dir, root, tmp_path / "out")
    assert (summary["layout"], summary["split"], summary["reads"]) == ("coco", "val", ["default"])
    records = check_summary(summary, tmp_path / "out", ["default"], 4)
    assert [r["id"] for r in records] == ["139", "140", "141", "142"] and records[0]["references"] == two("red")

    # Karpathy's COCO JSON: images under ROOT/<filepath>/<filename>, here ROOT given apart with --images
    entries = [{"filepath": "val2017", "filename": f"{139 + i:012d}.jpg", "imgid": i, "cocoid": 139 + i,
                "split": "test", "sentences": [{"raw": r} for r in two(c)]}
               for i, c in enumerate(COLOURS)]  # fmt: skip
    path = write(tmp_path / "elsewhere" / "dataset_coco.json", json.dumps({"images": entries, "dataset": "coco"}))
    karpathy_coco = run(gate_dir, path, tmp_path / "out_k", "--images", str(root))
    assert karpathy_coco["layout"] == "karpathy" and karpathy_coco["metrics"] == summary["metrics"]  # same images
    moved = tmp_path / "moved"
    moved.mkdir()
    (root / "val2017").rename(moved / "val2017")
    elsewhere = run(gate_dir, root, tmp_path / "out_m", "--images", str(moved))
    assert elsewhere["metrics"] == summary["metrics"]


def test_smolvlm_captions(tokenizer, tmp_path):
    path = tmp_path / "smolvlm"
    tiny_smolvlm(tokenizer).save_pretrained(path)
    summary = run(path, karpathy(tmp_path / "flickr30k"), tmp_path / "out", "--max-new-tokens", "4")
    check_summary(summary, tmp_path / "out", ["default"], 4)


def test_caption_shards_and_the_toy_worlds_caption_eval(fvlm_dir, tmp_path):
    root = shards(tmp_path / "shards")
    summary = run(fvlm_dir, str(root / "*.tar"), tmp_path / "out", "--reads", "coarse_fine")
    assert (summary["layout"], summary["split"], summary["prompt"]) == ("shards", None, DESCRIBE_PROMPT)
    records = check_summary(summary, tmp_path / "out", ["coarse_fine"], 3)
    assert [(r["id"], len(r["references"])) for r in records] == [("c0", 1), ("v-1", 2), ("c2", 1)]

    # the NLL is the references' after DESCRIBE_PROMPT, the prompt caption shards train with
    answerer = Answerer(registry.load(fvlm_dir), max_frames=4, image_frames=2, size=IMAGE)
    state = answerer.prepare(Media("image", [jpeg((20, 40, 220))]))
    continuations, labels = answerer.processor.answers(DESCRIBE_PROMPT, ["A blue picture."])
    prompt = answerer.processor.prompt(DESCRIBE_PROMPT)
    nll, count = answerer.model.option_nll(state.visual, prompt, continuations, labels, mean=False, mode="coarse_fine")
    assert records[2]["reads"]["coarse_fine"]["nll"] == pytest.approx(float(nll.sum()), abs=1e-4)
    assert records[2]["reads"]["coarse_fine"]["tokens"] == int(count.sum())

    world = toy.generate(tmp_path / "toy", train=1, eval=3, size=32, frames=2)
    summary = run(fvlm_dir, world / "caption_eval", tmp_path / "toy_out", "--reads", "autoregressive")
    records = check_summary(summary, tmp_path / "toy_out", ["autoregressive"], 3)
    assert records[0]["references"][0].startswith("A ") and "ball" in records[0]["references"][0]
    with pytest.raises(SystemExit, match="no splits"):
        run(fvlm_dir, root, tmp_path / "out", "--split", "test")


def test_missing_files_give_one_message_with_the_layout(fvlm_dir, tmp_path):
    def message(root, *extra) -> str:
        with pytest.raises(SystemExit) as e:
            run(fvlm_dir, root, tmp_path / "out", *extra)
        text = str(e.value.code)
        assert "Expected" in text, text
        return text

    assert "nowhere" in message(tmp_path / "nowhere")  # names all three layouts
    assert "caption shards" in message(tmp_path / "nowhere") and "COCO 2017" in message(tmp_path / "nowhere")
    text = message(tmp_path / "nowhere" / "dataset_flickr30k.json")
    assert "dataset_flickr30k.json not found" in text and "flickr30k-images" in text
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    text = message(tmp_path / "coco")
    assert "captions_val2017.json not found" in text and "ROOT/{train,val}2017/<file_name>" in text
    (tmp_path / "empty").mkdir()
    assert "holds no caption set" in message(tmp_path / "empty")
    assert "no readable .tar shards" in message(str(tmp_path / "empty" / "*.tar"))
    path = karpathy(tmp_path / "flickr30k")
    (path.parent / "flickr30k-images" / "1001.jpg").unlink()
    text = message(path)
    assert "1 images are missing" in text and "1001.jpg" in text
    with pytest.raises(SystemExit, match="has splits"):
        run(fvlm_dir, coco2017(tmp_path / "c2"), tmp_path / "out", "--split", "test")
    with pytest.raises(SystemExit):  # greedy decoding has no n-gram blocking
        run(fvlm_dir, path, tmp_path / "out", "--num-beams", "1", "--no-repeat-ngram-size", "2")


def test_perplexity_is_the_teacher_forced_mean_nll(fvlm_dir, tokenizer, tmp_path):
    """exp(Σ NLL / Σ tokens) over every reference, each the assistant turn after CAPTION_PROMPT, computed here
    from the full model's logits over [frames, prompt + reference] with the prompt labelled -100."""
    path, out = karpathy(tmp_path / "flickr30k"), tmp_path / "out"
    summary = run(fvlm_dir, path, out)
    records = {r["id"]: r for r in lines(out / "captions.jsonl")}
    answerer = Answerer(registry.load(fvlm_dir), max_frames=4, image_frames=2, size=IMAGE)
    prompt = prompt_ids(tokenizer, CAPTION_PROMPT)
    for mode in MODES:
        total, tokens = 0.0, 0
        for i, colour in enumerate(COLOURS):
            media = Media("image", [path.parent / "flickr30k-images" / f"{1000 + i}.jpg"])
            frames = media.frames(answerer.frames)[None]
            image_nll, image_tokens = 0.0, 0
            for reference in two(colour):
                ids, labels = chat_ids(tokenizer, CAPTION_PROMPT, reference, stage=2)
                assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {IGNORE_INDEX}
                ids = torch.tensor([ids])
                with torch.no_grad():
                    logits = answerer.model(frames, torch.ones(1, frames.shape[1], dtype=torch.bool), ids,
                                            torch.ones_like(ids), **answerer.reads[mode]).logits[0]  # fmt: skip
                logp = torch.log_softmax(logits[:-1].double(), -1)  # position j predicts token j + 1
                target = torch.tensor(labels[1:])
                keep = target != IGNORE_INDEX
                image_nll -= float(logp[keep, target[keep]].sum())
                image_tokens += int(keep.sum())
            read = records[str(1000 + i)]["reads"][mode]
            assert read["nll"] == pytest.approx(image_nll, rel=1e-4) and read["tokens"] == image_tokens
            total, tokens = total + image_nll, tokens + image_tokens
        assert summary["metrics"][mode]["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)


def test_beam_search_decodes_as_asked(gate_dir, tmp_path):
    path = karpathy(tmp_path / "flickr30k")
    answerer = Answerer(registry.load(gate_dir), max_frames=4, image_frames=2, size=IMAGE)
    model, processor = answerer.model, answerer.processor
    greedy, beams = {}, {}
    for i in range(len(COLOURS)):
        state = answerer.prepare(Media("image", [path.parent / "flickr30k-images" / f"{1000 + i}.jpg"]))
        greedy[str(1000 + i)] = answerer.generate(state, CAPTION_PROMPT, "default", max_new_tokens=12)
        ids = torch.tensor([processor.prompt(CAPTION_PROMPT)])
        new = model.generate(state.visual, ids, torch.ones_like(ids), 12, processor.end_ids, num_beams=4,
                             length_penalty=0.5, no_repeat_ngram_size=2)  # fmt: skip
        beams[str(1000 + i)] = processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()

    def captions(out: Path) -> dict[str, str]:
        return {r["id"]: r["reads"]["default"]["caption"] for r in lines(out / "captions.jsonl")}

    one_beam = run(gate_dir, path, tmp_path / "out", "--num-beams", "1", "--max-new-tokens", "12")
    assert one_beam["decoding"]["num_beams"] == 1 and captions(tmp_path / "out") == greedy
    four = run(gate_dir, path, tmp_path / "out", "--num-beams", "4", "--length-penalty", "0.5",
               "--no-repeat-ngram-size", "2", "--max-new-tokens", "12")  # fmt: skip
    assert four["answered_now"] == 4  # other settings: captioned afresh, not resumed from the greedy run
    assert four["decoding"] == {"num_beams": 4, "length_penalty": 0.5, "no_repeat_ngram_size": 2,
                                "max_new_tokens": 12}  # fmt: skip
    assert captions(tmp_path / "out") == beams and beams != greedy


@pytest.mark.parametrize("layout", ["karpathy", "coco"])
def test_a_few_training_steps_learn_to_caption(gate_dir, tmp_path, layout):
    """Four solid-colour images, one caption each ("a red square.", …), trained 30 train.py steps at high
    learning rates and captioned on the same images: BLEU and CIDEr-D rise far above the untrained model's."""
    if layout == "karpathy":
        path = karpathy(tmp_path / "data", split="train", refs=one)
        source = {"kind": "captions", "file": str(path), "images": str(path.parent), "split": "train"}
    else:
        path = coco2017(tmp_path / "data", split="train", refs=one)
        source = {"kind": "captions", "file": str(path), "split": "train"}
    cfg = from_dict(Config, {
        "model": {"kind": "cls_gate"},
        "data": {"train": [source], "stage": 2, "batch_size": 4, "frame_size": IMAGE, "max_frames": 4,
                 "replicate_image_frames": 2, "max_text_len": 48, "num_workers": 0, "shuffle_buffer": 0},
        "optim": {"lr_connector": 1e-2, "lr_vision": 0.0, "lr_llm": 1e-2, "schedule": "constant", "warmup": 0.0},
        "train": {"init_from": str(gate_dir), "max_steps": 30, "bf16": False, "save_every": 30, "keep_last": 1,
                  "out_dir": str(tmp_path / "run")},
    })  # fmt: skip
    trained = train.train(cfg)
    before = run(gate_dir, path, tmp_path / "before", "--split", "train")["metrics"]["default"]
    after = run(trained, path, tmp_path / "after", "--split", "train")["metrics"]["default"]
    print(f"{layout}: before {before}\n{layout}: after {after}")
    assert before["bleu4"] < 0.1 and after["bleu4"] > 0.5
    assert after["bleu1"] > before["bleu1"] + 0.4
    assert after["cider_d"] > before["cider_d"] + 2.0
    assert after["perplexity"] < before["perplexity"] / 10
