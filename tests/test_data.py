from collections import Counter

import pytest
import torch
import webdataset as wds
from conftest import jpeg, mp4

import data
from collate import collate, group_batches
from config import ConfigError, DataConfig, ShardSource
from inputs.frames import IMAGENET_MEAN, IMAGENET_STD, FrameSpec
from inputs.processors import ChatProcessor
from inputs.tokenization import DESCRIBE_PROMPT, IGNORE_INDEX, chat_ids, encode_sample, prompt_ids

RED, GREEN, BLUE = (250, 0, 0), (0, 250, 0), (0, 0, 250)


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def sources(spec):
    """A shard glob, or [(glob, weight), ...] -> shard sources."""
    if not spec:
        return []
    return [ShardSource(path=spec)] if isinstance(spec, str) else [ShardSource(path=p, weight=w) for p, w in spec]


def config(train, val=None, **kw):
    base = dict(num_workers=0, shuffle_buffer=0, frame_size=16, max_frames=8, replicate_image_frames=3)
    return DataConfig(train=sources(train), val=sources(val), **{**base, **kw})


def processor(cfg, tokenizer):
    frames = FrameSpec(cfg.frame_size, cfg.max_frames, cfg.replicate_image_frames, cfg.fps)
    return ChatProcessor(tokenizer, frames, cfg.stage, cfg.max_text_len)


def run(cfg, tokenizer, **kw):
    return list(data.make_loader(cfg, processor(cfg, tokenizer), **kw))


def by_key(batches):
    """key -> (batch, row) over a list of batches."""
    return {k: (b, i) for b in batches for i, k in enumerate(b["keys"])}


def chat(i, media=None):
    sample = {"__key__": f"s{i:04d}", "json": {"user": f"question {i}", "assistant": f"answer {i}"}}
    return {**sample, **(media or {})}


# ---------------------------------------------------------------- tokenization


def test_stage2_labels_cover_exactly_the_answer_and_end_of_turn(tokenizer):
    ids, labels = chat_ids(tokenizer, "What colour is it?", "Green, mostly.", stage=2)
    prompt = prompt_ids(tokenizer, "What colour is it?")
    assert ids[: len(prompt)] == prompt  # the same prompt tokens as at inference
    span = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert span == list(range(len(prompt), len(ids) - 1))  # contiguous: answer … <|im_end|>, not the "\n"
    assert [labels[i] for i in span] == ids[len(prompt) : -1]
    assert tokenizer.decode(ids[len(prompt) : -1]) == "Green, mostly.<|im_end|>"
    assert ids[-2] == tokenizer.convert_tokens_to_ids("<|im_end|>") and tokenizer.decode(ids[-1:]) == "\n"
    assert tokenizer.pad_token_id == ids[-2]  # why -100 and never the pad id marks "no loss"
    ids1, labels1 = chat_ids(tokenizer, "What colour is it?", "Green, mostly.", stage=1)
    assert ids1 == ids and labels1 == ids


def test_encode_sample_forms(tokenizer):
    pre = encode_sample(tokenizer, {"token_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, 2, 100)
    assert pre == {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    cap = encode_sample(tokenizer, {"caption": "A dog."}, 2, 100)
    assert cap == dict(zip(("input_ids", "labels"), chat_ids(tokenizer, DESCRIBE_PROMPT, "A dog.", 2), strict=True))
    assert len(encode_sample(tokenizer, {"caption": "A dog."}, 1, 5)["labels"]) == 5
    dpo = encode_sample(tokenizer, {"user": "Q?", "chosen": "Yes.", "rejected": "No, never."}, 3, 100)
    assert (dpo["chosen_input_ids"], dpo["chosen_labels"]) == chat_ids(tokenizer, "Q?", "Yes.", 2)
    assert (dpo["rejected_input_ids"], dpo["rejected_labels"]) == chat_ids(tokenizer, "Q?", "No, never.", 2)
    for bad, stage in [
        ({"user": "q", "chosen": "a", "rejected": "b"}, 2),
        ({"caption": "x"}, 3),
        ({"x": 1}, 1),
        ({"token_ids": [1, 2], "loss_mask": [1]}, 1),
        ({"user": "q", "assistant": 3}, 2),
        ([1], 1),
    ]:
        with pytest.raises(ValueError):
            encode_sample(tokenizer, bad, stage, 100)


# ---------------------------------------------------------------- collate


def test_collate_pads_exactly():
    a = {"frames": torch.ones(2, 3, 4, 4), "input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    b = {"frames": torch.zeros(0, 3, 4, 4), "input_ids": [8], "labels": [8]}
    batch = collate([a, b], pad_id=2)
    assert batch["frames"].shape == (2, 2, 3, 4, 4) and batch["frames"].dtype == torch.float32
    assert batch["frame_mask"].tolist() == [[True, True], [False, False]]
    assert batch["frames"][0].eq(1).all() and batch["frames"][1].eq(0).all()
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert {batch[k].dtype for k in ("input_ids", "attention_mask", "labels")} == {torch.long}
    assert collate([b, b], pad_id=2)["frames"].shape == (2, 0, 3, 4, 4)  # all text-only: T_max = 0
    pair = {
        "frames": torch.zeros(1, 3, 4, 4),
        "chosen_input_ids": [1, 2],
        "chosen_labels": [1, 2],
        "rejected_input_ids": [3],
        "rejected_labels": [3],
    }
    dpo = collate([pair, {**pair, "rejected_input_ids": [3, 4, 5], "rejected_labels": [3, 4, 5]}], pad_id=0)
    assert dpo["rejected_input_ids"].tolist() == [[3, 0, 0], [3, 4, 5]]
    assert dpo["chosen_attention_mask"].tolist() == [[1, 1], [1, 1]] and "input_ids" not in dpo
    with pytest.raises(ValueError):
        collate([a, pair], pad_id=0)


def test_group_batches_frame_budget():
    ts = [2, 5, 1, 8, 3]
    assert list(group_batches(ts, 3, None, frames_of=int)) == [[2, 5, 1], [8, 3]]
    # padded cost = items × longest T must stay ≤ 10; an 8 alone is fine, 8 with anything is not
    assert list(group_batches(ts, 3, 10, frames_of=int)) == [[2, 5], [1], [8], [3]]


# ---------------------------------------------------------------- shards


def test_every_form_reads_back(tmp_path, tokenizer):
    frames = {"002.jpg": jpeg(BLUE), "000.jpg": jpeg(RED), "001.jpg": jpeg(GREEN)}  # tar order ≠ frame order
    shard = write_shard(
        tmp_path / "forms.tar",
        [
            {"__key__": "pretok", "json": {"token_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, **frames},
            chat(1, {"jpg": jpeg(GREEN)}),
            {"__key__": "caption", "json": {"caption": "A ramp."}, "mp4": mp4(num_frames=12)},
            chat(2),  # text-only
        ],
    )
    (batch,) = run(config(shard, batch_size=8), tokenizer)
    rows = {k: i for i, k in enumerate(batch["keys"])}
    assert sorted(rows) == ["caption", "pretok", "s0001", "s0002"]
    t = batch["frame_mask"].sum(1)
    assert [t[rows[k]].item() for k in ("pretok", "s0001", "caption", "s0002")] == [3, 3, 8, 0]
    assert batch["frames"].shape == (4, 8, 3, 16, 16) and batch["skipped"] == {}
    pixel = batch["frames"][:, :, :, 8, 8] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)  # (B,T,3)
    assert pixel[rows["pretok"], :3].argmax(-1).tolist() == [0, 1, 2]  # red, green, blue: numeric order
    assert pixel[rows["s0001"], :3].argmax(-1).tolist() == [1, 1, 1]  # one image, replicated
    r, n = rows["pretok"], 4
    assert batch["input_ids"][r, :n].tolist() == [5, 6, 7, 8] and batch["attention_mask"][r].sum() == n
    assert batch["labels"][r, :n].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8]
    for key, text in (("s0001", "answer 1"), ("caption", "A ramp."), ("s0002", "question 2")):
        i, m = rows[key], batch["attention_mask"][rows[key]].bool()
        assert text in tokenizer.decode(batch["input_ids"][i][m])
        assert torch.equal(batch["labels"][i][m], batch["input_ids"][i][m])  # stage 1: every token
        assert (batch["labels"][i][~m] == IGNORE_INDEX).all()


def test_dpo_pair(tmp_path, tokenizer):
    shard = write_shard(
        tmp_path / "dpo.tar",
        [
            {
                "__key__": "p",
                "json": {"user": "Colour?", "chosen": "Red.", "rejected": "Blue, I think."},
                "jpg": jpeg(RED),
            },
            chat(1),  # not a pair: unusable in stage 3, counted
        ],
    )
    (batch,) = run(config(shard, stage=3), tokenizer)
    assert batch["keys"] == ["p"] and batch["skipped"] == {"bad_json": 1}
    assert batch["frame_mask"].tolist() == [[True] * 3]
    c, r = batch["chosen_input_ids"][0], batch["rejected_input_ids"][0]
    p = len(prompt_ids(tokenizer, "Colour?"))
    assert torch.equal(c[:p], r[:p]) and (batch["chosen_labels"][0, :p] == IGNORE_INDEX).all()
    labelled = batch["rejected_labels"][0][batch["rejected_labels"][0] != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Blue, I think.<|im_end|>"


def test_corrupt_samples_are_skipped_and_counted(tmp_path, tokenizer):
    good = jpeg(RED)
    clip = mp4()
    shard = write_shard(
        tmp_path / "mixed.tar",
        [
            chat(0, {"jpg": good}),
            chat(1, {"jpg": b"\xff\xd8 this is not a jpeg"}),
            chat(2, {"mp4": clip}),
            chat(3, {"mp4": clip[: len(clip) // 2]}),
            chat(4),
            {"__key__": "s0005", "json": b'{"user": "unterminated'},
            chat(6, {"000.jpg": good, "001.jpg": good[: len(good) // 2]}),  # truncated second frame
            chat(7, {"000.jpg": good, "001.jpg": good}),
        ],
    )
    batches = run(config(shard, batch_size=3), tokenizer)
    assert sorted(k for b in batches for k in b["keys"]) == ["s0000", "s0002", "s0004", "s0007"]
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped == {"bad_media": 3, "bad_json": 1}


def shard_set(tmp_path, n_shards, per_shard, media=lambda i: None):
    return [
        write_shard(tmp_path / f"train-{s:03d}.tar", [chat(s * 100 + j, media(j)) for j in range(per_shard)])
        for s in range(n_shards)
    ]


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path, tokenizer):
    shard_set(tmp_path, 8, 5)
    cfg = config(str(tmp_path / "train-{000..007}.tar"), num_workers=2, shuffle_buffer=4, batch_size=2)
    orders = []
    for epoch in (0, 1):
        keys = [[k for b in run(cfg, tokenizer, rank=r, world_size=2, epoch=epoch) for k in b["keys"]] for r in (0, 1)]
        assert len(keys[0]) == len(keys[1]) == 20  # 8 shards over 2 ranks: 4 shards each
        assert sorted(keys[0] + keys[1]) == sorted(f"s{s * 100 + j:04d}" for s in range(8) for j in range(5))
        orders.append(keys[0])
    assert orders[0] != orders[1]  # shards and samples reshuffled by epoch


def test_a_weighted_mix_is_exact_and_the_first_source_sets_the_epoch(tmp_path, tokenizer):
    main = write_shard(tmp_path / "main.tar", [chat(i, {"jpg": jpeg(RED)}) for i in range(12)])
    text = write_shard(tmp_path / "text.tar", [{"__key__": f"t{i}", "json": {"caption": "x"}} for i in range(3)])
    cfg = config([(main, 0.75), (text, 0.25)], batch_size=1, shuffle_buffer=2)
    batches = run(cfg, tokenizer)
    keys = [b["keys"][0] for b in batches]
    assert [i for i, k in enumerate(keys) if k.startswith("t")] == [2, 6, 10, 14]  # one in four; text cycles past 3
    assert sorted(k for k in keys if k.startswith("s")) == [f"s{i:04d}" for i in range(12)]  # main read once
    assert [b["sources"][0] for b in batches] == [int(k.startswith("t")) for k in keys]


def resume_config(tmp_path, **kw):
    def media(j):  # text-only, images, 1-4 frame sequences and one corrupt image per shard
        if j % 4 == 1:
            return {"jpg": jpeg(GREEN)}
        if j % 4 == 2:
            return {f"{f:03d}.jpg": jpeg(BLUE) for f in range(1 + j % 3 + j // 4)}
        return {"jpg": b"broken"} if j == 7 else None

    shard_set(tmp_path, 4, 9, media)
    text = write_shard(tmp_path / "text.tar", [{"__key__": f"t{i}", "json": {"caption": f"c{i}"}} for i in range(5)])
    return config(
        [(str(tmp_path / "train-*.tar"), 0.8), (text, 0.2)],
        batch_size=3,
        frame_budget=8,
        shuffle_buffer=4,
        **kw,
    )


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"] and x["index"] == y["index"] and x["skipped"] == y["skipped"]
        if x["keys"]:
            assert all(torch.equal(x[k], y[k]) for k in ("frames", "frame_mask", "input_ids", "labels"))


def test_resume_without_workers_is_exact_and_skips_without_decoding(tmp_path, tokenizer, monkeypatch):
    cfg = resume_config(tmp_path)
    full = run(cfg, tokenizer, epoch=3)
    assert sum(b["skipped"].get("bad_media", 0) for b in full) == 4
    assert all(b["frame_mask"].shape[0] * b["frame_mask"].shape[1] <= 8 for b in full)  # frame budget held
    for n in range(0, len(full) + 1, 3):
        same(run(cfg, tokenizer, epoch=3, skip_batches=n), full[n:])
    decoded = []
    real = data.SourceDataset._decode
    monkeypatch.setattr(data.SourceDataset, "_decode", lambda self, raw, c: decoded.append(1) or real(self, raw, c))
    same(run(cfg, tokenizer, epoch=3, skip_batches=len(full) - 1), full[-1:])
    assert len(decoded) == len(full[-1]["keys"]) + full[-1]["skipped"].get("bad_media", 0)


def test_workers_change_nothing_and_resume_anywhere_is_exact(tmp_path, tokenizer):
    """Workers split a rank's batches by index, so 0, 2 or 3 workers give one sequence, and a loader reopened at
    any position continues it exactly, the epoch's ragged end included."""
    full = run(resume_config(tmp_path), tokenizer, epoch=1)
    assert len(full) >= 12 and [b["index"] for b in full] == list(range(len(full)))
    for workers in (2, 3):
        cfg = resume_config(tmp_path, num_workers=workers)
        same(run(cfg, tokenizer, epoch=1), full)
        for n in range(len(full) + 1):
            same(run(cfg, tokenizer, epoch=1, skip_batches=n), full[n:])


def test_a_batch_that_loses_every_sample_keeps_its_place(tmp_path, tokenizer):
    bad = {"jpg": b"broken"}
    write_shard(tmp_path / "a.tar", [chat(0), chat(1, bad), chat(2, bad), chat(3)])
    cfg = config(str(tmp_path / "a.tar"), batch_size=1, num_workers=2)
    batches = run(cfg, tokenizer)
    assert [b["keys"] for b in batches] == [["s0000"], [], [], ["s0003"]]
    assert [b["skipped"] for b in batches] == [{}, {"bad_media": 1}, {"bad_media": 1}, {}]
    same(run(cfg, tokenizer, skip_batches=2), batches[2:])


def test_numbered_frames_are_sampled_at_data_fps_when_the_sample_states_its_rate(tmp_path, tokenizer):
    """12 frames extracted at 4 fps are 3 s: at data.fps 1 that is 3 frames; without a stated rate all 12
    are taken as already at the training rate (capped at max_frames)."""
    frames = {f"{f:03d}.jpg": jpeg((20 * f, 0, 0)) for f in range(12)}
    timed = {"__key__": "timed", "json": {"user": "q", "assistant": "a", "fps": 4}, **frames}
    plain = {"__key__": "plain", "json": {"user": "q", "assistant": "a"}, **frames}
    write_shard(tmp_path / "f.tar", [timed, plain])
    by = by_key(run(config(str(tmp_path / "f.tar"), batch_size=1, fps=1.0, max_frames=8), tokenizer))
    reds = [
        round(float(by["timed"][0]["frames"][0, t, 0].mean() * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255 / 20)
        for t in range(3)
    ]
    assert int(by["timed"][0]["frame_mask"].sum()) == 3 and reds == [2, 6, 10]  # centres of three 4-frame seconds
    assert int(by["plain"][0]["frame_mask"].sum()) == 8


def test_expand_shards_and_errors(tmp_path, tokenizer):
    shard_set(tmp_path, 3, 1)
    assert data.expand_shards(str(tmp_path / "train-{000..001}.tar")) == [
        str(tmp_path / f"train-00{i}.tar") for i in (0, 1)
    ]
    assert len(data.expand_shards([str(tmp_path / "train-*.tar"), "pipe:cat x.tar"])) == 4
    with pytest.raises(FileNotFoundError):
        data.expand_shards(str(tmp_path / "nope-*.tar"))
    remote = ["pipe:cat nowhere.tar", "https://host/a-{0..1}.tar", "s3://bucket/b.tar"]
    opened = ["pipe:cat nowhere.tar", "https://host/a-0.tar", "https://host/a-1.tar", "s3://bucket/b.tar"]
    assert data.expand_shards(remote, must_exist=True) == opened  # WebDataset opens them: unchecked
    with pytest.raises(ValueError, match="val"):
        run(config(str(tmp_path / "train-*.tar")), tokenizer, split="val")
    val = run(config("", val=str(tmp_path / "train-*.tar"), shuffle_buffer=100), tokenizer, split="val")
    assert [k for b in val for k in b["keys"]] == ["s0000", "s0100", "s0200"]  # in order, unshuffled


def test_a_shard_path_that_does_not_exist_is_one_error_before_any_reading(tmp_path, tokenizer, caplog):
    """The brace form every stage config uses, one shard too many or a misspelt folder: one FileNotFoundError
    naming the first missing path when the loader is made, not a warning per shard and an error blaming empty
    shards once every one has been tried."""
    shard_set(tmp_path, 3, 1)
    spec = str(tmp_path / "train-{000..003}.tar")
    with pytest.raises(FileNotFoundError, match=rf"^no shard at {tmp_path}/train-003.tar \(1 of the 4 that '"):
        data.expand_shards(spec, must_exist=True)
    with pytest.raises(FileNotFoundError, match=rf"^no shard at {tmp_path}/gone/x.tar: fix the path"):
        data.expand_shards(str(tmp_path / "gone" / "x.tar"), must_exist=True)
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a shard: name its shards, e\.g\. '.*/\*\.tar'"):
        data.expand_shards(str(tmp_path), must_exist=True)
    assert data.expand_shards(spec) == [str(tmp_path / f"train-00{i}.tar") for i in range(4)]  # unasked: unchecked
    with pytest.raises(FileNotFoundError, match="train-003.tar"):
        run(config(spec), tokenizer)  # training's reader asks
    assert not [r for r in caplog.records if "skipping" in r.getMessage()]


def test_throughput_helper(tokenizer):
    cfg = config("x.tar")
    out = data.throughput(processor(cfg, tokenizer), num_workers=0, num_samples=4, frames_per_sample=4,
                          source_size=(32, 24), batch_size=2)  # fmt: skip
    assert out["samples_per_s"] > 0 and out["samples_per_s_per_worker"] == out["samples_per_s"]


def test_a_mix_holds_its_weights_over_every_stretch_and_resumes_exactly(tmp_path, tokenizer):
    """Three sources at 0.5 / 0.3 / 0.2: after every n samples each source's count is within one sample of
    weight x n (the smooth weighted round-robin's bound), over a whole epoch; a loader reopened anywhere
    continues the same mixed sequence."""
    for name, n in (("a", 20), ("b", 4), ("c", 3)):
        write_shard(tmp_path / f"{name}.tar", [{"__key__": f"{name}{i}", "json": {"caption": "x"}} for i in range(n)])
    weights = (0.5, 0.3, 0.2)
    cfg = config([(str(tmp_path / f"{x}.tar"), w) for x, w in zip("abc", weights, strict=True)], batch_size=1)
    batches = run(cfg, tokenizer)
    drawn = [b["sources"][0] for b in batches]
    assert drawn.count(0) == 20  # the first source, read once, sets the epoch
    for n in range(1, len(drawn) + 1):
        for source, w in enumerate(weights):
            assert abs(drawn[:n].count(source) - w * n) < 1, (n, source)
    for skip in (3, 17, len(batches) - 1):
        same(run(cfg, tokenizer, skip_batches=skip), batches[skip:])


def test_a_mix_by_batch_draws_each_batch_from_one_source_by_weight_and_resumes_exactly(tmp_path, tokenizer):
    """data.mix "batch": every batch holds one source's samples, padded to its own length; the sources' shares
    of batches follow the weights as the samples' do in a mix by sample; the first source is read once."""
    write_shard(tmp_path / "short.tar", [chat(i) for i in range(24)])
    long = [{"__key__": f"L{i}", "json": {"user": "a much longer question " * 6, "assistant": "x"}} for i in range(5)]
    write_shard(tmp_path / "long.tar", long)
    mix = [(str(tmp_path / "short.tar"), 0.8), (str(tmp_path / "long.tar"), 0.2)]
    cfg = config(mix, batch_size=3, mix="batch")
    batches = run(cfg, tokenizer)
    drawn = [set(b["sources"]) for b in batches]
    assert all(len(d) == 1 for d in drawn) and len(batches) == 10  # 8 batches of the first source + 2
    assert [d.pop() for d in drawn] == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]  # one in five, as the mix by sample deals
    assert sorted(k for b in batches for k in b["keys"] if k.startswith("s")) == [f"s{i:04d}" for i in range(24)]
    by_sample = run(config(mix, batch_size=3), tokenizer)
    width = max(b["input_ids"].shape[1] for b in batches if b["sources"][0] == 0)
    assert width < min(b["input_ids"].shape[1] for b in by_sample if 1 in b["sources"])
    for skip in (2, 7):
        same(run(cfg, tokenizer, skip_batches=skip), batches[skip:])
    with pytest.raises(ConfigError, match="data.mix"):
        config(mix, mix="rows")
