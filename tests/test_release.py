"""The published fVLM checkpoints (135M and 1.7B) load into our FoveatedVLM (release.py), on synthetic checkpoints.

A synthetic checkpoint is written in the layout the public fVLM code saves (its module tree and so its tensor names,
with transformers 4.x Dinov2 names; the hub's `model.safetensors`, or a training run's `step_*.pt` / `best.pt` dict
with its run config), around tiny random backbones. Verified here: it loads with no missing or unexpected tensor,
every tensor lands where it belongs (compared by value), every mode runs and gives the logits of a re-implementation
of the public code's forward (written from its source: patches through the Dinov2 layers' own forward, the query
through each layer on the cached keys/values, the coarse pass over the visual tokens only, the autoregressive loop),
a removed or renamed tensor stops loading with its name, a pickle holding anything but tensors is refused unrun, a
hub id resolves through the hub cache, our own directories load as before, and a full-size state dict without
configs, around the packaged DINOv2-small and SmolLM2-135M-Instruct, is rebuilt with their shapes and computes the
public code's logits. The 1.7B's layout (the same names; SmolLM2-1.7B's shapes: a wider LLM without grouped KV
heads, another rope theta) is recognised by its shapes beside the 135M's, on tiny backbones of each structure, and
loads tensor for tensor with the logits of a model built directly from the same weights; a checkpoint of neither size
is refused with its shapes named, and the configs/stage*_1.7B.yaml recipes hold the published figures. Not
verified: the real hub repos' files (no network here: their file lists and any config they ship are as read from
the public code and the model cards), and the published numbers.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

import registry
import release
from cli import UserError
from config import FoveatedConfig, load_config
from inputs.tokenization import prompt_ids
from model import MODES, FoveatedVLM
from tests.tiny import IMAGE, frames, randomize, tiny_dino, tiny_llm
from vlm import weights

REPO = Path(__file__).resolve().parent.parent

QUERY_DIM = 16
TO_4X = {new: old for old, new in weights._DINO_RENAMES.items()}  # our Dinov2 names -> the public code's


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network; the LLM's tokenizer then resolves to the packaged SmolLM2 one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class Published(nn.Module):
    """The public fVLM code's FoveatedVLM module tree (hence its state dict's names) around tiny backbones."""

    def __init__(self, vocab: int = 64, seed: int = 0, dino: nn.Module | None = None, llm: nn.Module | None = None):
        super().__init__()
        backbones = dino is not None
        dino, llm = dino or tiny_dino(seed), llm or tiny_llm(seed + 1, vocab)
        d, d_llm = dino.config.hidden_size, llm.config.hidden_size
        query_dim = d if backbones else QUERY_DIM  # the published query is DINO-wide
        self.encoder = nn.Module()
        self.encoder.dino = dino
        self.encoder.query_input_proj = nn.Linear(query_dim, d, bias=False)
        self.encoder.output_proj = nn.Linear(d, d)
        self.llm = llm
        self.dino_to_llm = nn.Linear(d, d_llm)
        self.llm_to_query = nn.Linear(d_llm, query_dim)
        self.q_static = nn.Parameter(torch.randn(1, query_dim))
        self.q_init = nn.Parameter(torch.randn(1, query_dim))
        if not backbones:
            randomize(self, seed)
        self.eval()


def published_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names transformers 4.x gave the Dinov2 attention, as the published state dict has them."""
    out = {}
    for name, t in state.items():
        for new, old in TO_4X.items():
            name = name.replace(new, old) if name.startswith("encoder.dino.") else name
        out[name] = t
    return out


def published_state(pub: Published) -> dict[str, torch.Tensor]:
    return published_names(pub.state_dict())


def write_hub_copy(pub: Published, folder: Path, fmt: str = "safetensors", title: str = "fVLM-135M") -> Path:
    """A local copy of the hub repo: the weights as model.safetensors (tied embeddings stored once, as
    safetensors must), the model card and the code beside them, no config and no tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt.startswith("safetensors"):
        state = published_state(pub)
        # safetensors refuses shared tensors: the tied embedding matrix is kept once, under either name
        state.pop("llm.model.embed_tokens.weight" if fmt.endswith("head") else "llm.lm_head.weight")
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    else:  # the model card loads this file with torch.load: a torch pickle under the same name loads too
        torch.save(published_state(pub), folder / "model.safetensors")
    (folder / "README.md").write_text(f"# {title}\n")
    (folder / "model_code").mkdir(exist_ok=True)
    (folder / "model_code" / "__init__.py").write_text('"""Foveated VLM model components."""\n')
    return folder


@pytest.fixture
def known_tiny(monkeypatch):
    """The known backbone shapes replaced by the tiny ones, as if the tiny backbones were the published ones."""
    pub = Published(vocab=64)
    monkeypatch.setitem(release.KNOWN_BACKBONES, "dinov2-small", pub.encoder.dino.config.to_dict())
    monkeypatch.setitem(release.KNOWN_BACKBONES, "SmolLM2-135M-Instruct", pub.llm.config.to_dict())
    return pub


# ---- a re-implementation of the public code's forward -------------------------------------------------------


def ref_encode(pub: Published, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the keys and values of norm1(patches), the patches running the layer's own forward."""
    dino, kv = pub.encoder.dino, []
    h = dino.embeddings(pixels)
    for layer in dino.encoder.layer:
        x = layer.norm1(h)
        kv.append((layer.attention.k_proj(x), layer.attention.v_proj(x)))
        h = layer(h)
    return kv


def ref_read(pub: Published, queries: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """queries (N, query_dim), one per frame -> the frames' tokens (N, D)."""
    dino = pub.encoder.dino
    heads = dino.config.num_attention_heads
    n, d = queries.shape[0], dino.config.hidden_size
    hd = d // heads
    q = pub.encoder.query_input_proj(queries)[:, None]  # (N, 1, D)
    for layer, (k, v) in zip(dino.encoder.layer, kv, strict=True):
        qh = layer.attention.q_proj(layer.norm1(q)).view(n, 1, heads, hd).transpose(1, 2)
        kh, vh = (t.view(n, -1, heads, hd).transpose(1, 2) for t in (k, v))
        w = F.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        q = q + layer.layer_scale1(layer.attention.o_proj((w @ vh).transpose(1, 2).reshape(n, 1, d)))
        q = q + layer.layer_scale2(layer.mlp(layer.norm2(q)))
    return pub.encoder.output_proj(dino.layernorm(q)[:, 0])


def ref_logits(pub: Published, clip: torch.Tensor, ids: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    """clip (T, 3, H, W), ids (1, L) -> the text positions' logits (1, L, V), as the public code computes them."""
    t = clip.shape[0]
    kv = ref_encode(pub, clip)
    decoder = pub.llm.model

    def visual(z: torch.Tensor) -> torch.Tensor:
        return pub.dino_to_llm(z) * scale

    if mode == "coarse_only":
        z = visual(ref_read(pub, pub.q_static.expand(t, -1), kv))
    elif mode == "coarse_fine":
        coarse = visual(ref_read(pub, pub.q_static.expand(t, -1), kv))
        h = decoder(inputs_embeds=coarse[None]).last_hidden_state[0]  # the visual tokens only
        queries = torch.cat([pub.q_init, pub.llm_to_query(h[:-1])])
        z = visual(ref_read(pub, queries, kv))
    else:  # autoregressive: frame i read with the query from the fine tokens of frames < i
        tokens, query = [], pub.q_init
        for i in range(t):
            tokens.append(visual(ref_read(pub, query, [(k[i : i + 1], v[i : i + 1]) for k, v in kv])))
            h = decoder(inputs_embeds=torch.cat(tokens)[None]).last_hidden_state[0, -1:]
            query = pub.llm_to_query(h)
        z = torch.cat(tokens)
    text = pub.llm.get_input_embeddings()(ids)
    h = decoder(inputs_embeds=torch.cat([z[None], text], dim=1)).last_hidden_state
    return pub.llm.lm_head(h[:, t:])


# ---- the hub layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-head", "torch"])
def test_hub_copy_loads_every_tensor_in_place(known_tiny, tmp_path, fmt):
    pub = known_tiny
    folder = write_hub_copy(pub, tmp_path / "fVLM-135M", fmt)
    assert release.matches(folder)
    model = FoveatedVLM.from_pretrained(folder)  # strict: any missing or left-over tensor raises
    assert isinstance(model, FoveatedVLM) and not model.training
    ours, theirs = model.state_dict(), published_state(pub)
    pairs = {
        "encoder.query_in.weight": "encoder.query_input_proj.weight",
        "encoder.query_out.bias": "encoder.output_proj.bias",
        "encoder.dino.encoder.layer.1.attention.q_proj.weight": "encoder.dino.encoder.layer.1.attention.attention.query"
        ".weight",
        "encoder.dino.encoder.layer.0.attention.v_proj.bias": "encoder.dino.encoder.layer.0.attention.attention.value"
        ".bias",
        "encoder.dino.encoder.layer.0.attention.o_proj.weight": "encoder.dino.encoder.layer.0.attention.output.dense"
        ".weight",
        "encoder.dino.embeddings.mask_token": "encoder.dino.embeddings.mask_token",
        "dino_to_llm.weight": "dino_to_llm.weight",
        "llm_to_query.bias": "llm_to_query.bias",
        "q_static": "q_static",
        "q_init": "q_init",
        "llm.model.layers.1.self_attn.k_proj.weight": "llm.model.layers.1.self_attn.k_proj.weight",
        "llm.lm_head.weight": "llm.model.embed_tokens.weight",  # tied
    }  # fmt: skip
    for mine, published in pairs.items():
        assert torch.equal(ours[mine], theirs[published]), mine
    assert len(ours) == len(theirs)  # one tensor of ours per published tensor
    cfg = model.config
    assert (cfg.query_dim, cfg.visual_scale, cfg.deep_query, cfg.glimpses, cfg.frames_at) == (
        QUERY_DIM, 0.14, True, 1, "start")  # fmt: skip
    assert (cfg.dino, cfg.llm) == (weights.DINO_HUB_ID, weights.LLM_HUB_ID)
    f = model.frames
    assert (f.size, f.max_frames, f.image_frames, f.fps, f.letterbox) == (224, 64, 8, 1.0, False)
    assert f.mean == (0.485, 0.456, 0.406) and f.std == (0.229, 0.224, 0.225)
    # no tokenizer in the repo: SmolLM2's (offline the packaged one)
    assert "<|im_start|>" in model.tokenizer.chat_template
    assert isinstance(registry.load(folder), FoveatedVLM)  # benchmark.py and chat.py load through registry.load


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_computes_the_published_forward(known_tiny, tmp_path, tokenizer, mode):
    pub = known_tiny
    model = FoveatedVLM.from_pretrained(write_hub_copy(pub, tmp_path / "hub"))
    clip = frames(1, 3)  # (1, T, 3, H, W)
    ids = torch.tensor([prompt_ids(tokenizer, "What?")]) % 64
    with torch.no_grad():
        out = model(clip, torch.ones(1, 3, dtype=torch.bool), ids, torch.ones_like(ids), mode=mode)
        ref = ref_logits(pub, clip[0], ids, mode, 0.14)
    assert out.logits.shape == ref.shape and torch.isfinite(out.logits).all()
    assert (out.logits - ref).abs().max() <= 1e-5


def test_hub_id_resolves_to_the_hub_files(known_tiny, tmp_path, monkeypatch):
    folder = write_hub_copy(known_tiny, tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id: str, **kwargs) -> str:
        asked.append((repo_id, kwargs.get("local_files_only")))
        if repo_id != release.HUB_ID:
            raise huggingface_hub.errors.LocalEntryNotFoundError(repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = FoveatedVLM.from_pretrained("sanps/fVLM-135M")
    assert isinstance(model, FoveatedVLM) and asked[0] == ("sanps/fVLM-135M", True)
    assert isinstance(registry.load("sanps/fVLM-135M"), FoveatedVLM)
    with pytest.raises(FileNotFoundError, match="not a saved model"):  # offline, not cached: not found, as before
        registry.load("someone/missing")


# ---- the training checkpoints -----------------------------------------------------------------------------


def run_config(dino_dir: Path, llm_dir: Path) -> dict:
    """The run YAML the public code stores in its checkpoints (the keys it reads)."""
    return {
        "stage": 3,
        "model": {"llm": str(llm_dir), "dino": str(dino_dir), "deep_query": True, "query_dim": QUERY_DIM,
                  "visual_scale": 0.5, "lambda_coarse": 0.0, "gradient_checkpointing": False, "init_from": None},
        "data": {"train_shards": "/workspace/data/rlaif_v/*.tar", "max_frames": 4, "frame_size": IMAGE,
                 "num_workers": 2, "prefetch_factor": 2, "replicate_image_frames": 8},
        "training": {"batch_size": 4, "grad_accum": 8, "lr_connector": 1e-6, "dtype": "bfloat16", "compile": True},
        "loss": {"type": "dpo", "beta": 0.1},
        "checkpoint": {"save_dir": "/workspace/checkpoints/final/stage3", "keep_last": 2},
    }  # fmt: skip


def write_training_run(pub: Published, folder: Path, tokenizer) -> Path:
    """A training run's save_dir: step_0002000.pt (a compiled run's names) and best.pt pointing at it, with the
    backbones the run names saved where it names them (the LLM's directory with its tokenizer)."""
    dino_dir, llm_dir = folder / "models" / "dinov2-small", folder / "models" / "SmolLM2-135M-Instruct"
    pub.encoder.dino.save_pretrained(dino_dir)
    pub.llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    optimizer = torch.optim.AdamW([{"params": list(pub.parameters()), "lr": 1e-6, "name": "connector"}])
    sum(p.sum() for p in pub.parameters()).backward()  # one step, so the optimizer has state to save
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    compiled = {}
    for name, t in published_state(pub).items():  # torch.compile wraps encoder, llm and the projections
        head, _, rest = name.partition(".")
        compiled[f"{head}._orig_mod.{rest}" if head in ("encoder", "llm", "dino_to_llm", "llm_to_query") else name] = t
    run = folder / "checkpoints" / "final" / "stage3"
    run.mkdir(parents=True)
    torch.save(
        {
            "model_state_dict": compiled,
            "optimizer_state_dict": optimizer.state_dict(),
            "scaler_state_dict": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "step": 2000,
            "data_position": 64000,
            "metric_value": 0.41,
            "timestamp": "2026-02-16T12:00:00",
            "config": run_config(dino_dir, llm_dir),
        },
        run / "step_0002000.pt",
    )
    (run / "best.pt").symlink_to(run / "step_0002000.pt")
    return run


def test_training_checkpoint_loads_with_its_run_config(tmp_path, tokenizer):
    pub = Published(vocab=len(tokenizer))
    run = write_training_run(pub, tmp_path, tokenizer)
    assert release.weight_file(run) == run / "best.pt"
    model = registry.load(run)
    assert (model.config.visual_scale, model.config.query_dim) == (0.5, QUERY_DIM)
    assert (model.frames.size, model.frames.max_frames, model.frames.image_frames) == (IMAGE, 4, 8)
    assert len(model.tokenizer) == len(tokenizer)
    assert torch.equal(model.encoder.query_out.weight, pub.encoder.output_proj.weight)
    assert torch.equal(model.encoder.dino.encoder.layer[1].attention.k_proj.weight,
                       pub.encoder.dino.encoder.layer[1].attention.k_proj.weight)  # fmt: skip
    clip = frames(1, 2)
    ids = torch.tensor([prompt_ids(tokenizer, "Describe the clip.")])
    with torch.no_grad():
        for mode in MODES:
            out = model(clip, torch.ones(1, 2, dtype=torch.bool), ids, torch.ones_like(ids), mode=mode)
            assert (out.logits - ref_logits(pub, clip[0], ids, mode, 0.5)).abs().max() <= 1e-5, mode
    # a single weight file loads too
    assert isinstance(FoveatedVLM.from_saved(release.read(run / "step_0002000.pt")), FoveatedVLM)


def test_our_format_after_conversion_and_untouched(known_tiny, tmp_path, monkeypatch):
    model = FoveatedVLM.from_pretrained(write_hub_copy(known_tiny, tmp_path / "hub"))
    model.save_pretrained(tmp_path / "ours")
    assert not release.matches(tmp_path / "ours")

    def never(path):
        raise AssertionError("our own directory was sniffed")

    monkeypatch.setattr(release, "matches", never)
    again = FoveatedVLM.from_pretrained(tmp_path / "ours")
    clip, ids = frames(1, 2), torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        for mode in MODES:
            a = model(clip, torch.ones(1, 2, dtype=torch.bool), ids, torch.ones_like(ids), mode=mode).logits
            b = again(clip, torch.ones(1, 2, dtype=torch.bool), ids, torch.ones_like(ids), mode=mode).logits
            assert torch.equal(a, b)
    assert again.frames == model.frames


# ---- what must not load -----------------------------------------------------------------------------------


def test_a_removed_tensor_is_named(known_tiny, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    state = published_state(known_tiny)
    del state["llm_to_query.bias"], state["llm.lm_head.weight"]
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"does not have: \['llm_to_query\.bias'\]"):
        FoveatedVLM.from_pretrained(folder)


def test_a_renamed_tensor_is_named(known_tiny, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    state = published_state(known_tiny)
    state["encoder.dino.layernorm.gamma"] = state.pop("encoder.dino.layernorm.weight")
    state["surprise.weight"] = torch.zeros(2)
    del state["llm.lm_head.weight"]
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(UserError) as e:
        FoveatedVLM.from_saved(release.read(folder))
    message = str(e.value)
    assert "no counterpart in our model: ['surprise.weight']" in message
    assert "encoder.dino.layernorm.gamma (as encoder.dino.layernorm.gamma)" in message
    assert "does not have: ['encoder.dino.layernorm.weight']" in message


def test_shapes_that_differ_are_named(known_tiny, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    state = published_state(known_tiny)
    state["dino_to_llm.bias"] = torch.zeros(7)
    del state["llm.lm_head.weight"]
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"dino_to_llm\.bias \(7,\) vs ours \(32,\)"):
        FoveatedVLM.from_saved(release.read(folder))


class Payload:
    """An object whose unpickling would run code: here, create a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_of_anything_but_tensors_is_refused_unrun(known_tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "ran"
    torch.save({"model_state_dict": published_state(known_tiny), "config": {}, "extra": Payload(marker)},
               run / "best.pt")  # fmt: skip
    assert release.matches(run)  # recognised by its names, without unpickling it
    with pytest.raises(UserError, match=r"refused.*weights_only=True"):
        FoveatedVLM.from_saved(release.read(run))
    with pytest.raises(UserError, match="refused"):
        registry.load(run)
    assert not marker.exists()


def test_not_the_published_model(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    assert not release.matches(folder)
    with pytest.raises(FileNotFoundError, match="not a saved model"):  # our own error, as before
        registry.load(folder)
    with pytest.raises(UserError, match="not the public fVLM code's FoveatedVLM"):
        FoveatedVLM.from_saved(release.read(folder))


# ---- the published backbones ------------------------------------------------------------------------------


def test_full_size_without_configs_reads_as_the_published_backbones(tmp_path, tokenizer):
    """A full-size state dict without configs (the hub's file) is rebuilt with dinov2-small's and
    SmolLM2-135M-Instruct's shapes and settings: around the packaged backbones, with the masked-pretraining token
    facebook/dinov2-small carries and the weights in bf16, it loads strictly and computes the public code's logits
    with the backbones' own configs."""
    from transformers import Dinov2Config, Dinov2Model

    try:
        dino, llm = weights.load_dino(weights.PACKAGED), weights.load_llm(weights.PACKAGED)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    hub_dino = Dinov2Model(Dinov2Config.from_dict({**dino.config.to_dict(), "use_mask_token": True}))
    hub_dino.load_state_dict(dino.state_dict(), strict=False)  # all but the mask token, left random
    pub = Published(dino=hub_dino, llm=llm)
    with torch.no_grad():
        for p in pub.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the values the bf16 file holds
    folder = tmp_path / "fVLM-135M"
    folder.mkdir()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in published_state(pub).items()}
    del state["llm.lm_head.weight"]
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    model = FoveatedVLM.from_pretrained(folder)
    assert (model.config.query_dim, model.encoder.dino.config.hidden_size, model.llm.config.hidden_size) == (
        384, 384, 576)  # fmt: skip
    clip = torch.randn(1, 2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([prompt_ids(tokenizer, "What is happening?")])
    with torch.no_grad():
        for mode in MODES:
            out = model(clip, torch.ones(1, 2, dtype=torch.bool), ids, torch.ones_like(ids), mode=mode).logits
            ref = ref_logits(pub, clip[0], ids, mode, 0.14)
            assert (out - ref).abs().max() <= 1e-3 * ref.abs().max(), mode


# ---- the published 1.7B ------------------------------------------------------------------------------------


def tiny_llm_1_7b(seed: int = 2, vocab: int = 64) -> LlamaForCausalLM:
    """SmolLM2-1.7B-Instruct's structure in miniature, beside tiny_llm's 135M-like one: wider (48, not 32), a KV head
    per query head (no grouping), rope theta 130000, a 4x MLP, one more layer, embeddings tied."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=192,
        max_position_embeddings=256,
        rope_parameters={"rope_theta": 130000.0, "rope_type": "default"},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return randomize(LlamaForCausalLM(cfg), seed).eval()


@pytest.fixture
def known_sizes(monkeypatch):
    """Both published sizes' known backbones replaced by tiny ones of their structure; the 1.7B-like checkpoint."""
    pub = Published(llm=tiny_llm_1_7b())  # randomized, with the tiny DINO and the 16-wide query
    monkeypatch.setitem(release.KNOWN_BACKBONES, "dinov2-small", pub.encoder.dino.config.to_dict())
    monkeypatch.setitem(release.KNOWN_BACKBONES, "SmolLM2-135M-Instruct", tiny_llm().config.to_dict())
    monkeypatch.setitem(release.KNOWN_BACKBONES, "SmolLM2-1.7B-Instruct", pub.llm.config.to_dict())
    return pub


def built_directly(pub: Published, tokenizer, frames_spec) -> FoveatedVLM:
    """Our FoveatedVLM around (copies of) the published backbones, its own parts copied by hand: no release.py."""
    config = FoveatedConfig(dino="tiny", llm="tiny", query_dim=QUERY_DIM, visual_scale=0.14)
    model = FoveatedVLM(config, copy.deepcopy(pub.encoder.dino), copy.deepcopy(pub.llm), tokenizer, frames_spec)
    with torch.no_grad():
        for ours, theirs in ((model.encoder.query_in, pub.encoder.query_input_proj),
                             (model.encoder.query_out, pub.encoder.output_proj),
                             (model.dino_to_llm, pub.dino_to_llm), (model.llm_to_query, pub.llm_to_query)):  # fmt: skip
            for name, p in ours.named_parameters():
                p.copy_(getattr(theirs, name))
        model.q_static.copy_(pub.q_static)
        model.q_init.copy_(pub.q_init)
    return model.eval()


def test_1_7b_hub_copy_loads_tensor_for_tensor_with_the_logits_of_the_same_weights(known_sizes, tmp_path, tokenizer):
    pub = known_sizes
    folder = write_hub_copy(pub, tmp_path / "fVLM-1.7B", title="fVLM-1.7B")
    assert release.matches(folder)
    model = FoveatedVLM.from_pretrained(folder)  # no config in the folder: the shapes say which size it is
    assert (model.config.llm, model.config.dino) == ("HuggingFaceTB/SmolLM2-1.7B-Instruct", weights.DINO_HUB_ID)
    llm = model.llm.config
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads) == (48, 3, 4, 4)
    assert llm.rope_parameters["rope_theta"] == 130000.0
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight  # tied, as SmolLM2-1.7B's are
    assert tuple(model.dino_to_llm.weight.shape) == (48, 32) and tuple(model.llm_to_query.weight.shape) == (16, 48)
    ours, theirs = model.state_dict(), published_state(pub)
    assert len(ours) == len(theirs)
    for name, tensor in theirs.items():  # every published tensor, by value, where the renaming puts it
        assert torch.equal(ours[release.our_name(name)], tensor), name
    assert "<|im_start|>" in model.tokenizer.chat_template  # offline: SmolLM2's shared tokenizer, the packaged one
    direct = built_directly(pub, model.tokenizer, model.frames)
    clip = frames(1, 3)
    ids = torch.tensor([prompt_ids(tokenizer, "What?")]) % 64
    mask, text_mask = torch.ones(1, 3, dtype=torch.bool), torch.ones_like(ids)
    with torch.no_grad():
        for mode in MODES:
            out = model(clip, mask, ids, text_mask, mode=mode).logits
            assert torch.equal(out, direct(clip, mask, ids, text_mask, mode=mode).logits), mode
            assert (out - ref_logits(pub, clip[0], ids, mode, 0.14)).abs().max() <= 1e-5, mode


def test_1_7b_hub_id_and_training_checkpoint(known_sizes, tmp_path, monkeypatch):
    """`sanps/fVLM-1.7B` resolves through the hub cache like the 135M; a training checkpoint whose run config names
    the 1.7B backbones by the public code's paths (absent here) reads with their known configs."""
    pub = known_sizes
    folder = write_hub_copy(pub, tmp_path / "snapshot", title="fVLM-1.7B")

    def snapshot_download(repo_id: str, **kwargs) -> str:
        if repo_id != "sanps/fVLM-1.7B":
            raise huggingface_hub.errors.LocalEntryNotFoundError(repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = FoveatedVLM.from_pretrained("sanps/fVLM-1.7B")
    assert model.llm.config.hidden_size == 48 and isinstance(registry.load("sanps/fVLM-1.7B"), FoveatedVLM)
    run = tmp_path / "stage3"
    run.mkdir()
    config = {"model": {"llm": "/workspace/models/SmolLM2-1.7B-Instruct", "dino": "/workspace/models/dinov2-small",
                        "deep_query": True, "query_dim": QUERY_DIM, "visual_scale": 0.14, "lambda_coarse": 0.0},
              "data": {"max_frames": 64, "frame_size": 224, "replicate_image_frames": 8}}  # fmt: skip
    torch.save({"model_state_dict": published_state(pub), "step": 2594, "config": config}, run / "step_0002594.pt")
    model = registry.load(run)
    assert model.config.llm == "HuggingFaceTB/SmolLM2-1.7B-Instruct" and model.llm.config.num_key_value_heads == 4
    assert torch.equal(model.llm_to_query.weight, pub.llm_to_query.weight)


def test_a_checkpoint_of_neither_size_is_refused_with_its_shapes(known_sizes, tmp_path, tokenizer):
    """The public code's tensors around an LLM of a third size (its scaling runs had a 360M): without a config
    naming the LLM, one clear error; with one beside the weights, it loads."""
    other = LlamaConfig(vocab_size=64, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=80, tie_word_embeddings=True)  # fmt: skip
    pub = Published(llm=LlamaForCausalLM(other))
    folder = write_hub_copy(pub, tmp_path / "fVLM-360M", title="fVLM-360M")
    assert release.matches(folder)  # the public code's layout, of an unknown size
    with pytest.raises(UserError) as e:
        FoveatedVLM.from_pretrained(folder)
    message = str(e.value)
    assert "its LLM is in neither published layout (sanps/fVLM-135M, sanps/fVLM-1.7B)" in message
    assert "against SmolLM2-135M-Instruct, llm.model.embed_tokens.weight (64, 40) where it has (64, 32)" in message
    assert "against SmolLM2-1.7B-Instruct, 2 layers where it has 3" in message
    assert "config.json beside it naming its `llm`" in message and "\n" not in message
    with pytest.raises(UserError, match="neither published layout"):
        registry.load(folder)
    pub.llm.save_pretrained(tmp_path / "SmolLM2-360M-like")
    tokenizer.save_pretrained(tmp_path / "SmolLM2-360M-like")
    (folder / "config.json").write_text(f'{{"llm": "{tmp_path / "SmolLM2-360M-like"}"}}')
    model = FoveatedVLM.from_pretrained(folder)
    assert model.llm.config.hidden_size == 40 and torch.equal(model.dino_to_llm.bias, pub.dino_to_llm.bias)


def test_the_real_sizes_tell_themselves_apart():
    """At full size (meta tensors: shapes without memory), each published layout picks its own backbones, and the
    known configs are those models: SmolLM2-135M's 134,515,008 and SmolLM2-1.7B's 1,711,376,384 parameters."""
    counts = {}
    for hub_id, (dino_name, llm_name) in release.RELEASES.items():
        with torch.device("meta"):
            dino = Dinov2Model(Dinov2Config.from_dict(release.KNOWN_BACKBONES[dino_name]))
            llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**release.KNOWN_BACKBONES[llm_name]))
            pub = Published(dino=dino, llm=llm)
        state = published_state(pub)
        assert release.by_shapes(Path(hub_id), state, "llm") == llm_name, hub_id
        assert release.by_shapes(Path(hub_id), state, "dino") == "dinov2-small"
        counts[llm_name] = sum(p.numel() for p in llm.parameters())
        assert tuple(state["dino_to_llm.weight"].shape) == (llm.config.hidden_size, 384)
    assert counts == {"SmolLM2-135M-Instruct": 134_515_008, "SmolLM2-1.7B-Instruct": 1_711_376_384}


def test_1_7b_configs_follow_the_published_recipe():
    """configs/stage{1,2,3}_1.7B.yaml: the public code's 1.7B runs (rates scaled ~0.28x from the 135M's, batch 32 /
    32 / 8 x 4, 256 frames per batch in stage 1, warmup 10 % in DPO), with gradient checkpointing on, compile off."""
    stages = [load_config(REPO / "configs" / f"stage{s}_1.7B.yaml") for s in (1, 2, 3)]
    for stage, cfg in enumerate(stages, 1):
        assert cfg.data.stage == stage and cfg.model.kind == "foveated"
        assert (cfg.model.llm, cfg.model.dino) == ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "facebook/dinov2-small")
        assert (cfg.model.query_dim, cfg.model.visual_scale, cfg.model.deep_query) == (384, 0.14, True)
        assert cfg.train.gradient_checkpointing and not cfg.train.compile and cfg.train.bf16 is True
        assert (cfg.data.max_frames, cfg.data.frame_size, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
            64, 224, 0.01, 1.0)  # fmt: skip
    s1, s2, s3 = stages
    o = s1.optim
    assert (o.schedule, o.lr_connector, o.lr_vision, o.lr_llm, o.target_lr, o.warmup) == (
        "converging", 3e-4, 3e-6, 3e-6, 1e-5, 0.03)  # fmt: skip
    assert (s1.data.batch_size, s1.data.frame_budget, s1.train.accumulate) == (32, 256, 1)
    assert [s.weight for s in s1.data.train] == [0.86, 0.14]
    o = s2.optim
    assert (o.schedule, o.lr_connector, o.lr_vision, o.lr_llm, o.warmup) == ("cosine", 1e-5, 1e-5, 1e-5, 0.03)
    assert (s2.data.batch_size, s2.train.accumulate, s2.data.replicate_image_frames) == (32, 1, 8)
    assert s2.train.init_from == "runs/stage1_1.7B/final"
    o = s3.optim
    assert (o.schedule, o.lr_connector, o.lr_vision, o.lr_llm, o.warmup) == ("cosine", 5e-7, 5e-7, 5e-7, 0.1)
    assert (s3.data.batch_size, s3.train.accumulate, s3.train.dpo_beta) == (8, 4, 0.1)
    assert s3.train.init_from == "runs/stage2_1.7B/final"
