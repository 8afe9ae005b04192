"""The toy world: deterministic shards whose answers are right, readable by the training and benchmark readers."""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset.tariterators import tarfile_samples

import data
from config import DataConfig, ShardSource
from inputs.frames import FrameSpec
from inputs.processors import ChatProcessor
from layouts import toy
from layouts.eval_sets import load_benchmark

SIZE, FRAMES = 56, 3
SETTINGS = {"seed": 3, "train": 6, "eval": 4, "size": SIZE, "frames": FRAMES}


def task_of(root) -> str:
    """The task of the world written at `root` (its manifest's; the ball where none is recorded)."""
    manifest = Path(root) / toy.MANIFEST
    return json.loads(manifest.read_text()).get("task", "ball") if manifest.is_file() else "ball"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.generate(tmp_path_factory.mktemp("toy"), **SETTINGS)


def read(path) -> list[dict]:
    return list(tarfile_samples([{"url": str(path)}]))


def test_same_seed_same_bytes_other_seed_other_clips(world, tmp_path):
    again = toy.generate(tmp_path / "again", **SETTINGS)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert {"caption/000000.tar", "qa/000000.tar", "dpo/000000.tar", "val/000000.tar", "eval/000000.tar"} <= {
        str(f) for f in files
    }
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((world / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = toy.sample(4, "train", 0, SIZE, FRAMES)["scene"]
    assert toy.sample(3, "train", 0, SIZE, FRAMES)["scene"] != other
    assert toy.sample(3, "train", 0, SIZE, FRAMES)["scene"] != toy.sample(3, "eval", 0, SIZE, FRAMES)["scene"]


def test_ensure_regenerates_only_for_other_settings_or_another_generator(world, monkeypatch):
    calls = []
    monkeypatch.setattr(toy, "generate", lambda out, **kw: calls.append(kw) or out)
    toy.ensure(world, **SETTINGS)
    assert calls == []
    toy.ensure(world, **{**SETTINGS, "seed": 4})
    assert calls == [{**SETTINGS, "seed": 4, "task": "ball", "objects": toy.ALL}]
    toy.ensure(world, **SETTINGS, task="cued")  # the other task is another world
    assert calls[-1] == {**SETTINGS, "task": "cued", "objects": toy.ALL}
    monkeypatch.setattr(toy, "WORLD", toy.WORLD + 1)  # shards an earlier generator wrote are rewritten
    toy.ensure(world, **SETTINGS)
    assert calls[-1] == {**SETTINGS, "task": "ball", "objects": toy.ALL} and len(calls) == 3
    toy.ensure(world, **SETTINGS, task="binding", objects=(1, 4))  # a curriculum is another world too
    assert calls[-1] == {**SETTINGS, "task": "binding", "objects": (1, 4)} and len(calls) == 4


def pixel(raw: dict, t: int, xy: list[int]) -> np.ndarray:
    im = np.asarray(Image.open(io.BytesIO(raw[f"{t:03d}.jpg"])).convert("RGB"), dtype=int)
    return im[xy[1], xy[0]]


def test_answers_follow_from_the_scene_and_the_pixels(world):
    questions = read(world / "eval" / "000000.tar")
    val = read(world / "val" / "000000.tar")
    assert len(questions) == SETTINGS["eval"]
    for raw, raw_val in zip(questions, val, strict=True):
        meta, scene = json.loads(raw["json"]), json.loads(raw["json"])["scene"]
        colour, ball = scene["ball"]["colour"], scene["ball"]
        assert meta["options"] == list(toy.COLOURS) and meta["question"] == toy.QUESTION
        assert meta["options"][toy.LETTERS.index(meta["answer"])] == colour == toy.answer_of(scene)
        assert meta["task"] == toy.group_of(scene) and json.loads(raw_val["json"])["assistant"] == (
            f"{meta['answer']}. {colour}"
        )
        # the rendered frames show what the scene says: the ball's colour at each point of its path, which lies
        # wholly inside the frame; the frames change (the clutter is new in every one)
        assert len(ball["path"]) == FRAMES and ball["radius"] == SIZE // 8
        for t, (x, y) in enumerate(ball["path"]):
            assert ball["radius"] < x < SIZE - ball["radius"] and ball["radius"] < y < SIZE - ball["radius"]
            assert np.abs(pixel(raw, t, [x, y]) - toy.COLOURS[colour]).max() < 40
        assert raw["000.jpg"] != raw["001.jpg"]


def test_the_answer_is_any_colour_and_the_groups_split_by_distance_from_the_centre():
    scenes = [toy.make_scene(toy._rng(0, "train", i), 112, 4) for i in range(60)]  # no rendering: cheap
    assert {toy.answer_of(s) for s in scenes} == set(toy.COLOURS)
    assert {toy.group_of(s) for s in scenes} == set(toy.GROUPS)
    for s in scenes:
        far = np.linalg.norm(np.asarray(s["ball"]["path"]) - 56, axis=1).mean() >= 28
        assert toy.group_of(s) == toy.GROUPS[int(far)]
    assert len({tuple(s["ball"]["path"][0]) for s in scenes}) == len(scenes)  # the ball starts anywhere


def test_every_family_agrees_on_the_answer(world):
    families = {f: read(world / f / "000000.tar") for f in ("caption", "qa", "dpo")}
    for cap, qa, dpo in zip(*families.values(), strict=True):
        cap, qa, dpo = (json.loads(r["json"]) for r in (cap, qa, dpo))
        colour = toy.answer_of(qa["scene"])
        assert qa["assistant"].endswith(f". {colour}") and dpo["chosen"] == qa["assistant"] != dpo["rejected"]
        assert dpo["rejected"][3:] in toy.COLOURS
        assert dpo["user"] == qa["user"] == toy.mcq_prompt(toy.QUESTION, list(toy.COLOURS))
        assert cap["caption"] == toy.caption(qa["scene"]) and cap["caption"].startswith(f"A {colour} ball ")


@pytest.mark.parametrize(("family", "stage"), [("caption", 1), ("qa", 2), ("dpo", 3)])
def test_training_reader_reads_every_family(world, tokenizer, family, stage):
    cfg = DataConfig(
        train=[ShardSource(path=str(world / family / "*.tar"))], stage=stage, batch_size=4, max_frames=8,
        frame_size=SIZE, num_workers=0, shuffle_buffer=0,
    )  # fmt: skip
    processor = ChatProcessor(tokenizer, FrameSpec(size=SIZE, max_frames=8), stage)
    batches = list(data.make_loader(cfg, processor))
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
    assert [q.groups["task"] for q in bench.questions] == [toy.group_of(v["scene"]) for v in val]


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
        "train": str(world / "qa" / "*.tar"), "val": str(world / "val" / "*.tar"), "stage": 2,
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
            processor = ChatProcessor(tokenizer, FrameSpec(size=IMAGE, max_frames=FRAMES))
            batches = list(data.make_loader(from_dict(DataConfig, data_cfg), processor, split="val"))
            return sum(
                model(b["frames"], b["frame_mask"], b["input_ids"], b["attention_mask"], b["labels"]).loss.item()
                for b in batches
            ) / len(batches)

    before = val_loss(FoveatedVLM.from_pretrained(start))
    after = val_loss(FoveatedVLM.from_pretrained(train.train(cfg)))
    assert after < 0.8 * before, (before, after)


def test_look_share_measures_attention_on_the_ball_found_from_the_pixels(world):
    """ball_patches marks every patch where the ball's colour shows, and no more than its bounding square;
    look_share is 1 for attention spread over them and the patches' share of the frame for a uniform look."""
    import torch

    patch, grid = 14, SIZE // 14
    for raw in read(world / "eval" / "000000.tar"):
        scene = json.loads(raw["json"])["scene"]
        rgb = np.array(toy.COLOURS[scene["ball"]["colour"]])
        attention = torch.zeros(FRAMES, 1, 1 + grid * grid)
        for t in range(FRAMES):
            im = np.asarray(Image.open(io.BytesIO(raw[f"{t:03d}.jpg"])).convert("RGB"), dtype=int)
            ball_like = (np.abs(im - rgb).max(-1) < 30).reshape(grid, patch, grid, patch).mean((1, 3)) > 0.05
            mask = toy.ball_patches(scene, t, patch)
            assert ball_like.any() and not (ball_like.ravel() & ~mask).any(), t
            assert mask.sum() <= 4  # a ball two patches across at most straddles a 2x2 block
            attention[t, 0, 1:] = torch.from_numpy(mask / mask.sum())
        assert toy.look_share(attention, scene, patch) == pytest.approx(1.0)
        uniform = torch.full((FRAMES, 1, 1 + grid * grid), 1 / (grid * grid))
        expected = np.mean([toy.ball_patches(scene, t, patch).mean() for t in range(FRAMES)])
        assert toy.look_share(uniform, scene, patch) == pytest.approx(expected)


def test_the_plain_wording_is_evaluated_as_whole_replies(world):
    bench = load_benchmark("toy", toy.held_out(str(world / "ask" / "*.tar")))
    val = [json.loads(r["json"]) for r in read(world / "ask_val" / "000000.tar")]
    for q, v in zip(bench.questions, val, strict=True):
        assert not q.lettered and q.prompt == toy.QUESTION == v["user"]
        assert q.options == [toy.plain_reply(c) for c in toy.COLOURS]
        assert q.options["ABCD".index(q.answer)] == v["assistant"]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_the_main_command_runs_end_to_end_in_seconds(tmp_path, tokenizer, capsys, monkeypatch, bf16):
    """toyworld.run with a tiny model: the world, a few steps of the foveated model and of the glance, evaluation
    in every mode, where each looked, the pictures and the summary. The precision is set, never the machine's
    (`train.bf16: auto` would give each CPU its own file names and numbers)."""
    import yaml

    import benchmark
    import registry
    import toyworld
    from encoder import PatchMemo
    from evals.answering import Answerer
    from tests.tiny import IMAGE, tiny_model

    start = tmp_path / "start"
    tiny_model(tokenizer=tokenizer, frames_at="user_turn").save_pretrained(start)
    root = tmp_path / "toy"
    config = {
        "data": {"train": str(root / "ask" / "*.tar"), "val": str(root / "ask_val" / "*.tar"), "stage": 2,
                 "batch_size": 4, "max_frames": 2, "frame_size": IMAGE, "num_workers": 0, "shuffle_buffer": 0},
        "optim": {"lr_connector": 1e-2, "lr_vision": 0.0, "lr_llm": 0.0, "schedule": "constant", "warmup": 0.0},
        "train": {"init_from": str(start), "max_steps": 3, "save_every": 3, "out_dir": str(tmp_path / "run"),
                  "bf16": bf16},
    }  # fmt: skip
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(config))
    hits, get = [], PatchMemo.get  # reuses of an evaluation batch's DINOv2 pass: the glance's of the foveated's

    def counted(memo: PatchMemo, encoder, frames):
        found = get(memo, encoder, frames)
        hits.extend([1] if found is not None and len(frames) >= toyworld.EVAL_BATCH else [])  # not a sample's
        return found

    monkeypatch.setattr(PatchMemo, "get", counted)
    summary = toyworld.run(tmp_path / "toy.yaml", clips=8, pictures=1)
    assert set(summary["accuracy"]) == {"foveated", "glance"} and summary["questions"] == toy.EVAL_CLIPS
    assert summary["trained"] == "coarse_fine" and "foveated, trained coarse_fine:" in capsys.readouterr().out
    assert set(summary["accuracy"]["foveated"]) >= {"coarse_only", "coarse_fine", "autoregressive"}
    assert set(summary["share_on_ball"]) == {"clips", "uniform", "static", "loop", "glance"}
    assert all(0 < summary["share_on_ball"][k] < 1 for k in ("uniform", "static", "loop", "glance"))
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "final" / "config.json").is_file() and (run / "glance" / "final" / "config.json").is_file()
    pictures = sorted(p.name for p in (run / "attention").glob("*.png"))
    assert pictures == ["eval0000000.png", "eval0000000_glance.png", "eval0000000_loop.png", "eval0000000_static.png"]
    # the glance's evaluation read each batch through the foveated model's DINOv2 pass: as it reads alone
    bench = benchmark.load_benchmark("toy", toy.held_out(str(root / "ask" / "*.tar")))
    alone = Answerer(registry.load(run / "glance" / "final"), bf16=bf16)
    benchmark.evaluate(alone, bench, "likelihood", ["coarse_only"], tmp_path / "alone", toyworld.EVAL_BATCH)
    results = "toy_likelihood_bf16.jsonl" if bf16 else "toy_likelihood.jsonl"
    shared, own = (
        [json.loads(line)["reads"]["coarse_only"]["losses"] for line in (d / results).open()]
        for d in (run / "glance" / "eval", tmp_path / "alone")
    )
    assert len(own) == toy.EVAL_CLIPS and shared == own
    # every batch of the glance's evaluation, and the looks' second and third reads of their clips
    assert len(hits) == -(-toy.EVAL_CLIPS // toyworld.EVAL_BATCH) + 2


def test_another_seed_runs_in_its_own_world_and_out_dir():
    """`toyworld.py run --seed N`: the toy recipe unchanged but for the seed, the world and the run beside the
    default ones, so seeds are one flag and never overwrite seed 0's world or refuse its checkpoints."""
    import toyworld
    from config import load_config, to_dict

    base = load_config(toyworld.DEFAULT_CONFIG, [])
    cfg = load_config(toyworld.DEFAULT_CONFIG, toyworld.placed(toyworld.DEFAULT_CONFIG, ["train.max_steps=7"], 2))
    assert (cfg.train.seed, cfg.train.out_dir, cfg.train.max_steps) == (2, "runs/toy_s2", 7)
    sources = [(s.path, s.weight) for s in cfg.data.train]
    assert sources == [("data/toy_s2/ask/*.tar", 4.0), ("data/toy_s2/qa/*.tar", 1.0)]
    assert [s.path for s in cfg.data.val] == ["data/toy_s2/ask_val/*.tar"]
    a, b = to_dict(cfg), to_dict(base)
    for d in (a, b):
        del d["train"]["seed"], d["train"]["out_dir"], d["train"]["max_steps"], d["data"]["train"], d["data"]["val"]
    assert a == b


def test_the_cued_task_asks_the_colour_of_the_shape_the_first_frame_shows(tmp_path):
    """Frame 0 holds the white cue and no coloured shape; the later frames each shape once in each colour once,
    drawn where the scene says; the answer is the colour of the one shaped like the cue, in every family, and
    the look share's target is the cue in frame 0 and that shape after."""
    root = toy.generate(tmp_path / "cued", **{**SETTINGS, "size": 112}, task="cued")
    assert task_of(root) == "cued" and task_of(tmp_path) == "ball"
    asks, evals = read(root / "ask" / "000000.tar"), read(root / "ask_eval" / "000000.tar")
    for raw in asks:
        meta = json.loads(raw["json"])
        scene = meta["scene"]
        objects, cue = scene["objects"], scene["cue"]
        assert sorted(o["shape"] for o in objects) == sorted(toy.SHAPES)
        assert sorted(o["colour"] for o in objects) == sorted(toy.COLOURS)
        (target,) = [o for o in objects if o["shape"] == cue["shape"]]
        assert meta["user"] == toy.CUED_QUESTION and meta["assistant"] == f"It is {target['colour']}."
        assert np.abs(pixel(raw, 0, cue["xy"]) - 255).max() < 30  # the white cue
        first = np.asarray(Image.open(io.BytesIO(raw["000.jpg"])).convert("RGB"), dtype=int)
        assert (np.abs(first - first.mean(-1, keepdims=True)).max(-1) < 40).all()  # no colour in frame 0
        for o in objects:
            assert np.abs(pixel(raw, 1, o["path"][1]) - toy.COLOURS[o["colour"]]).max() < 40
        r = cue["radius"]
        for t in range(FRAMES):
            mask = toy.ball_patches(scene, t, 14).reshape(8, 8)
            x, y = cue["xy"] if t == 0 else target["path"][t]
            assert mask[y // 14, x // 14] and mask.sum() <= (((2 * (r + 2)) // 14 + 2) ** 2 if t == 0 else 9)
    assert [json.loads(e["json"])["question"] for e in evals] == [toy.CUED_QUESTION] * SETTINGS["eval"]
    assert json.loads((root / toy.MANIFEST).read_text())["task"] == "cued"


def test_the_binding_task_needs_the_named_object_and_nothing_else_gives_the_answer(tmp_path):
    """Every frame shows each colour once and each shape once, where the scene says; the question names one object
    by one attribute and asks the other, so exactly one answer is right, in both wordings; every clip shows the
    same bag of colours and shapes (no attribute of a frame alone tells the answer), and the answers and the kinds
    of question are spread over the options. Held-out clips are not training clips."""
    root = toy.generate(tmp_path / "binding", **{**SETTINGS, "size": 112, "train": 40}, task="binding")
    assert task_of(root) == "binding"
    answers, asked = Counter(), Counter()
    for raw, qa in zip(read(root / "ask" / "000000.tar"), read(root / "qa" / "000000.tar"), strict=True):
        meta, lettered = json.loads(raw["json"]), json.loads(qa["json"])
        scene = meta["scene"]
        objects, named = scene["objects"], scene["objects"][scene["target"]]
        assert sorted(o["shape"] for o in objects) == sorted(toy.SHAPES)
        assert sorted(o["colour"] for o in objects) == sorted(toy.COLOURS)
        by = "shape" if scene["ask"] == "colour" else "colour"
        (match,) = [o for o in objects if o[by] == named[by]]  # the question's words pick one object
        answer = match[scene["ask"]]
        if scene["ask"] == "colour":
            assert meta["user"] == f"What colour is the {named['shape']}?" and meta["assistant"] == f"It is {answer}."
        else:
            assert meta["user"] == f"What shape is the {named['colour']} one?"
            assert meta["assistant"] == f"It is a {answer}."
        own, other = toy.other_questions(scene)  # the picture's second question: another object, the other way
        named_by = {f"the {o['shape']}?": o for o in objects} | {f"the {o['colour']} one?": o for o in objects}
        (second,) = [o for end, o in named_by.items() if other.endswith(end)]
        assert own == meta["user"] and second is not named and ("colour" in own) != ("colour" in other)
        options = toy.options_of(scene)
        assert lettered["assistant"] == f"{toy.LETTERS[options.index(answer)]}. {answer}"
        assert lettered["user"].startswith(meta["user"] + "\n")
        for t in range(FRAMES):  # drawn in every frame, the first too; the look share's target is the named one
            for o in objects:
                assert np.abs(pixel(raw, t, o["path"][t]) - toy.COLOURS[o["colour"]]).max() < 40
            x, y = named["path"][t]
            assert toy.ball_patches(scene, t, 14).reshape(8, 8)[y // 14, x // 14]
        answers[answer] += 1
        asked[scene["ask"]] += 1
    assert set(asked) == {"colour", "shape"} and len(answers) >= 6  # both kinds of question, most answers seen
    train = {json.dumps(json.loads(r["json"])["scene"]["objects"]) for r in read(root / "ask" / "000000.tar")}
    held = {json.dumps(json.loads(r["json"])["scene"]["objects"]) for r in read(root / "ask_eval" / "000000.tar")}
    assert train.isdisjoint(held)
    groups = {json.loads(r["json"])["task"] for r in read(root / "ask_eval" / "000000.tar")}
    assert groups <= {"asks the colour", "asks the shape"}


def test_the_binding_curriculum_thins_only_the_training_clips(tmp_path):
    """With `objects` (1, 4) the training clips hold one to four of the objects, every count about as often, each colour
    and each shape at most once, the question naming one of them; the held-out split is byte for byte the world's
    without the curriculum, so the two runs are scored on the same questions. A curriculum elsewhere is refused."""
    settings = {**SETTINGS, "size": 112, "train": 40}
    plain = toy.generate(tmp_path / "plain", **settings, task="binding")
    taught = toy.generate(tmp_path / "taught", **settings, task="binding", objects=(1, 4))
    assert json.loads((taught / toy.MANIFEST).read_text())["objects"] == [1, 4]
    assert "objects" not in json.loads((plain / toy.MANIFEST).read_text())
    counts = Counter()
    for raw in read(taught / "ask" / "000000.tar"):
        meta = json.loads(raw["json"])
        scene = meta["scene"]
        objects, named = scene["objects"], scene["objects"][scene["target"]]
        shapes, colours = [o["shape"] for o in objects], [o["colour"] for o in objects]
        assert len(set(shapes)) == len(shapes) == len(set(colours)) and set(colours) <= set(toy.COLOURS)
        assert meta["user"] == toy.question_of(scene) and toy.answer_of(scene) == named[scene["ask"]]
        for o in objects:  # every object drawn where the scene says, in the last frame too
            assert np.abs(pixel(raw, FRAMES - 1, o["path"][-1]) - toy.COLOURS[o["colour"]]).max() < 40
        counts[len(objects)] += 1
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) >= 4  # 40 clips: about 10 of each
    for family in ("ask_eval", "eval", "ask_val"):
        assert (taught / family / "000000.tar").read_bytes() == (plain / family / "000000.tar").read_bytes()
    with pytest.raises(ValueError, match=r"objects=\(2, 4\)"):
        toy.generate(tmp_path / "ball", **SETTINGS, task="ball", objects=(2, 4))
    one = toy.generate(tmp_path / "one", **{**settings, "train": 6}, task="binding", objects=(1, 1))
    assert {len(json.loads(r["json"])["scene"]["objects"]) for r in read(one / "ask" / "000000.tar")} == {1}


def test_the_marked_task_asks_the_colour_of_the_ball_where_the_first_frame_shows_a_white_one(tmp_path):
    """Frame 0 holds the white cue alone on the background; the later frames the four colours once each, as balls
    standing still and apart among the clutter, one of them where the cue was; the answer is that one's colour,
    and the look share's target is the cue in frame 0 and that ball after. The clips' places differ, so no place
    answers for all of them."""
    root = toy.generate(tmp_path / "marked", **{**SETTINGS, "size": 112}, task="marked")
    assert task_of(root) == "marked"
    places = set()
    for raw in read(root / "ask" / "000000.tar"):
        meta = json.loads(raw["json"])
        scene = meta["scene"]
        objects, cue = scene["objects"], scene["cue"]
        assert sorted(o["colour"] for o in objects) == sorted(toy.COLOURS)
        (target,) = [o for o in objects if o["path"][1] == cue["xy"]]
        assert meta["user"] == toy.MARKED_QUESTION and meta["assistant"] == f"It is {target['colour']}."
        assert np.abs(pixel(raw, 0, cue["xy"]) - 255).max() < 30  # the white cue
        first = np.asarray(Image.open(io.BytesIO(raw["000.jpg"])).convert("RGB"), dtype=int)
        yy, xx = np.mgrid[:112, :112]
        away = np.hypot(xx - cue["xy"][0], yy - cue["xy"][1]) > cue["radius"] + 6
        assert (np.abs(first[away] - 110) < 20).all()  # frame 0: the cue on the bare background, no clutter
        for o in objects:
            assert all(xy == o["path"][0] for xy in o["path"])  # standing still
            for t in range(1, FRAMES):
                assert np.abs(pixel(raw, t, o["path"][t]) - toy.COLOURS[o["colour"]]).max() < 40
        xy = np.array([o["path"][0] for o in objects])
        assert min(np.linalg.norm(a - b) for i, a in enumerate(xy) for b in xy[i + 1 :]) > 2.5 * target["radius"]
        for t in range(FRAMES):
            mask = toy.ball_patches(scene, t, 14).reshape(8, 8)
            x, y = target["path"][t]
            bound = ((2 * (target["radius"] + 2)) // 14 + 2) ** 2 if t == 0 else 9  # frame 0: the outlined cue
            assert mask[y // 14, x // 14] and mask.sum() <= bound
        places.add(tuple(cue["xy"]))
    assert len(places) == SETTINGS["train"]
    assert "A white ball is shown at the" in toy.caption(scene)
    load = run_config("marked")
    assert load.train.out_dir == "runs/toy_marked" and load.data.train[0].path == "data/toy_marked/ask/*.tar"


def run_config(task: str):
    import toyworld
    from config import load_config

    return load_config(toyworld.DEFAULT_CONFIG, toyworld.placed(toyworld.DEFAULT_CONFIG, [], task=task))


def test_a_cued_run_lives_beside_the_ball_world():
    import toyworld
    from config import load_config

    cfg = load_config(toyworld.DEFAULT_CONFIG, toyworld.placed(toyworld.DEFAULT_CONFIG, [], task="cued"))
    assert cfg.train.out_dir == "runs/toy_cued" and cfg.data.train[0].path == "data/toy_cued/ask/*.tar"
    cfg = load_config(toyworld.DEFAULT_CONFIG, toyworld.placed(toyworld.DEFAULT_CONFIG, [], 3, "cued"))
    assert (cfg.train.out_dir, cfg.train.seed) == ("runs/toy_cued_s3", 3)
    assert cfg.data.val[0].path == "data/toy_cued_s3/ask_val/*.tar"
    assert toyworld.placed(toyworld.DEFAULT_CONFIG, ["train.max_steps=7"]) == ["train.max_steps=7"]
    cfg = load_config(toyworld.DEFAULT_CONFIG, toyworld.placed(toyworld.DEFAULT_CONFIG, [], 3, "binding", (1, 4)))
    assert cfg.train.out_dir == "runs/toy_binding_o1-4_s3"
    assert cfg.data.train[0].path == "data/toy_binding_o1-4_s3/ask/*.tar"
    assert [toyworld.objects_arg(a) for a in ("1-4", "1", "2-3")] == [(1, 4), (1, 1), (2, 3)]
    for bad in ("0", "3-2", "x", "1-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            toyworld.objects_arg(bad)
