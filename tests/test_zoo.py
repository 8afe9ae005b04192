"""The connector zoo through the one interface: every kind trains with train.py, saves and loads exactly,
is scored by benchmark.py in both protocols, answers through chat.py, and reads padded batches, text-only
rows and several frames as it reads each sample alone. LoRA on the LLM trains only its adapters (tiny random
configs; the toy world written small)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

import benchmark
import chat
import registry
import train
from config import Config, ConfigError, LoraConfig, ModelConfig, from_dict
from connectors.tower_vlm import TowerVLM
from layouts import toy
from tests.conftest import jpeg
from tests.tiny import CONNECTOR_KINDS, IMAGE, frames, tiny_connector_model, tiny_model
from vlm import saved

REPO = Path(__file__).resolve().parent.parent
KINDS = (*CONNECTOR_KINDS, "foveated")


pytestmark = pytest.mark.usefixtures("single_thread")


def build(kind: str, tokenizer=None, **kw):
    return tiny_model(tokenizer=tokenizer, **kw) if kind == "foveated" else tiny_connector_model(kind, tokenizer, **kw)


def ragged(lengths_t, lengths_l, seed=0, vocab=64):
    b, t, n = len(lengths_t), max(lengths_t), max(lengths_l)
    g = torch.Generator().manual_seed(seed)
    fr = frames(b, t, seed)
    fm = torch.arange(t)[None] < torch.tensor(lengths_t)[:, None]
    fr[~fm] = 7.0  # junk in padded frames must not matter
    ids = torch.randint(3, vocab, (b, n), generator=g)
    am = (torch.arange(n)[None] < torch.tensor(lengths_l)[:, None]).long()
    return fr, fm, ids, am


@pytest.mark.parametrize("kind", CONNECTOR_KINDS)
def test_padded_batch_text_only_rows_and_several_frames_equal_each_sample_alone(kind):
    model = build(kind)
    ts, ls = [3, 1, 0], [4, 6, 2]
    fr, fm, ids, am = ragged(ts, ls)
    with torch.no_grad():
        logits = model(fr, fm, ids, am).logits
        for i, (t, n) in enumerate(zip(ts, ls, strict=True)):
            alone = model(fr[i : i + 1, :t], fm[i : i + 1, :t], ids[i : i + 1, :n], am[i : i + 1, :n]).logits
            assert (logits[i, :n] - alone[0]).abs().max() <= 1e-5, i
        # the frames are read: other pixels, other logits; none at all, exactly the LLM
        other = model(fr + 1.0, fm, ids, am).logits
        assert (other[0, :4] - logits[0, :4]).abs().max() > 1e-4
        text_only = model(fr[2:, :0], fm[2:, :0], ids[2:, :2], am[2:, :2]).logits
        plain = model.llm(input_ids=ids[2:, :2], attention_mask=am[2:, :2]).logits
        assert (text_only - plain).abs().max() <= 1e-5


def test_tokens_per_frame_of_each_connector():
    assert tiny_connector_model("cls_gate").tokens_per_frame == 1  # exactly one token per frame
    assert tiny_connector_model("mlp").tokens_per_frame == (IMAGE // 4) ** 2  # every patch
    assert tiny_connector_model("pixel_shuffle").tokens_per_frame == (IMAGE // 4 // 2) ** 2
    tlqf = tiny_connector_model("tokenlearner_qformer")  # TokenLearner-QFormer on a DINOv2 tower
    assert tlqf.tokens_per_frame == 3 and tlqf.tower.family == "dinov2"
    for kind in CONNECTOR_KINDS:
        model = build(kind)
        fr, fm, ids, am = ragged([3, 2], [4, 4])
        with torch.no_grad():
            tokens, _ = model.visual_tokens(model.prepare(fr, fm))
        assert tokens.shape == (2, 3 * model.tokens_per_frame, 32), kind


@pytest.mark.parametrize("family", ["dinov2", "clip", "siglip", "vit"])
def test_every_tower_family_feeds_a_connector(family):
    model = tiny_connector_model("tokenlearner_qformer", family=family)
    fr, fm, ids, am = ragged([2, 1], [3, 5])
    with torch.no_grad():
        out = model(fr, fm, ids, am, labels=ids.masked_fill(am == 0, -100))
    assert torch.isfinite(out.loss) and model.frames.mean == model.tower.mean


def test_pixel_shuffle_equals_idefics3s_connector():
    """The zoo's pixel_shuffle on a tower's patches is Idefics3's connector on the same weights."""
    from transformers import Idefics3Config

    model = tiny_connector_model("pixel_shuffle")
    config = Idefics3Config(vision_config={"hidden_size": 32}, text_config={"hidden_size": 32}, scale_factor=2)
    theirs = Idefics3Connector(config)
    theirs.modality_projection.proj.weight.data.copy_(model.connector.proj.weight)
    patches, pooled = model.tower(frames(3, 1)[:, 0])
    assert (model.connector(patches, pooled) - theirs(patches)).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", [*CONNECTOR_KINDS, "lora"])
def test_save_load_reproduces_logits_exactly(kind, tmp_path):
    model = tiny_connector_model("mlp", lora=LoraConfig(r=2)) if kind == "lora" else build(kind)
    if kind == "lora":  # adapters start at B = 0: give them weights, so that losing them would show
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "m")
    loaded = registry.load(tmp_path / "m")
    assert type(loaded) is TowerVLM and loaded.kind == model.kind and loaded.config == model.config
    assert (tmp_path / "m" / saved.ADAPTER).is_file() == (kind == "lora")
    fr, fm, ids, am = ragged([3, 1], [4, 2])
    with torch.no_grad():
        assert torch.equal(model(fr, fm, ids, am).logits, loaded(fr, fm, ids, am).logits)


def test_lora_trains_only_its_adapters_and_merges_to_the_same_logits(tmp_path):
    model = tiny_connector_model("mlp", lora=LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj",
                                                                                "o_proj"])).train()  # fmt: skip
    groups = {model.group_of(n) for n, _ in model.named_parameters()}
    assert groups == {"vision", "connector", "llm", "frozen"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    from config import OptimConfig
    from training.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig(lr_connector=1e-2, lr_vision=0.0, lr_llm=1e-2, weight_decay=0.1))
    fr, fm, ids, am = ragged([2, 2], [5, 5])
    for _ in range(2):  # B starts at 0: the first step moves B only, the second A too
        model(fr, fm, ids, am, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        expected = "lora_" in name or model.group_of(name) == "connector"
        assert changed == expected, name  # every base LLM weight (and the frozen tower) bit-identical
    model.eval()
    fr, fm, ids, am = ragged([3, 1], [4, 2])
    with torch.no_grad():
        adapted = model(fr, fm, ids, am).logits
        merged = model.merge_lora()
        assert (merged(fr, fm, ids, am).logits - adapted).abs().max() <= 1e-5
    assert merged.config.lora is None and not any("lora_" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / saved.ADAPTER).exists()
    with torch.no_grad():
        assert torch.equal(registry.load(tmp_path / "merged")(fr, fm, ids, am).logits, merged(fr, fm, ids, am).logits)


@pytest.mark.parametrize("kind", [k for k in ModelConfig.kinds if k != "foveated"])
def test_a_key_the_kind_does_not_read_is_refused(kind):
    with pytest.raises(ConfigError, match=rf"unknown config key 'model.glimpses' \(model.kind {kind}\)"):
        from_dict(Config, {"model": {"kind": kind, "glimpses": 2}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model.scale'"):
        from_dict(Config, {"model": {"kind": "foveated", "scale": 2}})
    with pytest.raises(ConfigError, match=r"'model.kind' must be one of"):
        from_dict(Config, {"model": {"kind": "pixelshuffle"}})


def test_train_py_refuses_an_unread_key_before_any_work(tmp_path):
    cmd = [sys.executable, "train.py", "--config", str(REPO / "configs" / "toy.yaml"), "--set", "model.kind=mlp",
           "--set", "model.dino=packaged", "--set", f"train.out_dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "model.dino" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- the whole path: train.py -> a saved model -> benchmark.py and chat.py, for every kind --------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.generate(tmp_path_factory.mktemp("toy"), seed=0, train=24, eval=4, size=IMAGE, frames=2)


def log_losses(out: Path) -> list[float]:
    with (out / "log.csv").open(newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_saves_benchmarks_and_chats(kind, world, tokenizer, tmp_path, capsys):
    start = tmp_path / "start"
    build(kind, tokenizer, frames_at="user_turn").save_pretrained(start)
    cfg = from_dict(Config, {
        "model": {"kind": kind},
        "data": {"train": str(world / "qa" / "*.tar"), "stage": 2, "batch_size": 4, "max_frames": 2,
                 "frame_size": IMAGE, "num_workers": 0, "shuffle_buffer": 0},
        "optim": {"lr_connector": 1e-2, "lr_vision": 0.0, "lr_llm": 3e-3, "schedule": "constant", "warmup": 0.0},
        "train": {"init_from": str(start), "max_steps": 12, "save_every": 12, "out_dir": str(tmp_path / "run")},
    })  # fmt: skip
    final = train.train(cfg)
    losses = log_losses(tmp_path / "run")
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    loaded = registry.load(final)
    assert loaded.kind == kind and loaded.frames.size == IMAGE and loaded.frames.max_frames == 2
    for protocol in ("likelihood", "generate"):
        args = ["--model", str(final), "--bench", "toy", "--data-root", str(world / "eval"), "--protocol", protocol,
                "--out", str(tmp_path / "eval")]  # fmt: skip
        summary = benchmark.main(args)
        reads = list(loaded.reads)
        assert summary["questions"] == 4 and summary["reads"] == reads and summary["protocol"] == protocol
    (tmp_path / "red.jpg").write_bytes(jpeg((200, 30, 30), (24, 20)))
    chat.main(["--model", str(final), "--media", str(tmp_path / "red.jpg"), "What colour is the ball?"])
    assert capsys.readouterr().out.strip()
    after = load_file(str(final / saved.WEIGHTS))
    before = load_file(str(start / saved.WEIGHTS))
    vision = [k for k in before if k.startswith(loaded.vision_prefixes)]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # lr 0: frozen bit for bit


def test_bf16_copies_of_the_weights_follow_a_lora_merge():
    """peft merges an adapter into its base weight through `.data`, which moves neither the tensor nor its version:
    the bf16 copies an evaluation keeps (ConstantCasts) must still be made again, or the merged model runs the
    base weights with its adapters gone."""
    from vlm.casts import ConstantCasts

    model = tiny_connector_model("mlp", lora=LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at 0: give the adapters weight, so that losing them shows
                p.normal_(0, 0.5)
    fr, fm, ids, am = ragged([2, 1], [4, 3])
    casts = ConstantCasts([model], enabled=True, constant="all")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        with casts:
            adapted = model(fr, fm, ids, am).logits.float()
        model.merge_lora()
        with casts:
            kept = model(fr, fm, ids, am).logits.float()
        with ConstantCasts([model], enabled=True, constant="all"):
            fresh = model(fr, fm, ids, am).logits.float()
    assert torch.equal(kept, fresh)  # the same bf16 weights as copies made after the merge
    assert (kept - adapted).abs().max() < 0.1 * adapted.abs().max()  # the adapters' effect kept, to bf16 rounding


def test_the_connector_toy_configs_share_the_toy_recipe():
    """compare.py compares connectors only: each configs/toy_<kind>.yaml differs from configs/toy.yaml in its
    model section alone and in the foveated model's query rate (a recipe change made in one must be made in all)."""
    import yaml

    import compare

    base = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())
    base["optim"].pop("lr_query")
    for kind in compare.KINDS[1:]:
        cfg = yaml.safe_load(compare.kind_config(kind).read_text())
        assert cfg["model"]["kind"] == kind
        assert {k: v for k, v in cfg.items() if k != "model"} == {k: v for k, v in base.items() if k != "model"}


def test_compare_trains_and_tabulates_every_kind_it_is_given(tmp_path, tokenizer, monkeypatch):
    """compare.py end to end on the packaged backbones, one step per kind on a small toy world."""
    import json

    import compare

    toy.generate(tmp_path / "toy", train=8, eval=2, size=112, frames=4)
    overrides = [f"data.train={tmp_path / 'toy' / 'qa' / '*.tar'}", f"data.val={tmp_path / 'toy' / 'val' / '*.tar'}",
                 "train.max_steps=1", "data.batch_size=2", "data.num_workers=0"]  # fmt: skip
    args = ["--rows", "cls_gate,foveated", "--out", str(tmp_path / "cmp"), "--eval", str(tmp_path / "toy" / "eval")]
    scored, evaluate = [], benchmark.evaluate

    def spy(answerer, bench, protocol, modes, out, batch_size=1):
        scored.append((answerer.bf16, batch_size))
        return evaluate(answerer, bench, protocol, modes, out, batch_size)

    monkeypatch.setattr(benchmark, "evaluate", spy)
    result = compare.main(args + [x for o in overrides + ["train.bf16=false"] for x in ("--set", o)])
    assert scored == [(False, compare.EVAL_BATCH)] * 2  # batched, in the precision trained
    assert all(r["precision"] == "fp32" for r in result["rows"])
    for setting in (True, False):  # the reader follows the run's precision, whatever this CPU has
        cfg = compare.run_config(compare.kind_config("cls_gate"), "cls_gate", tmp_path / "p", [f"train.bf16={setting}"])
        assert cfg.model.kind == "cls_gate"
        assert compare.answerer_for(tiny_connector_model("cls_gate", tokenizer), cfg).bf16 is setting
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["cls_gate"]["tokens_per_frame"] == 1 and list(rows["cls_gate"]["accuracy"]) == ["default"]
    assert list(rows["foveated"]["accuracy"]) == ["coarse_only", "coarse_fine", "autoregressive"]
    assert all(r["trainable_params"] > 0 and r["prefill_ms_8_frames"] > 0 for r in rows.values())
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert (
        saved["rows"] == result["rows"]
        and f"| cls_gate | {compare.WHERE[rows['cls_gate']['frames_at']]} | 1 |" in table
    )
    assert rows["cls_gate"]["look_share"] is None
