"""Caption-set readers on fixtures written in each published layout (Karpathy JSON, COCO 2017 annotations)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import jpeg
from PIL import Image

from layouts import caption_sets as cs


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg((200, 30, 40), (8, 6)))


def _sentences(imgid: int, *raws: str) -> list[dict]:
    return [
        {"tokens": r.lower().split(), "raw": r, "imgid": imgid, "sentid": 10 * imgid + k} for k, r in enumerate(raws)
    ]


@pytest.fixture
def flickr(tmp_path: Path) -> Path:
    images = [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train", "sentids": [0, 1],
         "sentences": _sentences(0, "Two young guys with shaggy hair look at their hands .", "Two men in the yard . ")},
        {"filename": "10002456.jpg", "imgid": 1, "split": "test", "sentids": [10],
         "sentences": _sentences(1, "Several men in hard hats are operating a giant pulley system .")},
        {"filename": "1000268201.jpg", "imgid": 2, "split": "test", "sentids": [20, 21],
         "sentences": _sentences(2, "A child in a pink dress .", "A little girl climbing stairs .")},
    ]  # fmt: skip
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    _image(tmp_path / "flickr30k-images" / "1000092795.jpg")
    _image(tmp_path / "flickr30k-images" / "10002456.jpg")  # 1000268201.jpg is missing
    return tmp_path / "dataset_flickr30k.json"


def test_karpathy_flickr30k(flickr: Path, caplog):
    root = flickr.parent
    with caplog.at_level(logging.WARNING):
        test = cs.read_karpathy(flickr, split="test")
    assert [r.id for r in test.records] == ["10002456", "1000268201"]  # missing image kept: still a reference
    assert test.records[1] == cs.CaptionRecord(
        "1000268201",
        root / "flickr30k-images" / "1000268201.jpg",
        ["A child in a pink dress .", "A little girl climbing stairs ."],
        "test",
    )
    assert test.missing_images == [root / "flickr30k-images" / "1000268201.jpg"]
    assert "1 of 2 images" in caplog.text
    with Image.open(test.records[0].image) as im:
        assert im.size == (8, 6)

    dropped = cs.read_karpathy(flickr, split="test", drop_missing=True)
    assert [r.id for r in dropped.records] == ["10002456"] and len(dropped.missing_images) == 1
    train = cs.read_karpathy(flickr, split="train").records
    assert train[0].captions == ["Two young guys with shaggy hair look at their hands .", "Two men in the yard ."]
    assert len(cs.read_karpathy(flickr).records) == 3  # all splits


def test_karpathy_images_root_apart_from_the_json(flickr: Path, tmp_path: Path):
    moved = tmp_path / "elsewhere" / "dataset_flickr30k.json"
    moved.parent.mkdir()
    flickr.rename(moved)
    got = cs.read_karpathy(moved, images_root=tmp_path, split="test")
    assert got.records[0].image == tmp_path / "flickr30k-images" / "10002456.jpg"
    assert len(got.missing_images) == 1
    assert len(cs.read_karpathy(moved, split="test").missing_images) == 2  # default root: the JSON's folder


def test_karpathy_coco(tmp_path: Path):
    def entry(imgid, cocoid, filepath, split, *raws):
        name = f"COCO_{filepath}_{cocoid:012d}.jpg"
        return {"filepath": filepath, "filename": name, "imgid": imgid, "split": split, "cocoid": cocoid,
                "sentids": [], "sentences": _sentences(imgid, *raws)}  # fmt: skip

    images = [
        entry(0, 391895, "val2014", "test", "A man with a red helmet on a small moped on a dirt road. "),
        entry(1, 522418, "train2014", "train", "A woman wearing a net on her head cutting a cake. "),
        entry(2, 184613, "val2014", "restval", "A child holding a flowered umbrella and petting a yak.", "A kid."),
        entry(3, 318219, "val2014", "val", "A young boy standing in front of a computer keyboard."),
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    for img in images:
        _image(tmp_path / img["filepath"] / img["filename"])

    train = cs.read_karpathy(path, split=("train", "restval"))
    assert [(r.id, r.split) for r in train.records] == [("522418", "train"), ("184613", "restval")]
    assert train.records[1].image == tmp_path / "val2014" / "COCO_val2014_000000184613.jpg"
    assert train.records[1].captions == ["A child holding a flowered umbrella and petting a yak.", "A kid."]
    assert train.missing_images == []
    test = cs.read_karpathy(path, split="test").records
    assert [r.captions for r in test] == [["A man with a red helmet on a small moped on a dirt road."]]


@pytest.fixture
def coco2017(tmp_path: Path) -> Path:
    val = {
        "info": {}, "licenses": [],
        "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 6, "width": 8},
                   {"id": 285, "file_name": "000000000285.jpg", "height": 6, "width": 8},
                   {"id": 632, "file_name": "000000000632.jpg", "height": 6, "width": 8}],
        "annotations": [{"image_id": 285, "id": 1, "caption": "A big burly grizzly bear is show with grass."},
                        {"image_id": 139, "id": 2, "caption": "A woman stands in the dining area at the table.\n"},
                        {"image_id": 285, "id": 3, "caption": "The large brown bear has a black nose."}],
    }  # fmt: skip
    train = {
        "images": [{"id": 9, "file_name": "000000000009.jpg"}],
        "annotations": [{"image_id": 9, "id": 4, "caption": "Closeup of bins of food."}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(val))
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(train))
    _image(tmp_path / "val2017" / "000000000139.jpg")
    _image(tmp_path / "train2017" / "000000000009.jpg")  # 285 is missing, 632 has no caption
    return tmp_path


def test_coco2017_captions(coco2017: Path, caplog):
    with caplog.at_level(logging.WARNING):
        val = cs.read_coco_captions(coco2017, split="val")
    assert val.records == [
        cs.CaptionRecord(
            "139", coco2017 / "val2017" / "000000000139.jpg", ["A woman stands in the dining area at the table."], "val"
        ),
        cs.CaptionRecord(
            "285",
            coco2017 / "val2017" / "000000000285.jpg",
            ["A big burly grizzly bear is show with grass.", "The large brown bear has a black nose."],
            "val",
        ),
    ]
    assert val.missing_images == [coco2017 / "val2017" / "000000000285.jpg"]
    assert "1 images in" in caplog.text and "no caption" in caplog.text
    both = cs.read_coco_captions(coco2017)
    assert [(r.id, r.split) for r in both.records] == [("9", "train"), ("139", "val"), ("285", "val")]
    assert [r.id for r in cs.read_coco_captions(coco2017, "val", drop_missing=True).records] == ["139"]


def test_coco2017_caption_of_an_unknown_image(coco2017: Path):
    path = coco2017 / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": [], "annotations": [{"image_id": 7, "caption": "x"}]}))
    with pytest.raises(ValueError, match="unknown image id 7"):
        cs.read_coco_captions(coco2017, "train")


def test_missing_files_name_the_path_and_the_layout(tmp_path: Path):
    with pytest.raises(cs.CaptionSetMissing, match=r"dataset_flickr30k\.json not found.*flickr30k-images"):
        cs.read_karpathy(tmp_path / "dataset_flickr30k.json")
    with pytest.raises(
        FileNotFoundError, match=r"captions_val2017\.json not found.*ROOT/\{train,val\}2017/<file_name>"
    ):
        cs.read_coco_captions(tmp_path, "val")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no top-level 'images' list"):
        cs.read_karpathy(tmp_path / "dataset_coco.json")
    with pytest.raises(ValueError, match="unknown split 'testing'"):
        cs.read_karpathy(tmp_path / "dataset_coco.json", split="testing")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        cs.read_coco_captions(tmp_path, "test")


def test_karpathy_entry_without_sentences(tmp_path: Path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": [{"filename": "1.jpg", "split": "val", "imgid": 5}]}))
    with pytest.raises(ValueError, match="image 5 lacks 'sentences'"):
        cs.read_karpathy(path)


def test_training_samples(flickr: Path):
    records = cs.read_karpathy(flickr).records
    per_caption = cs.training_samples(records)
    assert [(s.id, s.caption) for s in per_caption] == [(r.id, c) for r in records for c in r.captions]
    assert len(per_caption) == 5

    many = [cs.CaptionRecord(str(i), Path(f"{i}.jpg"), [f"caption {k}" for k in range(5)], "train") for i in range(40)]
    a = cs.training_samples(many, per="image", seed=3)
    assert [s.id for s in a] == [r.id for r in many] and all(s.caption in many[0].captions for s in a)
    assert cs.training_samples(many, per="image", seed=3) == a  # seeded
    assert cs.training_samples(many[::-1], per="image", seed=3) == a[::-1]  # independent of order
    assert cs.training_samples(many, per="image", seed=3, epoch=1) != a  # a new epoch draws afresh
    assert cs.training_samples(many, per="image", seed=4) != a
    assert len({s.caption for s in a}) > 1
    with pytest.raises(ValueError, match="per must be"):
        cs.training_samples(many, per="sentence")
