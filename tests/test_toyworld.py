"""The toy world: deterministic shards whose answers are right, readable by the training and benchmark readers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from webdataset.tariterators import tarfile_samples

import data
import toyworld
from benchmarks import load_benchmark
from config import DataConfig

SIZE, FRAMES = 56, 3
SETTINGS = {"seed": 3, "train": 6, "eval": 4, "size": SIZE, "frames": FRAMES}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toyworld.generate(tmp_path_factory.mktemp("toy"), **SETTINGS)


def read(path) -> list[dict]:
    return list(tarfile_samples([{"url": str(path)}]))


def test_same_seed_same_bytes_other_seed_other_clips(world, tmp_path):
    again = toyworld.generate(tmp_path / "again", **SETTINGS)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert {"caption/000000.tar", "qa/000000.tar", "dpo/000000.tar", "val/000000.tar", "eval/000000.tar"} <= {
        str(f) for f in files
    }
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((world / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = toyworld.sample(4, "train", 0, SIZE, FRAMES)["scene"]
    assert toyworld.sample(3, "train", 0, SIZE, FRAMES)["scene"] != other
    assert toyworld.sample(3, "train", 0, SIZE, FRAMES)["scene"] != toyworld.sample(3, "eval", 0, SIZE, FRAMES)["scene"]


def test_ensure_regenerates_only_for_other_settings_or_another_generator(world, monkeypatch):
    calls = []
    monkeypatch.setattr(toyworld, "generate", lambda out, **kw: calls.append(kw) or out)
    toyworld.ensure(world, **SETTINGS)
    assert calls == []
    toyworld.ensure(world, **{**SETTINGS, "seed": 4})
    assert calls == [{**SETTINGS, "seed": 4}]
    monkeypatch.setattr(toyworld, "WORLD", toyworld.WORLD + 1)  # shards an earlier generator wrote are rewritten
    toyworld.ensure(world, **SETTINGS)
    assert calls == [{**SETTINGS, "seed": 4}, SETTINGS]


def pixel(raw: dict, t: int, xy: list[int]) -> np.ndarray:
    im = np.asarray(Image.open(io.BytesIO(raw[f"{t:03d}.jpg"])).convert("RGB"), dtype=int)
    return im[xy[1], xy[0]]


def test_answers_follow_from_the_scene_and_the_pixels(world):
    questions = read(world / "eval" / "000000.tar")
    val = read(world / "val" / "000000.tar")
    assert len(questions) == SETTINGS["eval"]
    for i, (raw, raw_val) in enumerate(zip(questions, val, strict=True)):
        meta, scene = json.loads(raw["json"]), json.loads(raw["json"])["scene"]
        colour = scene["cue"]["colour"]
        right = [o for o in scene["objects"] if o["colour"] == colour]
        assert meta["options"] == list(toyworld.INSIDES) and len(right) == 1
        inside = right[0]["inside"]
        assert meta["options"][toyworld.LETTERS.index(meta["answer"])] == inside == toyworld.answer_of(scene)
        coloured = [o for o in scene["objects"] if o["colour"] != toyworld.GREY]  # 1, 2, 3, 4, 1, ... boxes
        assert len(coloured) == 1 + i % 4 and meta["task"] == f"{len(coloured)} of 4 boxes coloured"
        assert sorted(o["corner"] for o in scene["objects"]) == [0, 1, 2, 3]
        assert json.loads(raw_val["json"])["assistant"] == f"{meta['answer']}. {inside}"
        # the rendered frames show what the scene says: the cue's colour in the middle of frame 0; in frames
        # 1.. each box's inside colour at its centre and its own colour on its rim, inside its own quadrant
        assert scene["cue"]["xy"] == [SIZE // 2, SIZE // 2] and scene["cue"]["radius"] == SIZE // 4
        assert np.abs(pixel(raw, 0, scene["cue"]["xy"]) - toyworld.COLOURS[colour]).max() < 40
        half, rim = SIZE // 2, (scene["radius"] + scene["inner_radius"]) // 2
        for o in scene["objects"]:
            inside_rgb = toyworld.INSIDES.get(o["inside"], toyworld.GREY_RGB)
            rim_rgb = toyworld.COLOURS.get(o["colour"], toyworld.GREY_RGB)
            for t, (ox, oy) in enumerate(o["path"], start=1):
                assert (ox >= half) == (o["corner"] % 2 == 1) and (oy >= half) == (o["corner"] >= 2)
                assert np.abs(pixel(raw, t, [ox, oy]) - inside_rgb).max() < 40
                assert np.abs(pixel(raw, t, [ox - rim, oy - rim]) - rim_rgb).max() < 40


def test_training_clips_grey_out_all_but_one_to_four_boxes_never_the_answer(world):
    for raw in read(world / "qa" / "000000.tar"):
        scene = json.loads(raw["json"])["scene"]
        coloured = [o for o in scene["objects"] if o["colour"] != toyworld.GREY]
        assert scene["cue"]["colour"] in [o["colour"] for o in coloured]
        assert len({o["colour"] for o in coloured}) == len({o["inside"] for o in coloured}) == len(coloured)
        for o in scene["objects"]:  # grey boxes are grey inside and out
            assert (o["colour"] == toyworld.GREY) == (o["inside"] == toyworld.GREY)
            rgb = toyworld.INSIDES.get(o["inside"], toyworld.GREY_RGB)
            assert np.abs(pixel(raw, 1, o["path"][0]) - rgb).max() < 40
    counts, answers = set(), set()
    for i in range(40):  # scenes only, no rendering: cheap
        rng = toyworld._rng(0, "train", i)
        scene = toyworld.make_scene(rng, SIZE, FRAMES, coloured=int(rng.integers(1, 5)))
        counts.add(sum(o["colour"] != toyworld.GREY for o in scene["objects"]))
        answers.add(toyworld.answer_of(scene))
    assert counts == {1, 2, 3, 4} and answers == set(toyworld.INSIDES)  # the answer is any inside colour


def test_every_family_agrees_on_the_answer(world):
    families = {f: read(world / f / "000000.tar") for f in ("caption", "qa", "dpo")}
    for cap, qa, dpo in zip(*families.values(), strict=True):
        cap, qa, dpo = (json.loads(r["json"]) for r in (cap, qa, dpo))
        scene, inside = qa["scene"], toyworld.answer_of(qa["scene"])
        colour = scene["cue"]["colour"]
        right = next(o for o in scene["objects"] if o["colour"] == colour)
        assert qa["assistant"].endswith(f". {inside}") and dpo["chosen"] == qa["assistant"] != dpo["rejected"]
        assert dpo["rejected"][3:] in toyworld.INSIDES
        assert dpo["user"] == qa["user"] == toyworld.mcq_prompt(toyworld.QUESTION, list(toyworld.INSIDES))
        assert cap["caption"].startswith(f"A {colour} disc. Then ")
        assert f"a {colour} box with {inside} inside at the {toyworld.CORNERS[right['corner']]}" in cap["caption"]


@pytest.mark.parametrize(("family", "stage"), [("caption", 1), ("qa", 2), ("dpo", 3)])
def test_training_reader_reads_every_family(world, tokenizer, family, stage):
    cfg = DataConfig(
        train_shards=str(world / family / "*.tar"), stage=stage, batch_size=4, max_frames=8, frame_size=SIZE,
        num_workers=0, shuffle_buffer=0,
    )  # fmt: skip
    batches = list(data.make_loader(cfg, tokenizer))
    assert sum(len(b["keys"]) for b in batches) == SETTINGS["train"]
    assert batches[0]["frames"].shape[1:] == (FRAMES, 3, SIZE, SIZE) and batches[0]["frame_mask"].all()
    assert all(not b["skipped"] for b in batches)


def test_benchmark_reads_the_held_out_split_with_the_training_prompt(world):
    bench = load_benchmark("toy", world / "eval")
    val = [json.loads(r["json"]) for r in read(world / "val" / "000000.tar")]
    assert [q.prompt for q in bench.questions] == [v["user"] for v in val]
    assert [f"{q.answer}. {q.options['ABCD'.index(q.answer)]}" for q in bench.questions] == [
        v["assistant"] for v in val
    ]
    assert [q.groups["task"] for q in bench.questions] == [f"{n} of 4 boxes coloured" for n in (1, 2, 3, 4)]


def test_a_few_training_steps_on_toy_shards_lower_the_loss(world, tokenizer, tmp_path):
    """The real trainer on the toy qa shards (tiny model, frames inside the user turn as configs/toy.yaml has
    them): the held-out answer loss falls."""
    import torch

    import train
    from config import Config, from_dict
    from model import FoveatedVLM
    from tests.tiny import IMAGE, tiny_model

    start = tmp_path / "start"
    tiny_model(tokenizer=tokenizer, frames_at="user_turn").save_pretrained(start)
    data_cfg = {
        "train_shards": str(world / "qa" / "*.tar"), "val_shards": str(world / "val" / "*.tar"), "stage": 2,
        "batch_size": 3, "max_frames": FRAMES, "frame_size": IMAGE, "num_workers": 0, "shuffle_buffer": 0,
    }  # fmt: skip
    cfg = from_dict(
        Config,
        {
            "data": data_cfg,
            "optim": {"lr_connector": 1e-2, "lr_vision": 0.0, "lr_llm": 3e-3, "schedule": "constant", "warmup": 0.0},
            "train": {"init_from": str(start), "max_steps": 16, "save_every": 16, "out_dir": str(tmp_path / "run")},
        },
    )

    def val_loss(model: FoveatedVLM) -> float:
        with torch.no_grad():
            batches = list(data.make_loader(from_dict(DataConfig, {**data_cfg, "stage": 2}), tokenizer, split="val"))
            return sum(
                model(b["frames"], b["frame_mask"], b["input_ids"], b["attention_mask"], b["labels"]).loss.item()
                for b in batches
            ) / len(batches)

    before = val_loss(FoveatedVLM.from_pretrained(start))
    after = val_loss(FoveatedVLM.from_pretrained(train.train(cfg)))
    assert after < 0.8 * before, (before, after)


def test_look_share_measures_attention_on_the_cue_box_found_from_the_pixels(world):
    """box_patches marks exactly the patches where the cue's colour shows in frames 1..; look_share is 1 for
    attention spread over them and the patches' share of the frame for a uniform look."""
    import torch

    patch, grid = 14, SIZE // 14
    for raw in read(world / "eval" / "000000.tar"):
        scene = json.loads(raw["json"])["scene"]
        rgb = np.array(toyworld.COLOURS[scene["cue"]["colour"]])
        attention = torch.zeros(FRAMES, 1, 1 + grid * grid)
        for t in range(1, FRAMES):
            im = np.asarray(Image.open(io.BytesIO(raw[f"{t:03d}.jpg"])).convert("RGB"), dtype=int)
            cue_like = (np.abs(im - rgb).max(-1) < 30).reshape(grid, patch, grid, patch).mean((1, 3)) > 0.05
            mask = toyworld.box_patches(scene, t, patch)
            assert np.array_equal(cue_like.ravel(), mask), t
            attention[t, 0, 1:] = torch.from_numpy(mask / mask.sum())
        assert toyworld.look_share(attention, scene, patch) == pytest.approx(1.0)
        uniform = torch.full((FRAMES, 1, 1 + grid * grid), 1 / (grid * grid))
        expected = np.mean([toyworld.box_patches(scene, t, patch).mean() for t in range(1, FRAMES)])
        assert toyworld.look_share(uniform, scene, patch) == pytest.approx(expected)
