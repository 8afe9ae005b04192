"""prepare.py: every source's published layout → shards that read back with the right media and labels;
bad media counted, not lost; resumable after a kill; the same bytes whatever the worker count."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg, mp4
from PIL import Image
from webdataset.tariterators import tarfile_samples

import prepare
from inputs.frames import load_video
from inputs.tokenization import IGNORE_INDEX, encode_sample
from layouts import shardwriter
from layouts.converters import LayoutError
from layouts.shards import media_of

ROOT = Path(__file__).resolve().parent.parent
RED, GREEN, BLUE = (250, 0, 0), (0, 250, 0), (0, 0, 250)


def png(color):
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), color).save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def csv_file(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def run(source, src, out, *args):
    return prepare.main([source, "--in", str(src), "--out", str(out), *map(str, args)])


def samples(out: Path) -> dict[str, dict]:
    """key → raw sample over all the shards, read back as data.py does."""
    got = {}
    for shard in sorted(out.glob("*.tar")):
        for raw in tarfile_samples([{"url": str(shard)}]):
            assert raw["__key__"] not in got
            got[raw["__key__"]] = raw
    return got


def meta(raw):
    return json.loads(raw["json"])


def by_id(out):
    return {meta(r)["id"]: r for r in samples(out).values()}


def labelled(tokenizer, raw, stage=2):
    ids = encode_sample(tokenizer, meta(raw), stage, 4096)
    return tokenizer.decode([y for y in ids["labels"] if y != IGNORE_INDEX])


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


# ---------------------------------------------------------------- fixtures in the published layouts

VIZWIZ_ANSWERS = ["red"] * 3 + ["crimson"] * 3 + ["dark red", "red", "unanswerable", "crimson"]


def llava_fixture(root: Path) -> Path:
    write(root / "train2017/000000000001.jpg", jpeg(RED))
    write(root / "train2017/000000000002.jpg", jpeg(GREEN))
    write(root / "train2017/000000000004.jpg", jpeg(BLUE)[:200])  # truncated
    human, gpt = "human", "gpt"
    entries = [
        {
            "id": "000000000001",
            "image": "000000000001.jpg",
            "conversations": [
                {"from": human, "value": "<image>\nWhat colour is the bus?"},
                {"from": gpt, "value": "The bus is red."},
                {"from": human, "value": "Is it moving?"},
                {"from": gpt, "value": "No, it is parked by the kerb."},
            ],
        },
        {
            "id": "000000000002",
            "image": "000000000002.jpg",
            "conversations": [
                {"from": human, "value": "Describe it.\n<image>"},
                {"from": gpt, "value": "Green grass."},
            ],
        },
        {
            "id": "000000000003",
            "image": "000000000003.jpg",  # not on disk
            "conversations": [{"from": human, "value": "<image>\nQ?"}, {"from": gpt, "value": "A."}],
        },
        {
            "id": "000000000004",
            "image": "000000000004.jpg",
            "conversations": [{"from": human, "value": "<image>\nQ?"}, {"from": gpt, "value": "A."}],
        },
        {"id": "sharegpt_1", "conversations": [{"from": human, "value": "Hi!"}, {"from": gpt, "value": "Hello."}]},
        {
            "id": "000000000005",
            "image": "000000000002.jpg",
            "conversations": [{"from": human, "value": "<image>\nQ?"}, {"from": gpt, "value": "  "}],
        },
    ]
    return write(root / "llava_instruct_150k.json", json.dumps(entries))


def cauldron_fixture(root: Path) -> Path:
    def img(b):
        return {"bytes": b, "path": None}

    parquet(
        root / "ai2d/train-00000-of-00001-4f7e3d1a.parquet",
        [
            {"images": [img(jpeg(RED))], "texts": [{"user": "Colour?", "assistant": "Red.", "source": "AI2D"}]},
            {
                "images": [img(png(GREEN))],
                "texts": [
                    {"user": "Colour?", "assistant": "Green.", "source": "AI2D"},
                    {"user": "Shape?", "assistant": "A rectangle.", "source": "AI2D"},
                ],
            },
            {"images": [img(b"not an image at all")], "texts": [{"user": "Q", "assistant": "A", "source": "AI2D"}]},
        ],
    )
    parquet(
        root / "mimic_cgd/train-00000-of-00001-9a8b7c6d.parquet",
        [
            {
                "images": [img(jpeg(RED)), img(png(BLUE))],
                "texts": [{"user": "What changed?", "assistant": "Red became blue.", "source": "MIMIC"}],
            },
            {"images": [], "texts": [{"user": "Q", "assistant": "A", "source": "MIMIC"}]},
        ],
    )
    return root


def openvid_fixture(root: Path) -> tuple[Path, Path, dict]:
    clips = {"celebv_a_0.mp4": mp4(12), "panda_b_1.mp4": mp4(6)}
    for name, clip in clips.items():
        write(root / "video" / name, clip)
    write(root / "video/broken_c_2.mp4", clips["celebv_a_0.mp4"][:300])
    header = ["video", "caption", "aesthetic score", "motion score", "temporal consistency score", "camera motion"]
    header += ["frame", "fps", "seconds"]
    rows = [
        ["celebv_a_0.mp4", "A woman smiles at the camera.", 5.1, 3.2, 0.98, "static", 12, 12.0, 1.0],
        ["gone_d_3.mp4", "A missing clip.", 4.0, 1.0, 0.9, "pan_left", 30, 30.0, 1.0],
        ["broken_c_2.mp4", "A truncated clip.", 4.0, 1.0, 0.9, "static", 12, 12.0, 1.0],
        ["panda_b_1.mp4", "A panda eats bamboo, slowly.", 4.8, 2.5, 0.99, "zoom_in", 6, 12.0, 0.5],
        ["celebv_a_0.mp4", "", 5.1, 3.2, 0.98, "static", 12, 12.0, 1.0],
    ]
    return csv_file(root / "data/train/OpenVid-1M.csv", header, rows), root / "video", clips


def webvid_fixture(root: Path) -> Path:
    write(root / "videos/000001_000050/1053841541.mp4", mp4(12))
    write(root / "videos/000001_000050/21179416.mp4", mp4(8))
    write(root / "videos/9999.mp4", mp4(5))  # a flat download
    rows = [
        [1053841541, "https://ak.picdn.net/x/1053841541.mp4", "PT00H00M01S", "000001_000050", "Red ramp, slow motion"],
        [21179416, "https://ak.picdn.net/x/21179416.mp4", "PT00H00M01S", "000001_000050", "Aerial shot of a beach"],
        [9999, "https://ak.picdn.net/x/9999.mp4", "PT00H00M01S", "000051_000100", "A flat one"],
    ]
    return csv_file(root / "results_2M_train.csv", ["videoid", "contentUrl", "duration", "page_dir", "name"], rows)


# ---------------------------------------------------------------- each source reads back


def test_llava_multi_turn_and_bad_media(tmp_path, tokenizer):
    out = tmp_path / "out"
    report = run("llava", llava_fixture(tmp_path), out, "--images", tmp_path / "train2017", "--shard-size", 2)
    got = by_id(out)
    assert sorted(got) == ["000000000001", "000000000002", "sharegpt_1"]
    assert report["skipped"] == {"missing_file": 1, "undecodable_image": 1, "empty_text": 1}
    assert report["records"] == 6 and report["samples"] == 3 and report["complete"]
    assert [s["samples"] for s in report["shards"]] == [2, 1]
    assert json.loads((out / "report.json").read_text()) == report
    first = got["000000000001"]
    assert media_of(first) == ("image", [jpeg(RED)])  # the image as it came
    m = meta(first)
    assert m["source"] == "llava" and "user" not in m
    assert m["turns"] == [
        {"role": "user", "content": "What colour is the bus?"},  # <image> removed
        {"role": "assistant", "content": "The bus is red."},
        {"role": "user", "content": "Is it moving?"},
        {"role": "assistant", "content": "No, it is parked by the kerb."},
    ]
    assert labelled(tokenizer, first) == "The bus is red.<|im_end|>No, it is parked by the kerb.<|im_end|>"
    assert meta(got["000000000002"])["user"] == "Describe it."  # one exchange: the single-turn form
    assert labelled(tokenizer, got["000000000002"]) == "Green grass.<|im_end|>"
    assert media_of(got["sharegpt_1"]) == ("text", [])  # no image in the entry: a text-only sample, kept
    log = (out / "prepare.log").read_text()
    assert "000000000003: missing_file" in log and "undecodable_image': 1" in log
    # the training pipeline reads the converted shards back: media and labels, the multi-turn one included
    import data
    from config import DataConfig, ShardSource
    from inputs.frames import FrameSpec
    from inputs.processors import ChatProcessor

    cfg = DataConfig(train=[ShardSource(path=str(out / "*.tar"))], stage=2, batch_size=8, num_workers=0,
                     shuffle_buffer=0, frame_size=16)  # fmt: skip
    (batch,) = data.make_loader(cfg, ChatProcessor(tokenizer, FrameSpec(size=16, image_frames=2)))
    ids = [meta(next(r for r in got.values() if r["__key__"] == k))["id"] for k in batch["keys"]]
    labels = batch["labels"][ids.index("000000000001")]
    assert tokenizer.decode(labels[labels != -100]) == labelled(tokenizer, first)  # exactly the assistant turns
    frames = dict(zip(ids, batch["frame_mask"].sum(1).tolist(), strict=True))
    assert frames == {"000000000001": 2, "000000000002": 2, "sharegpt_1": 0}  # 2 copies of each image; text only


def test_cauldron_turns_frames_and_formats(tmp_path, tokenizer):
    out = tmp_path / "out"
    report = run("cauldron", cauldron_fixture(tmp_path), out)
    got = by_id(out)
    assert report["skipped"] == {"undecodable_image": 1, "no_media": 1}
    ai2d, mimic = "ai2d/train-00000-of-00001-4f7e3d1a", "mimic_cgd/train-00000-of-00001-9a8b7c6d"
    one, two, many = got[f"{ai2d}:0"], got[f"{ai2d}:1"], got[f"{mimic}:0"]
    assert meta(one) == {
        "source": "cauldron",
        "id": f"{ai2d}:0",
        "subset": "ai2d",
        "user": "Colour?",
        "assistant": "Red.",
    }
    assert media_of(one) == ("image", [jpeg(RED)])
    assert "png" in two and media_of(two) == ("image", [png(GREEN)])  # the PNG stays a PNG
    assert labelled(tokenizer, two) == "Green.<|im_end|>A rectangle.<|im_end|>"
    assert media_of(many) == ("frames", [jpeg(RED), png(BLUE)])
    assert sorted(k for k in many if k[0].isdigit()) == ["000.jpg", "001.png"]


def test_openvid_videos_copied_checked_and_counted(tmp_path):
    csv_path, videos, clips = openvid_fixture(tmp_path)
    out = tmp_path / "out"
    report = run("openvid", csv_path, out, "--images", videos)
    assert report["skipped"] == {"missing_file": 1, "undecodable_video": 1, "empty_text": 1}
    raws = samples(out)
    assert sorted(raws) == ["000000000", "000000003"]  # keys are the CSV rows
    for key, name in (("000000000", "celebv_a_0.mp4"), ("000000003", "panda_b_1.mp4")):
        assert media_of(raws[key]) == ("video", [clips[name]])
        assert meta(raws[key])["id"] == name and meta(raws[key])["source"] == "openvid"
    assert meta(raws["000000003"])["caption"] == "A panda eats bamboo, slowly."
    assert {e["id"] for e in report["examples"]["missing_file"]} == {"gone_d_3.mp4"}


def test_webvid_reencoded_frames_are_what_training_would_decode(tmp_path):
    out = tmp_path / "out"
    report = run(
        "webvid", webvid_fixture(tmp_path), out, "--images", tmp_path / "videos", "--frame-size", 16, "--max-frames", 4
    )
    assert report["skipped"] == {} and report["samples"] == 3
    got = by_id(out)
    raw = got["1053841541"]
    assert meta(raw)["caption"] == "Red ramp, slow motion"
    kind, frames = media_of(raw)
    assert kind == "frames" and len(frames) == 4 and len(media_of(got["9999"])[1]) == 4
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(f))) for f in frames]).astype(float)  # (T,16,16,3)
    assert pixels.shape == (4, 16, 16, 3)
    expected = shardwriter._pixels(load_video(tmp_path / "videos/000001_000050/1053841541.mp4", 4, size=16))
    assert np.abs(pixels - expected).mean() < 3  # the same pixels, up to JPEG
    assert np.round(pixels[:, 8, 12, 0] / 20).tolist() == [1, 4, 7, 10]  # frames 1, 4, 7, 10 of 12: uniform
    timed = run("webvid", webvid_fixture(tmp_path), tmp_path / "fps", "--images", tmp_path / "videos", "--fps", 3)
    assert timed["settings"]["frame_size"] is None  # defaults apply: 224 px, at most 64 frames
    kind, frames = media_of(by_id(tmp_path / "fps")["1053841541"])
    assert kind == "frames" and len(frames) == 3  # 1 s at 3 fps
    assert Image.open(io.BytesIO(frames[0])).size == (224, 224)


def smoltalk_rows():
    m = [{"content": "Be brief.", "role": "system"}, {"content": "Hi?", "role": "user"}]
    return [
        {"messages": [*m, {"content": "Hello.", "role": "assistant"}], "source": "systemchats-30k"},
        {
            "messages": [{"content": "2+2?", "role": "user"}, {"content": "4", "role": "assistant"}],
            "source": "metamath",
        },
        {
            "messages": [
                {"content": "Name a colour.", "role": "user"},
                {"content": "Red.", "role": "assistant"},
                {"content": "Another?", "role": "user"},
                {"content": "Blue.", "role": "assistant"},
            ],
            "source": "smol-magpie-ultra",
        },
        {"messages": [{"content": "Unanswered", "role": "user"}], "source": "x"},
    ]


def test_smoltalk_parquet_jsonl_and_system_messages(tmp_path, tokenizer):
    parquet(tmp_path / "data/all/train-00000-of-00001.parquet", smoltalk_rows())
    parquet(tmp_path / "data/all/test-00000-of-00001.parquet", smoltalk_rows())  # held out: not converted
    out = tmp_path / "out"
    report = run("smoltalk", tmp_path / "data", out)
    assert report["skipped"] == {"bad_conversation": 1} and report["records"] == 4
    got = by_id(out)
    assert all(media_of(r) == ("text", []) for r in got.values())
    system = meta(got["all/train-00000-of-00001.parquet:0"])
    assert system["turns"][0] == {"role": "system", "content": "Be brief."} and system["subset"] == "systemchats-30k"
    ids = encode_sample(tokenizer, system, 2, 512)["input_ids"]
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tokenizer.decode(ids)
    assert meta(got["all/train-00000-of-00001.parquet:1"])["assistant"] == "4"
    assert labelled(tokenizer, got["all/train-00000-of-00001.parquet:2"]) == "Red.<|im_end|>Blue.<|im_end|>"
    lines = "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in smoltalk_rows())
    jsonl = write(tmp_path / "smoltalk.jsonl", lines)
    run("smoltalk", jsonl, tmp_path / "jsonl", "--drop-system")
    dropped = by_id(tmp_path / "jsonl")
    assert meta(dropped["smoltalk.jsonl:0"]) == {
        "source": "smoltalk",
        "id": "smoltalk.jsonl:0",
        "user": "Hi?",
        "assistant": "Hello.",
    }


def test_vizwiz_and_textvqa_most_frequent_answer(tmp_path, tokenizer):
    ann = [
        {
            "image": f"VizWiz_train_{i:08d}.jpg",
            "question": q,
            "answers": [{"answer": a, "answer_confidence": "yes"} for a in VIZWIZ_ANSWERS],
            "answer_type": "other",
            "answerable": 1,
        }
        for i, q in enumerate(["What colour is this shirt?", "Is this red?"])
    ]
    ann.append({"image": "VizWiz_test_00000000.jpg", "question": "What is this?"})  # the test split's form
    write(tmp_path / "vizwiz/train/VizWiz_train_00000000.jpg", jpeg(RED))  # image 1 missing
    write(tmp_path / "vizwiz/Annotations/train.json", json.dumps(ann))
    report = run("vizwiz", tmp_path / "vizwiz/Annotations/train.json", tmp_path / "vw")  # default images folder
    assert report["skipped"] == {"missing_file": 1, "no_answers": 1}
    (raw,) = by_id(tmp_path / "vw").values()
    assert meta(raw)["id"] == "VizWiz_train_00000000" and meta(raw)["answers"] == VIZWIZ_ANSWERS
    assert meta(raw)["assistant"] == "red"  # 4 × red against 4 × crimson: the first given wins the tie
    assert labelled(tokenizer, raw) == "red<|im_end|>" and media_of(raw)[0] == "image"

    qs = [
        {
            "question": "what brand is this?",
            "image_id": "0054c91397f2fe05",
            "image_classes": ["Bottle"],
            "flickr_original_url": "https://x",
            "flickr_300k_url": "https://y",
            "image_width": 40,
            "image_height": 30,
            "answers": ["nokia"] * 7 + ["nokia phone"] * 3,
            "question_tokens": ["what", "brand", "is", "this"],
            "question_id": 34602,
            "set_name": "train",
        },
        {
            "question": "what does it say?",
            "image_id": "00c359f294f7dcd9",
            "answers": ["stop"] * 10,
            "question_id": 34603,
            "set_name": "train",
        },
    ]
    doc = {"dataset_type": "train", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": qs}
    write(tmp_path / "tv/TextVQA_0.5.1_train.json", json.dumps(doc))
    write(tmp_path / "tv/train_images/0054c91397f2fe05.jpg", jpeg(GREEN))
    write(tmp_path / "tv/train_images/00c359f294f7dcd9.jpg", jpeg(GREEN)[:-300])  # truncated
    report = run("textvqa", tmp_path / "tv/TextVQA_0.5.1_train.json", tmp_path / "tvo")
    assert report["skipped"] == {"undecodable_image": 1}
    (raw,) = by_id(tmp_path / "tvo").values()
    assert meta(raw) == {
        "source": "textvqa",
        "id": "34602",
        "user": "what brand is this?",
        "assistant": "nokia",
        "answers": qs[0]["answers"],
    }
    assert media_of(raw) == ("image", [jpeg(GREEN)])


def test_rlaifv_preference_pairs(tmp_path, tokenizer):
    row = {
        "ds_name": "RLAIF-V",
        "question": "What is on the table?",
        "chosen": "A red cup.",
        "rejected": "A blue plate and two forks.",
        "origin_dataset": "COCO",
        "origin_split": "train",
        "image_path": "coco/1.jpg",
    }
    parquet(
        tmp_path / "RLAIF-V-Dataset_000.parquet",
        [
            {**row, "image": {"bytes": jpeg(RED), "path": "1.jpg"}, "idx": "7"},
            {**row, "image": {"bytes": None, "path": None}, "idx": "8"},
            {**row, "image": {"bytes": jpeg(BLUE), "path": "2.jpg"}, "idx": "9", "rejected": ""},
        ],
    )
    report = run("rlaifv", tmp_path, tmp_path / "out")
    assert report["skipped"] == {"no_media": 1, "empty_text": 1}
    (raw,) = by_id(tmp_path / "out").values()
    assert meta(raw) == {
        "source": "rlaifv",
        "id": "7",
        "user": "What is on the table?",
        "chosen": "A red cup.",
        "rejected": "A blue plate and two forks.",
    }
    assert media_of(raw) == ("image", [jpeg(RED)])
    pair = encode_sample(tokenizer, meta(raw), 3, 512)
    assert tokenizer.decode([y for y in pair["rejected_labels"] if y != IGNORE_INDEX]) == meta(raw)["rejected"] + (
        "<|im_end|>"
    )


# ---------------------------------------------------------------- resume, workers, reruns


def test_killed_conversion_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = cauldron_fixture(tmp_path / "src")
    whole = tmp_path / "whole"
    run("cauldron", src, whole, "--shard-size", 1)
    assert len(shard_bytes(whole)) == 3
    real, closed = shardwriter._close, []

    def crash_after_first(*args):
        if closed:
            raise RuntimeError("killed")
        closed.append(real(*args))

    monkeypatch.setattr(shardwriter, "_close", crash_after_first)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="killed"):
        run("cauldron", src, part, "--shard-size", 1)
    assert list(shard_bytes(part)) == ["cauldron-000000.tar"] and list(part.glob("*.tmp"))  # one done, one half
    first = (part / "cauldron-000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(shardwriter, "_close", real)
    report = run("cauldron", src, part, "--shard-size", 1)
    assert shard_bytes(part) == shard_bytes(whole) and not list(part.glob("*.tmp"))
    assert (part / "cauldron-000000.tar").stat().st_mtime_ns == first  # the finished shard was not rewritten
    assert report == json.loads((whole / "report.json").read_text()) | {"settings": report["settings"]}
    assert run("cauldron", src, part, "--shard-size", 1) == report  # complete: nothing to do
    kept = {p.name: p.read_bytes() for p in part.iterdir()}
    with pytest.raises(shardwriter.OtherOptions, match=r"other options \(--shard-size 1 there, 2 now\)"):
        run("cauldron", src, part, "--shard-size", 2)
    with pytest.raises(shardwriter.OtherOptions, match=r"\(--limit unset there, 2 now\): give another --out"):
        run("cauldron", src, part, "--shard-size", 1, "--limit", 2)
    assert {p.name: p.read_bytes() for p in part.iterdir()} == kept  # refused: nothing written or removed


def test_sigkilled_process_resumes_to_the_same_bytes(tmp_path):
    rows = [
        {"messages": [{"content": f"q{i}", "role": "user"}, {"content": f"a{i}", "role": "assistant"}]}
        for i in range(1000)
    ]
    src = write(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, str(ROOT / "prepare.py"), "smoltalk", "--in", str(src), "--shard-size", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    report = tmp_path / "killed/report.json"
    deadline = time.monotonic() + 60
    while not (report.exists() and json.loads(report.read_text())["shards"]) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(report.read_text())
    assert not done["complete"] and 0 < len(done["shards"]) < 200  # killed mid-way
    run("smoltalk", src, tmp_path / "killed", "--shard-size", 5)  # resumed
    run("smoltalk", src, tmp_path / "whole", "--shard-size", 5)
    resumed, whole = shard_bytes(tmp_path / "killed"), shard_bytes(tmp_path / "whole")
    assert len(whole) == 200 and resumed == whole


def test_workers_change_nothing(tmp_path):
    csv_path, videos, _ = openvid_fixture(tmp_path / "ov")
    src = llava_fixture(tmp_path / "ll")
    for w in (1, 2):
        run("openvid", csv_path, tmp_path / f"ov{w}", "--images", videos, "--workers", w, "--shard-size", 1)
        run(
            "webvid",
            webvid_fixture(tmp_path / "wv"),
            tmp_path / f"wv{w}",
            "--images",
            tmp_path / "wv/videos",
            "--workers",
            w,
            "--shard-size",
            2,
            "--frame-size",
            16,
            "--max-frames",
            3,
        )
        run("llava", src, tmp_path / f"ll{w}", "--images", tmp_path / "ll/train2017", "--workers", w)
    for name in ("ov", "wv", "ll"):
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        assert shard_bytes(one) == shard_bytes(two) and shard_bytes(one)
        assert (one / "report.json").read_text() == (two / "report.json").read_text()


def test_limit_takes_the_first_records(tmp_path):
    report = run("llava", llava_fixture(tmp_path), tmp_path / "out", "--images", tmp_path / "train2017", "--limit", 3)
    assert report["records"] == 3 and report["skipped"] == {"missing_file": 1}
    assert sorted(by_id(tmp_path / "out")) == ["000000000001", "000000000002"]


# ---------------------------------------------------------------- inputs in another layout, records the reader rejects


def test_an_input_in_another_layout_is_one_error_naming_the_file_and_the_layout(tmp_path):
    """A file of another source (or of none) reads as no record, or fails on its first line: one LayoutError that
    names it and quotes the layout the reader knows, never an empty conversion that exits 0."""
    one_line = write(tmp_path / "videos.json", json.dumps([{"videoid": 1, "name": "a clip"}]))
    indented = write(tmp_path / "indented.json", json.dumps([{"videoid": 1, "name": "a clip"}], indent=1))
    header = write(tmp_path / "header.csv", "videoid,contentUrl,duration,page_dir,name\n")
    chats = write(tmp_path / "chat.jsonl", json.dumps({"messages": []}) + "\n")
    webvid = "prepare.py webvid reads `results_2M_train.csv` / `results_10M_train.csv` (and `_val`) with columns"
    cases = [
        ("webvid", one_line, f"{one_line} is not a CSV with the columns videoid, name: its first line reads"),
        ("webvid", indented, f"{indented} is not a CSV with the columns videoid, name: its first line reads '['"),
        ("webvid", header, f"{header} holds no webvid record. {webvid}"),
        ("openvid", header, f"{header} is not a CSV with the columns video, caption"),
        ("llava", chats, f"{chats} does not hold a JSON list of conversations"),
        ("llava", header, f"{header} is not a JSON file"),
        ("vizwiz", chats, f"{chats} does not hold a JSON list of questions"),
        ("textvqa", one_line, f"{one_line}: expected {{'data': [questions]}}"),
        ("cauldron", chats, f"{chats} is not a parquet file"),
        ("rlaifv", one_line, f"{one_line} is not a parquet file"),
        ("smoltalk", header, f"{header}, line 1: not a JSON object"),
    ]
    for i, (source, src, wanted) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(LayoutError) as e:
            run(source, src, out)
        assert wanted in str(e.value) and f"prepare.py {source} reads " in str(e.value), (source, str(e.value))
        assert not (out / "report.json").exists()  # nothing recorded: a rerun with the right file starts afresh
    assert run("webvid", header, tmp_path / "none", "--limit", 0)["records"] == 0  # asked for no record: no error


def test_rejected_records_are_reported_in_the_sources_own_keys(tmp_path):
    """A LLaVA entry without `conversations` (or with an empty one, or an unknown speaker) and a SmolTalk row
    without `messages` are counted as bad_conversation, their detail naming the source's key (not the shard
    JSON's `turns`, which a user would not find in the file)."""
    entries = [
        {"id": "none", "image": "a.jpg"},
        {"id": "empty", "conversations": []},
        {"id": "bot", "conversations": [{"from": "bot", "value": "Hi."}]},
        {"id": "ok", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
    ]
    report = run("llava", write(tmp_path / "llava.json", json.dumps(entries)), tmp_path / "ll")
    assert report["skipped"] == {"bad_conversation": 3} and report["samples"] == 1
    details = {e["id"]: e["detail"] for e in report["examples"]["bad_conversation"]}
    assert details["none"] == "no 'conversations' in the entry"
    assert details["empty"].startswith("'conversations' must be a non-empty list of {from, value}, got []")
    assert "'from' one of human, gpt, system" in details["bot"]
    assert not any("turns" in d for d in details.values())
    rows = [{"id": 1}, {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]}]
    chats = write(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    report = run("smoltalk", chats, tmp_path / "st")
    assert report["examples"]["bad_conversation"] == [{"id": "chat.jsonl:0", "detail": "no 'messages' in the row"}]
