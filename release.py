"""The state-dict adapter of the published fVLM checkpoints (hub `sanps/fVLM-135M` and `sanps/fVLM-1.7B`) and of the
public fVLM code's training checkpoints: they read into our foveated model (`FoveatedVLM.from_pretrained`,
`registry.load`), so that their published numbers can be reproduced with this project's harness. `matches` recognises
one, `read` converts it.

The public code's model is the same architecture under other names, so converting is renaming, checked strictly:
every published tensor must land on one of our parameters and every parameter must get one, or loading stops and
names them (a silently random connector would evaluate as if it were trained).

The layout the public fVLM code saves:
- the hub repo: `model.safetensors` (its FoveatedVLM's state dict; read by content, so a torch pickle under that
  name loads too), beside the model card and a copy of its source; no tokenizer and no backbone configs, as far as the
  card shows (it builds both from the backbones' hub ids);
- training checkpoints `step_NNNNNNN.pt` / `best.pt` / `latest.pt`: a torch.save'd dict of `model_state_dict`,
  `optimizer_state_dict`, `scaler_state_dict`, `scheduler_state_dict`, `step`, `data_position`, `metric_value`,
  `timestamp` and `config`, the run's YAML (`model`: llm, dino, query_dim, visual_scale, lambda_coarse,
  deep_query, multi_token; `data`: frame_size, max_frames, replicate_image_frames). Pickles are read with
  `torch.load(weights_only=True)` only: tensors and plain containers, never arbitrary objects.
Its tensor names: `encoder.dino.*` (transformers 4.x Dinov2 names: `attention.attention.query/key/value`,
`attention.output.dense`), `encoder.query_input_proj.weight`, `encoder.output_proj.*`, `dino_to_llm.*`,
`llm_to_query.*`, `q_static` / `q_init` (1, query_dim), `llm.*` (the LlamaForCausalLM); a torch.compile'd module
adds `_orig_mod.` to its names, DistributedDataParallel a leading `module.`.

The two published sizes share this layout and differ only in the LLM (SmolLM2-135M-Instruct: width 576, 30 layers,
3 KV heads for 9 query heads; SmolLM2-1.7B-Instruct: width 2048, 24 layers, 32 heads with no grouping, rope theta
130000; both tie the embeddings), hence in the shapes of `llm.*`, `dino_to_llm` and `llm_to_query`; both read through
DINOv2-small with a 384-wide query at visual scale 0.14. The backbones' configs come from the directories the run
names when they exist (the public code builds its backbones from those names too), else from the known configs of the
names it gives (`.../dinov2-small`, `.../SmolLM2-1.7B-Instruct`); an uploaded state dict without a config names
none, so its tensors' shapes pick the known backbone they fit (`by_shapes`): the 135M and the 1.7B tell themselves
apart, and a checkpoint of any other size is refused with its shapes named, not read into a wrong skeleton.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Dinov2Config, Dinov2Model

from cli import UserError
from config import DINO_HUB_ID, LLM_HUB_ID, FoveatedConfig
from inputs.frames import FrameSpec
from vlm import weights
from vlm.saved import Saved

HUB_ID = "sanps/fVLM-135M"
# the published models, hub repo -> the backbones they hold (KNOWN_BACKBONES' names); the first is read by default
RELEASES = {
    HUB_ID: ("dinov2-small", "SmolLM2-135M-Instruct"),
    "sanps/fVLM-1.7B": ("dinov2-small", "SmolLM2-1.7B-Instruct"),
}
# where the weights are, in order of preference: the hub's file, then the training run's checkpoints
WEIGHT_FILES = ("model.safetensors", "best.pt", "latest.pt", "model.pt", "pytorch_model.bin")
_STEP_FILE = re.compile(r"step_(\d+)\.pt")
_HUB_PATTERNS = ["*.safetensors", "*.pt", "*.bin", "*.json", "*.jinja", "*.txt", "*.model"]
_MARKERS = ("encoder.query_input_proj.weight", "q_static")  # names only the public code's FoveatedVLM has
_PICKLED_MARKERS = (b"query_input_proj", b"q_static")  # the same, as a pickle spells them
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# how the published models were trained and fed (the public code's final stage-3 runs; the same for both sizes)
PUBLISHED = {"visual_scale": 0.14, "deep_query": True}  # query_dim: q_static's width (384), glimpses 1
PUBLISHED_FRAMES = FrameSpec(size=224, max_frames=64, image_frames=8, fps=1.0)  # ImageNet mean / std

# the backbones' shapes, by the last part of the name the public code was given
KNOWN_BACKBONES: dict[str, dict[str, Any]] = {
    "dinov2-small": {"model_type": "dinov2", **weights.DINOV2_SMALL, "layer_norm_eps": 1e-6, "qkv_bias": True},
    "SmolLM2-135M-Instruct": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
    "SmolLM2-1.7B-Instruct": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 130000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
}
LLM_1_7B_HUB_ID = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
_HUB_NAMES = {
    "dinov2-small": DINO_HUB_ID,
    "SmolLM2-135M-Instruct": LLM_HUB_ID,
    "SmolLM2-1.7B-Instruct": LLM_1_7B_HUB_ID,
}
# SmolLM2's sizes share one tokenizer (vocabulary, special tokens, chat template): offline, the packaged 135M one
_SAME_TOKENIZER = {LLM_1_7B_HUB_ID: LLM_HUB_ID}
_ROLES = {"dino": ("encoder.dino.", "DINOv2"), "llm": ("llm.", "LLM")}  # a backbone's tensors (our names), in words
_LAYER = re.compile(r"\.layers?\.(\d+)\.")  # a block's index: Llama's `model.layers.N.`, Dinov2's `encoder.layer.N.`

# (published prefix, ours), first match wins; the Dinov2 part is renamed to transformers 5.x names after
_PREFIXES = (
    ("encoder.query_input_proj.", "encoder.query_in."),
    ("encoder.output_proj.", "encoder.query_out."),
    ("encoder.dino.", "encoder.dino."),
    ("dino_to_llm.", "dino_to_llm."),
    ("llm_to_query.", "llm_to_query."),
    ("llm.", "llm."),
)
_EXACT = ("q_static", "q_init")
_DERIVED = ("rotary_emb.inv_freq",)  # buffers older transformers saved; recomputed from the config, not weights

log = logging.getLogger(__name__)


# ---- finding the files -----------------------------------------------------------------------


def _hub_id(source: str) -> bool:
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return source.count("/") == 1


def _download(repo_id: str) -> Path | None:
    """The hub repo's files: the local HF cache first, the hub only if it answers."""
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError, or a cache without this repo)
        pass
    if not weights._hub_reachable():
        return None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (huggingface_hub.errors.HfHubHTTPError, OSError, ValueError) as e:
        log.warning("fvlm: could not download %s from the hub (%s)", repo_id, e)
        return None


def _locate(source: str | Path) -> Path | None:
    """A local file or directory as given, else a hub repo id's downloaded files."""
    path = Path(source)
    if path.exists():
        return path
    return _download(str(source)) if _hub_id(str(source)) else None


def weight_file(path: Path) -> Path | None:
    """The file holding the weights: the path itself, or the preferred one in a directory."""
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    steps = [(int(m[1]), p) for p in path.glob("step_*.pt") if (m := _STEP_FILE.fullmatch(p.name))]
    return max(steps)[1] if steps else None


def _format(file: Path) -> str:
    """By content, not by name: the model card loads its `model.safetensors` with torch.load."""
    with open(file, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "pickle"


def _names_in(file: Path) -> bool:
    """Whether the file holds the public code's FoveatedVLM tensors, read without loading (or unpickling) them."""
    kind = _format(file)
    try:
        if kind == "safetensors":
            with safe_open(str(file), "pt") as f:
                names = {canonical(k) for k in f.keys()}
            return all(m in names for m in _MARKERS)
        if kind == "torch-zip":
            with zipfile.ZipFile(file) as z:
                pickled = next((z.read(n) for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), b"")
            return all(m in pickled for m in _PICKLED_MARKERS)
    except Exception:  # a damaged file is not recognised; our own loading then says what is wrong with it
        return False
    return False  # a pre-1.6 torch pickle: not sniffed


def matches(source: str | Path) -> bool:
    """Whether `source` (a file, a directory, or a hub repo id) holds the public fVLM code's FoveatedVLM weights."""
    path = _locate(source)
    file = weight_file(path) if path is not None else None
    return file is not None and _names_in(file)


# ---- reading ---------------------------------------------------------------------------------


def canonical(name: str) -> str:
    """A tensor name without DistributedDataParallel's `module.` and torch.compile's `_orig_mod.`."""
    name = name.removeprefix("module.")
    return name.replace("._orig_mod.", ".").removeprefix("_orig_mod.")


def _torch_load(file: Path) -> Any:
    try:
        with open(file, "rb") as f:  # a file object: torch.load reads a path named *.safetensors as safetensors
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses any object that is not a tensor or a plain container
        raise UserError(
            f"{file}: refused, it is not a plain pickle of tensors (read with torch.load(weights_only=True), which "
            f"never runs the code a pickle may carry): {e}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{file} is damaged or incomplete: {e}") from e


def read_release(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict under canonical names, the run's config) of a published weight file."""
    config: dict[str, Any] = {}
    if _format(file) == "safetensors":
        try:
            raw: Any = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file} is damaged or incomplete: {e}") from e
    else:
        raw = _torch_load(file)
        if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):  # a training checkpoint
            config = raw.get("config") if isinstance(raw.get("config"), dict) else {}
            raw = raw["model_state_dict"]
        elif isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected a state dict, found a {type(raw).__name__}")
    if bad := [k for k, v in raw.items() if not torch.is_tensor(v)]:
        raise UserError(f"{file}: entries of the state dict that are not tensors: {bad[:10]}")
    state = {canonical(k): v for k, v in raw.items()}
    if len(state) != len(raw):
        raise UserError(f"{file}: tensor names collide once `module.` / `_orig_mod.` are removed")
    beside = file.parent / "config.json"
    if not config and beside.is_file():
        try:
            found = json.loads(beside.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{beside} is malformed: {e}") from e
        config = found if isinstance(found, dict) else {}
    return state, config


def our_name(name: str) -> str | None:
    """Our parameter name for a published tensor's canonical name (None: no rule maps it)."""
    if name in _EXACT:
        return name
    for theirs, ours in _PREFIXES:
        if name.startswith(theirs):
            mapped = ours + name[len(theirs) :]
            return weights._dino_name(mapped) if ours == "encoder.dino." else mapped
    return None


def _options(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, data) options of a run config: its YAML's sections, or the same keys at the top level."""
    model = config.get("model") if isinstance(config.get("model"), dict) else config
    data = config.get("data") if isinstance(config.get("data"), dict) else config
    return model, data


def _backbone(options: dict[str, Any], what: str) -> tuple[str | None, dict[str, Any] | None]:
    """(name, config) a run gives a backbone (`llm`, `llm_name` / `dino`, `dino_name`; a dict is its config)."""
    name, config = None, None
    for key in (what, f"{what}_name", f"{what}_config"):
        value = options.get(key)
        if isinstance(value, str) and value and name is None:
            name = value
        elif isinstance(value, dict) and "model_type" in value and config is None:
            config = dict(value)
    return name, config


def _backbone_config(name: str, what: str) -> dict[str, Any]:
    """A backbone's transformers config: the directory the run names, else the known shapes, else the hub."""
    if os.path.isdir(name):
        return AutoConfig.from_pretrained(name).to_dict()
    if Path(name).name in KNOWN_BACKBONES:
        return dict(KNOWN_BACKBONES[Path(name).name])
    try:
        return AutoConfig.from_pretrained(name, local_files_only=not weights._hub_reachable()).to_dict()
    except (OSError, ValueError) as e:
        raise UserError(f"the checkpoint's {what} {name!r} is neither a directory nor one of the known "
                         f"{sorted(KNOWN_BACKBONES)}, and its config cannot be fetched: {e}") from e  # fmt: skip


def _layers(names: Any) -> int:
    return 1 + max((int(m[1]) for n in names if (m := _LAYER.search(n))), default=-1)


def misfit(config: dict[str, Any], role: str, state: dict[str, torch.Tensor]) -> str | None:
    """Why the backbone `config` describes cannot hold the published tensors of `role` ("dino" or "llm"); None if it
    can: as many layers, and the same shape for every tensor both have. Only shapes are read (meta tensors do); a
    tensor the backbone lacks is left to `_check`, which names it, so a renamed tensor reads as renamed, not as
    another size."""
    prefix = _ROLES[role][0]
    with torch.device("meta"):  # the skeleton's shapes without its memory (1.7B parameters are 7 GB in fp32)
        if role == "dino":
            skeleton: nn.Module = Dinov2Model(Dinov2Config.from_dict(config))
        else:
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    expected = {prefix + k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    given = {ours: tuple(t.shape) for n, t in state.items() if (ours := our_name(n) or "").startswith(prefix)}
    if _layers(given) != _layers(expected):
        return f"{_layers(given)} layers where it has {_layers(expected)}"
    for name, shape in given.items():
        if name in expected and shape != expected[name]:
            return f"{name} {shape} where it has {expected[name]}"
    return None


def by_shapes(file: Path, state: dict[str, torch.Tensor], role: str) -> str:
    """The known backbone of the published models that the checkpoint's `role` tensors fit ("dino" or "llm"), for a
    checkpoint whose config names none (the hub's files): else an error naming how each one differs."""
    names = dict.fromkeys(backbones[role == "llm"] for backbones in RELEASES.values())
    why = {name: misfit(KNOWN_BACKBONES[name], role, state) for name in names}
    fits = [name for name, reason in why.items() if reason is None]
    if not fits:
        differ = "; ".join(f"against {name}, {reason}" for name, reason in why.items())
        raise UserError(
            f"{file} holds the public fVLM code's tensors, but its {_ROLES[role][1]} is in neither published layout "
            f"({', '.join(RELEASES)}): {differ}; a config.json beside it naming its `{role}` (a directory or hub "
            "id, as the public code's run config does) reads another size"
        )
    return fits[0]


def _tokenizer(folder: Path, llm: str | None) -> Any:
    """The checkpoint's own tokenizer when it ships one, else the LLM's (offline: the packaged SmolLM2 one, which
    every SmolLM2 size shares)."""
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(folder)
    if llm and any((Path(llm) / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(llm)
    name = _HUB_NAMES.get(Path(llm).name, llm) if llm else LLM_HUB_ID
    try:
        return weights.load_tokenizer(name)
    except OSError:
        if name not in _SAME_TOKENIZER:
            raise
        log.info("fvlm: %s's tokenizer is not at hand; using %s's, the same tokenizer", name, _SAME_TOKENIZER[name])
        return weights.load_tokenizer(_SAME_TOKENIZER[name])


def _check(file: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published tensors under our names, or an error naming every one that does not fit."""
    mapped, unmapped = {}, []
    for name, tensor in state.items():
        ours = our_name(name)
        if ours is None:
            if not name.endswith(_DERIVED):
                unmapped.append(name)
        elif ours in mapped:
            unmapped.append(f"{name} (a second tensor for {ours}, beside {mapped[ours][0]})")
        else:
            mapped[ours] = (name, tensor)
    expected = model.state_dict()
    ties: dict[int, list[str]] = {}  # names of one parameter (SmolLM2's tied embeddings): any of them loads all
    for name, p in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(p), []).append(name)
    unexpected = [f"{theirs} (as {ours})" for ours, (theirs, _) in mapped.items() if ours not in expected]
    missing, differ = [], []
    for names in ties.values():
        given = [n for n in names if n in mapped]
        if not given:
            missing.extend(names)
        elif any(not torch.equal(mapped[n][1], mapped[given[0]][1]) for n in given[1:]):
            differ.append(f"{', '.join(mapped[n][0] for n in given)} differ, but the LLM ties them")
    params = {n for names in ties.values() for n in names}
    missing += [n for n in expected if n not in params and n not in mapped]  # buffers
    for ours, (theirs, tensor) in mapped.items():
        if ours in expected and tensor.shape != expected[ours].shape:
            differ.append(f"{theirs} {tuple(tensor.shape)} vs ours {tuple(expected[ours].shape)}")
    problems = [
        (unmapped, "published tensors with no counterpart in our model"),
        (unexpected, "published tensors whose counterpart our model lacks"),
        (missing, "tensors of our model the checkpoint does not have"),
        (differ, "tensors that do not fit"),
    ]
    if any(names for names, _ in problems):
        listed = "; ".join(f"{what}: {names}" for names, what in problems if names)
        raise UserError(f"{file} does not fit our FoveatedVLM as the published fVLM layout: {listed}")
    return {ours: tensor for ours, (_, tensor) in mapped.items()}


def read(source: str | Path = HUB_ID) -> Saved:
    """The published fVLM checkpoint (a hub repo id, a local copy of its files, a directory of training checkpoints
    or one weight file) as a foveated model's saved state, fed as the published model was trained; the renaming
    is checked against the model built from it (`_check`) when it is loaded."""
    path = _locate(source)
    if path is None:
        raise FileNotFoundError(f"{source}: no such file or directory, and not a hub repo in the cache or reachable")
    file = weight_file(path)
    if file is None:
        raise FileNotFoundError(f"{path}: none of {WEIGHT_FILES} or step_*.pt in it")
    state, run = read_release(file)
    if missing := [m for m in _MARKERS if m not in state]:
        raise UserError(f"{file} is not the public fVLM code's FoveatedVLM: it has no {missing}")
    model_opts, data_opts = _options(run)
    if model_opts.get("multi_token"):
        raise UserError(f"{file} is the public code's multi-token ablation, not its foveated model")
    if not model_opts.get("deep_query", PUBLISHED["deep_query"]):
        raise UserError(f"{file} reads with the shallow query (deep_query: false), which our encoder does not "
                         "reproduce as the public code ran it; only the published deep query converts")  # fmt: skip
    (dino, dino_config), (llm, llm_config) = _backbone(model_opts, "dino"), _backbone(model_opts, "llm")
    if dino_config is None:  # no name either (the hub's files, no config): the tensors' shapes say which size
        dino = dino or by_shapes(file, state, "dino")
        dino_config = _backbone_config(dino, "DINOv2")
    if llm_config is None:
        llm = llm or by_shapes(file, state, "llm")
        llm_config = _backbone_config(llm, "LLM")
    backbones = {"dino": dino_config, "llm": llm_config}
    if backbones["dino"]["model_type"] == "dinov2":  # facebook/dinov2-* keep the (unused) masked-pretraining token
        backbones["dino"]["use_mask_token"] = "encoder.dino.embeddings.mask_token" in state
    config = FoveatedConfig(
        dino=_HUB_NAMES.get(Path(dino).name, dino) if dino else DINO_HUB_ID,
        llm=_HUB_NAMES.get(Path(llm).name, llm) if llm else LLM_HUB_ID,
        query_dim=int(state["q_static"].shape[-1]),
        visual_scale=float(model_opts.get("visual_scale") or PUBLISHED["visual_scale"]),
        deep_query=True,
        glimpses=1,
        frames_at="start",
        coarse_weight=float(model_opts.get("lambda_coarse") or 0.0),
    )
    frames = FrameSpec(
        size=int(data_opts.get("frame_size") or PUBLISHED_FRAMES.size),
        max_frames=int(data_opts.get("max_frames") or PUBLISHED_FRAMES.max_frames),
        image_frames=int(data_opts.get("replicate_image_frames") or PUBLISHED_FRAMES.image_frames),
        fps=PUBLISHED_FRAMES.fps,
    )
    return Saved("foveated", config, frames, backbones, _tokenizer(file.parent, llm), state, file, fit=_check)
