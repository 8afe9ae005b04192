"""The published fVLM checkpoint loads into our FoveatedVLM (release.py), on synthetic checkpoints.

A synthetic checkpoint is written in the layout the public fVLM code saves (its module tree and so its tensor names,
with transformers 4.x Dinov2 names; the hub's `model.safetensors`, or a training run's `step_*.pt` / `best.pt` dict
with its run config), around tiny random backbones. Verified here: it loads with no missing or unexpected tensor,
every tensor lands where it belongs (compared by value), every mode runs and gives the logits of a re-implementation
of the public code's forward (written from its source: patches through the Dinov2 layers' own forward, the query
through each layer on the cached keys/values, the coarse pass over the visual tokens only, the autoregressive loop),
a removed or renamed tensor stops loading with its name, a pickle holding anything but tensors is refused unrun, a
hub id resolves through the hub cache, our own directories load as before, and a full-size state dict without
configs, around the packaged DINOv2-small and SmolLM2-135M-Instruct, is rebuilt with their shapes and computes the
public code's logits. Not verified: the real hub repo's files (no network here: its file list and any config it
ships are as read from the public code and its model card), and the published numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import registry
import release
from cli import UserError
from inputs.tokenization import prompt_ids
from model import MODES, FoveatedVLM
from tests.tiny import IMAGE, frames, randomize, tiny_dino, tiny_llm
from vlm import weights

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


def write_hub_copy(pub: Published, folder: Path, fmt: str = "safetensors") -> Path:
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
    (folder / "README.md").write_text("# fVLM-135M\n")
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
