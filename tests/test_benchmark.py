"""benchmark.py end to end on fixture data sets written in each benchmark's own layout (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds

import benchmark
import registry
from config import MODES
from connectors.smolvlm import SmolVLM
from encoder import FoveatedEncoder
from evals.answering import Answerer
from inputs.frames import IMAGENET_MEAN, IMAGENET_STD, FrameSpec, Media
from inputs.tokenization import chat_ids
from layouts.eval_sets import load_benchmark
from model import FoveatedVLM
from tests.conftest import jpeg, mp4
from tests.tiny import IMAGE, tiny_connector_model, tiny_model, tiny_smolvlm
from vlm.decoding import shared_lead
from vlm.loss import token_nll

REPO = Path(__file__).resolve().parent.parent

OPTIONS = ["a red ball", "a green cube", "a blue cone", "nothing"]


def png(color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fvlm_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("fvlm")
    tiny_model(tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fvlm(fvlm_dir):
    return FoveatedVLM.from_pretrained(fvlm_dir)


def write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


@pytest.fixture
def mvbench(tmp_path):
    """Three tasks: a full video with a start/end window, a hub-style pre-cut segment (window ignored),
    and a 3 fps frame folder; two layouts of the root (ROOT/video/<folder> and ROOT/<folder>)."""
    root = tmp_path / "MVBench"
    item = {"question": "What is shown?", "candidates": OPTIONS, "answer": "a green cube"}
    write(root / "json/action_sequence.json", json.dumps([{**item, "video": "c1.mp4", "start": 0.25, "end": 0.75}]))
    write(root / "video/star/Charades_v1_480/c1.mp4", mp4(12, 32, 12))
    write(root / "json/object_interaction.json", json.dumps([{**item, "video": "c2.mp4", "start": 0.2, "end": 0.4}]))
    write(root / "star/Charades_segment/c2.mp4", mp4(6))
    three = {**item, "candidates": OPTIONS[:3], "answer": "a blue cone"}
    er = [{**three, "video": "ep1", "start": 0.0, "end": 1.0}, {**three, "video": "ep1"}]
    write(root / "json/episodic_reasoning.json", json.dumps(er))
    for i in range(6):
        write(root / f"video/tvqa/frames_fps3_hq/ep1/{i:05d}.jpg", jpeg((40 * i, 0, 0)))
    return root


def run(model_dir, bench, root, out, *extra):
    return benchmark.main(
        ["--model", str(model_dir), "--bench", bench, "--data-root", str(root), "--out", str(out)]
        + ["--frame-size", str(IMAGE), "--max-frames", "4", "--image-frames", "2", *extra]
    )


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_mvbench_layouts_and_windows(mvbench):
    bench = load_benchmark("mvbench", mvbench)
    q = {x.id: x for x in bench.questions}
    assert list(q) == ["action_sequence/0", "episodic_reasoning/0", "episodic_reasoning/1", "object_interaction/0"]
    assert q["action_sequence/0"].answer == "B" and q["action_sequence/0"].groups == {"task": "action_sequence"}
    assert q["action_sequence/0"].prompt == (
        "Question:What is shown?\nOption:\n(A) a red ball\n(B) a green cube\n(C) a blue cone\n(D) nothing\n"
        "Only give the best option.\n"
    )  # lmms-eval 0.7.3's MVBench prompt
    assert (q["action_sequence/0"].media.start, q["action_sequence/0"].media.end) == (0.25, 0.75)
    assert q["object_interaction/0"].media.start is None  # a pre-cut segment is already the window
    frames = q["episodic_reasoning/0"].media
    assert frames.kind == "frames" and len(frames.items) == 6 and frames.fps == 3.0

    def red(media):  # decoded red level (0-255) of each sampled frame
        x = media.frames(FrameSpec(size=IMAGE, max_frames=8, image_frames=1))[:, 0].mean((1, 2))
        return x * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255

    assert red(q["action_sequence/0"].media).min() > 50  # frames 3..9 of 12 (red = 20 i), not the ramp's start
    assert red(q["action_sequence/0"].media).max() < 200
    assert red(frames).max() < 130  # seconds 0-1 at 3 fps: frames 0-3 of 6 (red = 40 i)
    assert len(q["episodic_reasoning/1"].media.frames(FrameSpec(size=IMAGE, max_frames=8))) == 6


@pytest.mark.parametrize("protocol", ["likelihood", "generate"])
def test_mvbench_end_to_end_encodes_once_and_resumes(fvlm_dir, mvbench, tmp_path, monkeypatch, protocol):
    calls = {"prepare": 0, "encode_patches": 0}
    for cls, name in ((FoveatedVLM, "prepare"), (FoveatedEncoder, "encode_patches")):
        original = getattr(cls, name)

        def counted(self, *a, _original=original, _name=name, **k):
            calls[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(cls, name, counted)
    out = tmp_path / "out"
    summary = run(fvlm_dir, "mvbench", mvbench, out, "--protocol", protocol, "--limit", "3")
    assert calls == {"prepare": 3, "encode_patches": 3}  # 3 questions x 3 modes x (3-4 options): one pass each
    assert summary["protocol"] == protocol and summary["reads"] == list(MODES) and summary["questions"] == 3
    assert set(summary["groups"]["task"]) == {"action_sequence", "episodic_reasoning"}
    assert summary["chance"] == pytest.approx(100 * (1 / 4 + 2 / 3) / 3)
    records = lines(out / f"mvbench_{protocol}.jsonl")
    assert [r["id"] for r in records] == ["action_sequence/0", "episodic_reasoning/0", "episodic_reasoning/1"]
    for r in records:
        assert set(r["reads"]) == set(MODES)
        for m in r["reads"].values():
            assert m["score"] == float(m["pred"] == r["answer"])
            assert len(m["losses"]) == r["options"] if protocol == "likelihood" else isinstance(m["reply"], str)
    saved = json.loads((out / f"mvbench_{protocol}.json").read_text())
    assert saved["overall"] == summary["overall"]
    assert saved["lmms_eval"] == "0.7.3" and saved["prompt_variant"] == "default"
    if protocol == "generate":  # lmms-eval's MVBench figures leave empty replies out; ours are beside them
        empty = {m: sum(r["reads"][m]["reply"] == "" for r in records) for m in MODES}
        assert saved["empty_replies"] == empty and saved["all_questions"]["overall"]["n"] == 3
        assert set(saved["all_questions"]["task"]) == set(saved["groups"]["task"])
        for m in MODES:
            correct = sum(r["reads"][m]["score"] for r in records)
            assert saved["all_questions"]["overall"][m] == pytest.approx(100 * correct / 3)
    else:
        assert "all_questions" not in saved

    summary = run(fvlm_dir, "mvbench", mvbench, out, "--protocol", protocol)  # resume: only the 4th question
    assert calls["prepare"] == 4 and summary["answered_now"] == 1 and summary["overall"]["n"] == 4
    assert len(lines(out / f"mvbench_{protocol}.jsonl")) == 4
    run(fvlm_dir, "mvbench", mvbench, out, "--protocol", protocol, "--reads", "coarse_only")
    assert calls["prepare"] == 4  # every requested mode is already there


def test_resume_ignores_a_line_cut_short(fvlm_dir, mvbench, tmp_path):
    out = tmp_path / "out"
    run(fvlm_dir, "mvbench", mvbench, out, "--limit", "2", "--reads", "coarse_only")
    path = out / "mvbench_likelihood.jsonl"
    path.write_text(path.read_text() + '{"id": "object_inter')  # a crash mid-write
    summary = run(fvlm_dir, "mvbench", mvbench, out, "--limit", "3", "--reads", "coarse_only")
    assert summary["answered_now"] == 1 and summary["overall"]["n"] == 3


LETTERED = ["A. a red ball", "B. a green cube", "C. a cone", "D. nothing at all, really"]
# the plain wording's options share their first tokens ("The ball is"), which run once
PLAIN = ["The ball is red.", "The ball is green.", "The ball is light blue.", "The ball is yellow."]


@pytest.mark.parametrize("answers", [LETTERED, PLAIN], ids=["lettered", "plain"])
@pytest.mark.parametrize("mode", MODES)
def test_shared_prefix_scores_equal_full_sequences(fvlm, mode, answers):
    """The options scored on the prompt's KV cache (the tokens they share run once) equal each option's whole
    sequence through forward."""
    answerer = Answerer(fvlm, max_frames=4, size=IMAGE)
    media = Media("video", [mp4(8, 32)])
    prompt = "Which object is it?\nA. a red ball\nB. a green cube\nC. a cone\nD. nothing at all, really"
    continuations, labels = answerer.processor.answers(prompt, answers)
    assert shared_lead(continuations, labels) == (3 if answers is PLAIN else 0)
    shared = torch.tensor(answerer.score(answerer.prepare(media), prompt, answers, mode))
    frames = media.frames(answerer.frames)[None]
    fm = torch.ones(1, len(frames[0]), dtype=torch.bool)
    full = []
    with torch.no_grad():
        for a in answers:
            ids, labels = (torch.tensor([x]) for x in chat_ids(fvlm.tokenizer, prompt, a, stage=2))
            nll, count = token_nll(fvlm(frames, fm, ids, torch.ones_like(ids), mode=mode).logits, labels)
            full.append(nll / count)
    assert (shared - torch.cat(full)).abs().max() <= 1e-4
    assert shared.std() > 1e-3  # the options really differ


def test_bf16_reads_run_under_autocast_and_keep_their_own_predictions(fvlm, tmp_path):
    """bf16 scores are the fp32 scores to bf16 precision (not bit-equal: autocast really ran) and a bf16
    evaluation never resumes from an fp32 one's predictions."""
    media = Media("video", [mp4(8, 32)])
    prompt, answers = "Which object is it?", ["a red ball", "a green cube", "a blue cone", "nothing"]
    scores = {}
    for bf16 in (False, True):
        answerer = Answerer(fvlm, max_frames=4, size=IMAGE, bf16=bf16)
        scores[bf16] = {m: torch.tensor(answerer.score(answerer.prepare(media), prompt, answers, m)) for m in MODES}
    for m in MODES:
        assert 0 < (scores[True][m] - scores[False][m]).abs().max() <= 0.05 * scores[False][m].abs().max()
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "000000.tar")) as w:
        w.write({"__key__": "q0", "mp4": mp4(4, 32), "json": {"question": prompt, "options": answers, "answer": "A"}})
    bench = load_benchmark("shards", str(shards / "*.tar"))
    out = tmp_path / "eval"
    fp32 = benchmark.evaluate(Answerer(fvlm, bf16=False), bench, "likelihood", ["coarse_only"], out)
    half = benchmark.evaluate(Answerer(fvlm, bf16=True), bench, "likelihood", ["coarse_only"], out)
    assert (fp32["bf16"], half["bf16"], half["answered_now"]) == (False, True, 1)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["shards_likelihood.jsonl", "shards_likelihood_bf16.jsonl"]


def videomme_root(tmp_path):
    root = tmp_path / "Video-MME"
    rows = []
    kinds = [("short", "Knowledge"), ("short", "Sports Competition"), ("long", "Knowledge")]
    for i, (duration, domain) in enumerate(kinds):
        rows.append(
            dict(video_id=f"00{i}", duration=duration, domain=domain, sub_category="Astronomy", url="https://x",
                 videoID=f"vid{i % 2}", question_id=f"00{i}-1", task_type="Counting Problem",
                 question="How many balls?", options=["A. one", "B. two", "C. three", "D. four"], answer="BCD"[i])
        )  # fmt: skip
    write(root / "videomme/test-00000-of-00001.parquet", b"")
    pd.DataFrame(rows).to_parquet(root / "videomme/test-00000-of-00001.parquet")
    for v in ("vid0", "vid1"):
        write(root / f"data/{v}.mp4", mp4(6))
    return root


def test_videomme(fvlm_dir, tmp_path):
    root = videomme_root(tmp_path)
    q = load_benchmark("videomme", root).questions[0]
    assert q.options == ["one", "two", "three", "four"] and q.answer == "B"
    assert q.prompt == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many balls?\nA. one\nB. two\n"
        "C. three\nD. four\n\nAnswer with the option's letter from the given choices directly."
    )  # lmms-eval 0.7.3's default: its post-prompt brings a newline of its own
    bench = load_benchmark("videomme", root, variant="legacy")
    assert bench.questions[0].prompt.endswith("C. three\nD. four\nThe best answer is:")
    assert (bench.letter("Answer: B", 4), load_benchmark("videomme", root).letter("Answer: B", 4)) == ("A", "B")
    assert q.groups == {"duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
                        "task_type": "Counting Problem"}  # fmt: skip
    summary = run(fvlm_dir, "videomme", root, tmp_path / "out", "--protocol", "generate", "--reads", "autoregressive")
    assert summary["groups"]["duration"]["short"]["n"] == 2 and summary["groups"]["domain"]["Knowledge"]["n"] == 2
    assert set(summary["groups"]) == {"duration", "domain", "sub_category", "task_type"}
    assert summary["reads"] == ["autoregressive"] and summary["overall"]["n"] == 3
    assert summary["prompt_variant"] == "default" and summary["lmms_eval"] == "0.7.3"
    out = tmp_path / "out"
    variant = run(fvlm_dir, "videomme", root, out, "--protocol", "generate", "--reads", "autoregressive",
                  "--prompt-variant", "llava_vid")  # fmt: skip
    assert variant["prompt_variant"] == "llava_vid" and variant["answered_now"] == 3  # never resumes the default's
    assert json.loads((out / "videomme_generate_llava_vid.json").read_text())["prompt_variant"] == "llava_vid"
    assert json.loads((out / "videomme_generate.json").read_text())["prompt_variant"] == "default"
    with pytest.raises(SystemExit):
        run(fvlm_dir, "textvqa", textvqa_root(tmp_path), out, "--prompt-variant", "llava_vid")


def test_scienceqa_parquet_and_json_layouts(fvlm_dir, tmp_path):
    root = tmp_path / "ScienceQA"
    base = dict(question="Which is a mammal?", choices=["frog", "cat", "shark"], answer=1, task="closed choice",
                grade="grade3", subject="natural science", topic="biology", category="Classification",
                skill="x", lecture="", solution="")  # fmt: skip
    rows = [
        {**base, "image": {"bytes": png((200, 0, 0)), "path": None}, "hint": "Look at the picture."},
        {**base, "image": None, "hint": ""},  # no image: not in ScienceQA-IMG
        {**base, "image": {"bytes": png((0, 200, 0)), "path": None}, "hint": "", "subject": "language science"},
    ]
    write(root / "ScienceQA-IMG/test-00000-of-00001.parquet", b"")
    pd.DataFrame(rows).to_parquet(root / "ScienceQA-IMG/test-00000-of-00001.parquet")
    questions = load_benchmark("scienceqa", root).questions
    assert [q.id for q in questions] == ["test/0", "test/2"]
    assert questions[0].prompt == (
        "Context: Look at the picture.\nWhich is a mammal?\nA. frog\nB. cat\nC. shark\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert questions[1].prompt.startswith("Which is a mammal?") and questions[0].answer == "B"
    summary = run(fvlm_dir, "scienceqa", root, tmp_path / "out", "--reads", "coarse_only,coarse_fine")
    assert set(summary["groups"]["subject"]) == {"natural science", "language science"}

    json_root = tmp_path / "sqa_json"
    problems = {"7": {**base, "hint": "", "image": "image.png", "split": "test"},
                "8": {**base, "hint": "", "image": None, "split": "test"},
                "9": {**base, "hint": "", "image": "image.png", "split": "train"}}  # fmt: skip
    write(json_root / "problems.json", json.dumps(problems))
    write(json_root / "images/test/7/image.png", png((0, 0, 200)))
    assert [q.id for q in load_benchmark("scienceqa", json_root).questions] == ["7"]


def textvqa_root(tmp_path):
    root = tmp_path / "TextVQA"
    data = [
        {"question_id": 34602, "question": "what brand is SHOWN?", "image_id": "003a8ae2ef43b901",
         "answers": ["nous les gosses"] * 4 + ["dakota"] * 6},
        {"question_id": 34603, "question": "what does it say?", "image_id": "0054c91397f2fe05",
         "answers": ["stop"] * 10},
    ]  # fmt: skip
    write(root / "TextVQA_0.5.1_val.json", json.dumps({"dataset_name": "textvqa", "data": data}))
    write(root / "train_images/003a8ae2ef43b901.jpg", jpeg((10, 200, 10), (64, 48)))
    write(root / "train_images/0054c91397f2fe05.jpg", jpeg((200, 10, 10), (48, 64)))
    return root


def test_textvqa_generate_with_vqa_accuracy(fvlm_dir, tmp_path):
    root = textvqa_root(tmp_path)
    q = load_benchmark("textvqa", root).questions[0]
    assert q.prompt == "What brand is shown?\nAnswer the question using a single word or phrase."
    summary = run(fvlm_dir, "textvqa", root, tmp_path / "out", "--reads", "coarse_only")
    assert summary["metric"] == "vqa_accuracy" and summary["protocol"] == "generate" and summary["chance"] is None
    for r in lines(tmp_path / "out/textvqa_generate.jsonl"):
        assert isinstance(r["reads"]["coarse_only"]["reply"], str) and 0 <= r["reads"]["coarse_only"]["score"] <= 1
    with pytest.raises(SystemExit):
        run(fvlm_dir, "textvqa", root, tmp_path / "out", "--protocol", "likelihood")


def test_shards_schema(fvlm_dir, tmp_path):
    root = tmp_path / "toy"
    root.mkdir()
    with wds.TarWriter(str(root / "eval-000000.tar")) as sink:
        frames = {f"{i:03d}.jpg": jpeg((50 * i, 0, 0)) for i in range(3)}
        sink.write({"__key__": "s0", "json": {"question": "Where?", "options": OPTIONS, "answer": "C",
                                              "task": "motion"}, **frames})  # fmt: skip
        sink.write({"__key__": "s1", "json": {"question": "What?", "candidates": OPTIONS[:2], "answer": 1,
                                              "id": "q-1", "task": "identity"}, "mp4": mp4(6)})  # fmt: skip
        sink.write({"__key__": "s2", "json": {"question": "Colour?", "options": OPTIONS, "answer": "nothing"},
                    "jpg": jpeg((0, 0, 200))})  # fmt: skip
        sink.write({"__key__": "s3", "json": {"question": "Say it", "answers": ["go"] * 10}, "jpg": jpeg((9, 9, 9))})
    bench = load_benchmark("toy", root)
    assert [(q.id, q.answer, q.media.kind) for q in bench.questions] == [
        ("s0", "C", "frames"), ("q-1", "B", "video"), ("s2", "D", "image"), ("s3", ["go"] * 10, "image")
    ]  # fmt: skip
    assert bench.questions[0].prompt == (
        "Where?\nA. a red ball\nB. a green cube\nC. a blue cone\nD. nothing\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert bench.letter("The answer is E", 4) == "" and bench.letter("(B)", 2) == "B"
    summary = run(fvlm_dir, "shards", str(root / "*.tar"), tmp_path / "out")
    assert summary["overall"]["n"] == 4 and set(summary["groups"]["task"]) == {"motion", "identity"}
    assert summary["chance"] == pytest.approx(100 * (1 / 4 + 1 / 2 + 1 / 4) / 3)


def test_missing_files_give_one_message_with_the_layout(fvlm_dir, mvbench, tmp_path, capsys):
    for bench in ("mvbench", "videomme", "scienceqa", "textvqa", "toy"):
        with pytest.raises(SystemExit) as e:
            run(fvlm_dir, bench, tmp_path / "nowhere", tmp_path / "out")
        assert "Expected" in str(e.value.code) and "nowhere" in str(e.value.code)
    (mvbench / "video/star/Charades_v1_480/c1.mp4").unlink()
    with pytest.raises(SystemExit) as e:
        run(fvlm_dir, "mvbench", mvbench, tmp_path / "out")
    assert "1 media files are missing" in str(e.value.code) and "c1.mp4" in str(e.value.code)


def test_a_results_file_belongs_to_one_model_and_setting(tokenizer, mvbench, tmp_path, monkeypatch):
    """Two runs' models, both called `final`: by default each gets its own folder; sent to one folder, the second
    model is refused in one line rather than reported with the first's answers. The same model resumes; another
    frame setting or precision is another setting."""
    for seed in (0, 1):
        tiny_model(tokenizer=tokenizer, seed=seed).save_pretrained(tmp_path / f"run{seed}" / "final")
    first, second = tmp_path / "run0" / "final", tmp_path / "run1" / "final"
    monkeypatch.chdir(tmp_path)
    args = ["--bench", "mvbench", "--data-root", str(mvbench), "--frame-size", str(IMAGE), "--max-frames", "4"]
    a = benchmark.main(["--model", str(first), *args])
    b = benchmark.main(["--model", str(second), *args])
    assert a["answered_now"] == b["answered_now"] == a["questions"]  # nothing of the first run taken as answered
    assert sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir()) == ["run0_final", "run1_final"]
    shared = ["--out", str(tmp_path / "shared")]
    assert benchmark.main(["--model", str(first), *args, *shared])["answered_now"] == a["questions"]
    assert benchmark.main(["--model", str(first), *args, *shared])["answered_now"] == 0  # the same: resumed
    for other in (["--model", str(second), *args], ["--model", str(first), *args[:-1], "2"]):
        proc = subprocess.run([sys.executable, str(REPO / "benchmark.py"), *other, *shared], capture_output=True,
                              text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "holds answers of another setting" in proc.stderr and "--out" in proc.stderr


# ---- the SmolVLM variant through the same harness --------------------------------------------------


@pytest.fixture(scope="module")
def smolvlm_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("smolvlm")
    tiny_smolvlm(tokenizer).save_pretrained(path)
    return path


def test_smolvlm_textvqa_and_shared_prefix_scores(smolvlm_dir, tmp_path):
    model = registry.load(smolvlm_dir)
    assert isinstance(model, SmolVLM)
    summary = run(smolvlm_dir, "textvqa", textvqa_root(tmp_path), tmp_path / "out")
    assert summary["reads"] == ["default"] and summary["overall"]["n"] == 2

    answerer = Answerer(model)
    state = answerer.prepare(Media("image", [jpeg((0, 90, 200), (40, 30))]))
    question, answers = "Which is a mammal?", ["A. frog", "B. a cat", "C. shark"]
    shared = torch.tensor(answerer.score(state, question, answers, "default"))
    processor, full = answerer.processor, []
    prompt = processor.prompt(question, state.pictures)
    continuations, _ = processor.answers(question, answers)
    with torch.no_grad():
        for cont in continuations:
            ids = torch.tensor([prompt + cont])
            labels = ids.clone()
            labels[:, : len(prompt)] = -100
            out = model(ids, torch.ones_like(ids), **processor.visual(state.pictures), labels=labels)
            full.append(out.nll / out.count)
    assert (shared - torch.cat(full)).abs().max() <= 1e-4
    assert np.ptp(shared.numpy()) > 1e-4


BATCH_QUESTIONS = [  # (media, question, answers): clips of different lengths, a text-only one, 2-4 options
    (Media("video", [mp4(8, 32)]), "Which object is it?", ["A. a red ball", "B. a green cube", "C. a cone", "D. no"]),
    (Media("none"), "Is the sky green, would you say, on an ordinary day?", ["yes", "no"]),
    (Media("video", [mp4(3, 32)]), "What colour?", ["red", "a very dark shade of blue", "green"]),
    (Media("image", [jpeg((200, 30, 30))]), "Name it.", ["A. red", "B. blue"]),
    (Media("video", [mp4(5, 32)]), "What colour is it?", ["It is red.", "It is blue.", "It is a dark green."]),
]


@pytest.mark.parametrize("kind", ["foveated", "foveated_user_turn", "mlp", "smolvlm"])
def test_batched_scores_equal_each_question_scored_alone(tokenizer, kind):
    """score_batch over questions of different prompt lengths, clip lengths (a text-only one among them) and
    option counts gives each question what score gives it alone, in every read of every kind."""
    if kind.startswith("foveated"):
        model = tiny_model(tokenizer=tokenizer, frames_at="user_turn" if kind.endswith("user_turn") else "start")
    elif kind == "mlp":
        model = tiny_connector_model("mlp", tokenizer, frames_at="user_turn")
    else:
        model = tiny_smolvlm(tokenizer, 8, 32)
    answerer = Answerer(model)
    pictures = [m.pictures(answerer.frames) for m, _, _ in BATCH_QUESTIONS]
    questions, answers = [q for _, q, _ in BATCH_QUESTIONS], [a for _, _, a in BATCH_QUESTIONS]
    batch = answerer.prepare_batch(pictures)
    for read in answerer.reads:
        together = answerer.score_batch(batch, questions, answers, read)
        assert [len(x) for x in together] == [len(a) for a in answers]
        for p, q, a, scores in zip(pictures, questions, answers, together, strict=True):
            alone = answerer.score(answerer.prepare_pictures(p), q, a, read)
            assert torch.tensor(scores) == pytest.approx(torch.tensor(alone), abs=1e-4), (read, q)
            assert max(alone) - min(alone) > 1e-3  # the options really differ


def test_evaluate_in_batches_gives_the_records_of_one_at_a_time(fvlm, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "000000.tar")) as w:
        for i in range(5):
            options = ["a red ball", "a green cube", "a blue cone", "nothing"][: 2 + i % 3]
            sample = {"question": "Which?" + " really" * i, "options": options, "answer": "AB"[i % 2]}
            w.write({"__key__": f"q{i}", "mp4": mp4(3 + i, 32), "json": sample})
        bad = {"question": "?", "options": ["x", "y"], "answer": "A"}
        w.write({"__key__": "q5", "mp4": b"not a video", "json": bad})
    bench = load_benchmark("shards", str(shards / "*.tar"))
    one = benchmark.evaluate(Answerer(fvlm), bench, "likelihood", list(MODES), tmp_path / "one")
    two = benchmark.evaluate(Answerer(fvlm), bench, "likelihood", list(MODES), tmp_path / "two", batch_size=4)
    assert one["overall"] == two["overall"] and two["errors"] == 1 and two["questions"] == 6
    ones, twos = (lines(tmp_path / d / "shards_likelihood.jsonl") for d in ("one", "two"))
    assert [r["id"] for r in ones] == [r["id"] for r in twos]
    for a, b in zip(ones, twos, strict=True):
        assert a.keys() == b.keys() and a.get("error") == b.get("error")
        for m in MODES:
            assert a["reads"][m]["pred"] == b["reads"][m]["pred"]
            assert a["reads"][m].get("losses", []) == pytest.approx(b["reads"][m].get("losses", []), abs=1e-4)


@pytest.mark.parametrize("kind", ["foveated_after_question", "mlp", "smolvlm"])
def test_questions_about_one_clip_share_its_encoding_and_each_gets_its_own_read(tokenizer, tmp_path, kind, monkeypatch):
    """Four questions about two videos (and one unreadable): each video is decoded and encoded once, each question
    read on its own; every record is what the question gets asked alone."""
    from layouts.eval_sets import Benchmark, Question

    if kind == "foveated_after_question":
        model = tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="after_question")
    elif kind == "mlp":
        model = tiny_connector_model("mlp", tokenizer, frames_at="after_question")
    else:
        model = tiny_smolvlm(tokenizer)
    answerer = Answerer(model)
    (tmp_path / "a.mp4").write_bytes(mp4(6, 32))
    (tmp_path / "b.mp4").write_bytes(mp4(9, 32, fps=6))
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 9)
    clips = ["a", "b", "a", "bad", "a"]
    questions = [
        Question(f"q{i}", f"Question {i}: which colour {'is it' * (i + 1)}?", Media("video", [tmp_path / f"{c}.mp4"]),
                 ["red", "green", "blue"], "B")
        for i, c in enumerate(clips)
    ]  # fmt: skip
    bench = Benchmark("toy", questions, lambda reply, n: "")
    decoded, prepared = [], []
    pictures, prepare = Media.pictures, answerer.prepare_batch
    monkeypatch.setattr(
        Media, "pictures", lambda self, spec: decoded.append(self.items[0].name) or pictures(self, spec)
    )
    monkeypatch.setattr(answerer, "prepare_batch", lambda p: prepared.append(len(p)) or prepare(p))
    reads = list(answerer.reads)
    together = benchmark.answer_questions(answerer, bench, questions, "likelihood", reads)
    assert sorted(decoded) == ["a.mp4", "b.mp4", "bad.mp4"] and prepared == [2]
    assert "error" in together[3] and all("error" not in r for i, r in enumerate(together) if i != 3)
    for q, record in zip(questions, together, strict=True):
        alone = benchmark.answer_questions(answerer, bench, [q], "likelihood", reads)[0]
        for read in reads:
            assert record["reads"][read]["pred"] == alone["reads"][read]["pred"]
            if "losses" in alone["reads"][read]:
                assert np.allclose(record["reads"][read]["losses"], alone["reads"][read]["losses"], atol=1e-4)
