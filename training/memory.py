"""Memory per GPU of training the foveated model, counted from the backbones' shapes (docs/training.md's table).

`python -m training.memory` prints the table for fVLM-135M (SmolLM2-135M-Instruct + DINOv2-small) and fVLM-1.7B
(SmolLM2-1.7B-Instruct + DINOv2-small). The assumptions, each a choice of this project's loop:
- weights fp32 (4 bytes); bf16 training casts them for the matmuls (2 bytes): DDP through autocast, whose copy of
  each weight lives from its use in forward to its backward, so all of them at once; FSDP when it gathers a unit
  (train.parallel: fsdp shards each LLM decoder layer, and gathers the rest, the root, for the whole step).
- gradients fp32; DDP also keeps its reduction buckets, a second copy (gradient_as_bucket_view is off); FSDP keeps
  a 1/N shard, and the whole gradient of the units being reduced (the root's until the backward's end).
- AdamW: two fp32 moments per trained weight, none for a frozen one (lr 0).
- activations bf16, activation checkpointing on (train.gradient_checkpointing: each layer keeps its input, one
  layer is recomputed at a time), the coarse_fine read with one glimpse (the LLM over the frame tokens, then over
  frames and text), 128 text tokens all labelled, 224 px frames (256 patches + CLS), every group training.
First-order counts: no allocator slack, kernel workspace or communication buffers; FSDP's prefetch of the next
layer is counted (two decoder layers gathered).
"""

from __future__ import annotations

import math
from typing import Any

from release import KNOWN_BACKBONES

GiB = 1024**3
FP32, BF16 = 4, 2
GROUPS = ("vision", "connector", "llm")


Shape = tuple[int, ...]


def dino_shapes(c: dict[str, Any], prefix: str = "encoder.dino.") -> dict[str, Shape]:
    """transformers' Dinov2Model (no pooler) of config `c`, by parameter name: patch embedding, CLS and mask tokens,
    the position grid of its training size, layers (biased projections, layer scales, MLP of mlp_ratio), final norm."""
    h, p = c["hidden_size"], c["patch_size"]
    m, grid = int(h * c.get("mlp_ratio", 4)), c.get("image_size", 224) // p
    e = prefix + "embeddings."
    out = {e + "cls_token": (1, 1, h), e + "mask_token": (1, h), e + "position_embeddings": (1, grid * grid + 1, h)}
    out |= {e + "patch_embeddings.projection.weight": (h, 3, p, p), e + "patch_embeddings.projection.bias": (h,)}
    for i in range(c["num_hidden_layers"]):
        layer = f"{prefix}encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            out |= {f"{layer}{norm}.weight": (h,), f"{layer}{norm}.bias": (h,)}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out |= {f"{layer}attention.{proj}.weight": (h, h), f"{layer}attention.{proj}.bias": (h,)}
        out |= {f"{layer}mlp.fc1.weight": (m, h), f"{layer}mlp.fc1.bias": (m,)}
        out |= {f"{layer}mlp.fc2.weight": (h, m), f"{layer}mlp.fc2.bias": (h,)}
        out |= {f"{layer}layer_scale1.lambda1": (h,), f"{layer}layer_scale2.lambda1": (h,)}
    return out | {prefix + "layernorm.weight": (h,), prefix + "layernorm.bias": (h,)}


def llm_shapes(c: dict[str, Any], prefix: str = "llm.") -> dict[str, Shape]:
    """A Llama causal LM by parameter name: embeddings, decoder layers (bias-free attention with grouped keys and
    values, SwiGLU MLP, two RMSNorms), final norm, and the output layer unless tied to the embeddings."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    d = c.get("head_dim") or h // heads
    kv = (c.get("num_key_value_heads") or heads) * d
    out = {prefix + "model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        layer = f"{prefix}model.layers.{n}."
        out |= {layer + "self_attn.q_proj.weight": (heads * d, h), layer + "self_attn.k_proj.weight": (kv, h)}
        out |= {layer + "self_attn.v_proj.weight": (kv, h), layer + "self_attn.o_proj.weight": (h, heads * d)}
        out |= {layer + "mlp.gate_proj.weight": (i, h), layer + "mlp.up_proj.weight": (i, h)}
        out |= {layer + "mlp.down_proj.weight": (h, i)}
        out |= {layer + "input_layernorm.weight": (h,), layer + "post_attention_layernorm.weight": (h,)}
    out[prefix + "model.norm.weight"] = (h,)
    if not c.get("tie_word_embeddings", True):
        out[prefix + "lm_head.weight"] = (v, h)
    return out


def foveated_shapes(dino: dict[str, Any], llm: dict[str, Any], query_dim: int, glimpses: int = 1) -> dict[str, Shape]:
    """FoveatedVLM's parameters by name: its two queries, DINOv2, the LLM, and its projections (query in/out,
    DINOv2 -> LLM, LLM -> next query)."""
    dv, dl, q = dino["hidden_size"], llm["hidden_size"], glimpses * query_dim
    own = {"q_static": (glimpses, query_dim), "q_init": (glimpses, query_dim)}
    own |= {"encoder.query_in.weight": (dv, query_dim), "encoder.query_out.weight": (dv, dv)}
    own |= {"encoder.query_out.bias": (dv,), "dino_to_llm.weight": (dl, dv), "dino_to_llm.bias": (dl,)}
    own |= {"llm_to_query.weight": (q, dl), "llm_to_query.bias": (q,)}
    return own | dino_shapes(dino) | llm_shapes(llm)


def numel(shape: Shape) -> int:
    return math.prod(shape)


def group(name: str) -> str:
    """A parameter's learning-rate group, as FoveatedVLM.group_of names it (its queries in the connector's)."""
    return "vision" if name.startswith("encoder.dino.") else "llm" if name.startswith("llm.") else "connector"


def unit(name: str) -> str:
    """The FSDP unit that holds a parameter (training/processes.py's shard): its decoder layer, else the root."""
    if name.startswith("llm.model.layers."):
        return "layer " + name.split(".")[3]
    return "root"


def shard(shape: Shape, gpus: int, rank: int | None = None) -> int:
    """Elements of a parameter that FSDP2 gives `rank`: dim 0 cut into `gpus` chunks of ceil(rows / gpus) rows
    (torch.chunk: the last ones shorter, or empty); `rank` None: the padded chunk, what every rank allocates."""
    rows = -(-shape[0] // gpus)
    if rank is not None:
        rows = max(0, min(rows, shape[0] - rank * rows))
    return rows * numel(shape[1:])


def activations(dino: dict[str, Any], llm: dict[str, Any], frames: int, text: int = 128, size: int = 224) -> int:
    """Bytes a training step keeps for its backward, per sample (see the module's assumptions)."""
    hv, lv = dino["hidden_size"], dino["num_hidden_layers"]
    mv = int(hv * dino.get("mlp_ratio", 4))
    n, s = frames, (size // dino["patch_size"]) ** 2 + 1  # frames, tokens per frame
    cache = 2 * lv * n * s * hv  # every layer's patch keys and values, which both reads attend to
    vision = lv * n * s * hv + n * s * (8 * hv + 2 * mv)  # layer inputs; one layer recomputed (norms, q k v, attn, MLP)
    h, i, ll, v = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"], llm["vocab_size"]
    tokens = frames + (frames + text)  # pass 1 over the frame tokens, pass 2 over frames and text
    lm = ll * tokens * h + (frames + text) * (6 * h + 4 * i)  # layer inputs; one layer recomputed
    reads = 2 * lv * n * 12 * hv  # two query reads, one token per frame through every layer
    return BF16 * (cache + vision + lm + reads + text * v) + FP32 * text * v  # logits, and fp32 for the loss


def per_gpu(shapes: dict[str, Shape], gpus: int, parallel: str, trained: tuple[str, ...] = GROUPS) -> dict[str, int]:
    """Bytes per GPU of weights, gradients and AdamW moments (bf16 training) of a model of `shapes` on `gpus` GPUs;
    `trained`: the groups with a learning rate above 0. One GPU runs unwrapped whatever `parallel` says."""
    trains = [name for name in shapes if group(name) in trained]
    total, train = (sum(numel(shapes[n]) for n in names) for names in (shapes, trains))
    if gpus == 1 or parallel == "ddp":
        buckets = 2 if gpus > 1 else 1
        return {"weights": (FP32 + BF16) * total, "gradients": buckets * FP32 * train, "optimizer": 2 * FP32 * train}
    units: dict[str, list[str]] = {}
    for name in shapes:
        units.setdefault(unit(name), []).append(name)
    size = {u: sum(numel(shapes[n]) for n in names) for u, names in units.items()}
    size_trained = {u: sum(numel(shapes[n]) for n in names if n in trains) for u, names in units.items()}
    layer = max(size[u] for u in units if u != "root")  # every decoder layer is the same size
    layer_trained = max(size_trained[u] for u in units if u != "root")
    mine = sum(shard(shapes[n], gpus) for n in shapes)  # the padded shards every rank holds
    mine_trained = sum(shard(shapes[n], gpus) for n in trains)
    return {
        "weights": FP32 * mine + BF16 * (size["root"] + 2 * layer),  # shards; the root and two layers gathered
        "gradients": FP32 * mine_trained + BF16 * (size_trained["root"] + layer_trained),
        "optimizer": 2 * FP32 * mine_trained,
    }


MODELS = {  # name: (vision backbone, LLM backbone), release.py's names; query width 384, one glimpse (published)
    "fVLM-135M": ("dinov2-small", "SmolLM2-135M-Instruct"),
    "fVLM-1.7B": ("dinov2-small", "SmolLM2-1.7B-Instruct"),
}


def table(frames: tuple[int, ...] = (8, 64)) -> str:
    """docs/training.md's table, in GiB per GPU, batch 1 per GPU."""
    cols = ["model", "GPUs", "parallel", "parameters", "weights", "gradients", "AdamW"]
    cols += [f"activations {f} frames" for f in frames] + [f"total {f} frames" for f in frames]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, (vision, lm) in MODELS.items():
        dino, llm = KNOWN_BACKBONES[vision], KNOWN_BACKBONES[lm]
        shapes = foveated_shapes(dino, llm, query_dim=dino["hidden_size"])
        count = sum(numel(shape) for shape in shapes.values())
        acts = [activations(dino, llm, f) for f in frames]
        for gpus, parallel in ((1, "-"), (8, "ddp"), (8, "fsdp")):
            m = per_gpu(shapes, gpus, parallel)
            state = sum(m.values())
            cells = [name, str(gpus), parallel, f"{count / 1e6:.0f}M"]
            cells += [f"{m[k] / GiB:.2f}" for k in ("weights", "gradients", "optimizer")]
            cells += [f"{a / GiB:.2f}" for a in acts] + [f"{(state + a) / GiB:.2f}" for a in acts]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
