"""FoveatedVLM: one visual token per frame per glimpse, with the LLM choosing where to look next.

The connector whose reads depend on the LLM. Its three modes (config.MODES) are its ways to read:
- coarse_only: every frame read with the learned static query, no feedback;
- coarse_fine (parallel, for training): pass 1 reads every frame coarsely, the LLM maps frame t's hidden state
  to frame t+1's query; pass 2 reads with those queries (config.fine_passes > 1: each further pass reads with
  the queries written from the previous fine read; as many passes as frames is the autoregressive read). The
  patch cache is shared by every pass;
- autoregressive (true inference): frame t is read with the query from the fine tokens of frames < t, the LLM
  advancing one frame at a time on its KV cache; then the text.
Everything else (layout, loss, generation, scoring, groups) is the base VLM's (vlm/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, Dinov2Config, Dinov2Model, DynamicCache

import release
from config import MODES, FoveatedConfig
from encoder import FoveatedEncoder, PatchCache, PatchMemo
from inputs.frames import FrameSpec
from vlm import weights
from vlm.base import VLM
from vlm.kvcache import StaticKV
from vlm.loss import labelled_nll, through_labels
from vlm.outputs import Output, Prefix, Visual


@dataclass
class Glanced(Visual):
    """A Visual whose coarse read the LLM has already run (the auxiliary coarse loss's pass): its hidden states
    at the frame slots are pass 1's, since under causal attention the text after the frames cannot change them."""

    pass1: Tensor | None = None  # (B, T*k, D_llm)


class FoveatedVLM(VLM):
    kind = "foveated"
    adapters = (release,)  # the published fVLM checkpoint reads into this class
    vision_prefixes = ("encoder.dino.",)

    def __init__(
        self, config: FoveatedConfig, dino: nn.Module, llm: nn.Module, tokenizer=None, frames: FrameSpec | None = None
    ):
        super().__init__(config, llm, tokenizer, frames)
        self.encoder = FoveatedEncoder(dino, config.query_dim, config.deep_query)
        k, dq, d_llm = config.glimpses, config.query_dim, llm.config.hidden_size
        self.dino_to_llm = nn.Linear(self.encoder.dim, d_llm)
        self.llm_to_query = nn.Linear(d_llm, k * dq)
        # std 1.0: with 0.02 the query's attention starts uniform and never learns to look
        self.q_static = nn.Parameter(torch.randn(k, dq))
        self.q_init = nn.Parameter(torch.randn(k, dq))
        if config.query_start == "cls":
            with torch.no_grad():
                self.q_static.copy_(self.encoder.cls_query().expand(k, dq))
                self.q_init.copy_(self.q_static)
        if config.fine_start == "coarse":
            with torch.no_grad():
                self.llm_to_query.weight.zero_()
                self.llm_to_query.bias.copy_(self.q_static.flatten())
                self.q_init.copy_(self.q_static)

    @property
    def reads(self) -> dict[str, dict[str, Any]]:
        return {mode: {"mode": mode} for mode in MODES}

    @property
    def train_read(self) -> dict[str, Any]:
        return {"mode": self.config.mode}

    @property
    def tokens_per_frame(self) -> int:
        return self.config.glimpses

    def group_of(self, name: str) -> str:
        """The base's groups, with the queries' parameters as "query" (optim.py puts them in the connector's group
        unless optim.lr_query is set)."""
        if name.startswith(("q_static", "q_init", "encoder.query_in.", "llm_to_query.")):
            return "query"
        return super().group_of(name)

    def check_read(self, read: dict[str, Any]) -> None:
        if set(read) != {"mode"} or read["mode"] not in MODES:
            raise ValueError(f"unknown forward mode {read.get('mode', read)!r}; expected mode= one of {MODES}")

    def uses_cache(self, mode: str = "coarse_fine") -> bool:
        return mode == "autoregressive"

    def share_frozen(self, other: VLM, batches: int = 1) -> bool:
        """One frozen DINOv2 and one patch memo of `batches` passes for both encoders, when both backbones are
        frozen (every weight at lr 0) and equal: the other model's patch pass of a batch is then this one's
        (encoder.PatchMemo)."""
        if not isinstance(other, FoveatedVLM) or other.encoder.deep != self.encoder.deep:
            return False
        mine, theirs = self.encoder.dino, other.encoder.dino
        if any(p.requires_grad for p in (*mine.parameters(), *theirs.parameters())):
            return False
        a, b = mine.state_dict(), theirs.state_dict()
        if mine.config.to_dict() != theirs.config.to_dict() or a.keys() != b.keys():
            return False
        if not all(a[k].device == b[k].device and torch.equal(a[k], b[k]) for k in a):
            return False
        other.encoder.dino = mine
        memo = self.encoder.memo or PatchMemo(batches)
        memo.size = max(memo.size, batches)
        self.encoder.memo = other.encoder.memo = memo
        return True

    def checkpoint_activations(self) -> None:
        super().checkpoint_activations()
        self.encoder.gradient_checkpointing = True

    # ---- visual side -------------------------------------------------------------------

    def prepare(self, frames: Tensor, frame_mask: Tensor) -> Visual:
        """frames (B, T, 3, H, W), frame_mask (B, T) -> the patch cache of the real frames, time-major.

        Time-major order (all frames at t=0, then t=1, ...) lets the autoregressive loop take
        each step's frames as a contiguous slice of the cache.
        """
        return Visual(frame_mask, self.encoder.encode_patches(frames.transpose(0, 1)[frame_mask.T]))

    def _read(self, cache: PatchCache, queries: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, T, k, Dq) over the cached frames -> tokens (B, T*k, D_llm), attention (B, T, k, 1+P)."""
        b, t, k, _ = queries.shape
        mt = frame_mask.T  # (T, B)
        tok, attn = self.encoder.query_attend(queries.transpose(0, 1)[mt], cache)  # (N, k, D), (N, k, 1+P)
        tok = self.dino_to_llm(tok) * self.config.visual_scale
        tokens = tok.new_zeros(t, b, k, tok.shape[-1])
        tokens[mt] = tok
        attention = attn.new_zeros(t, b, k, attn.shape[-1])
        attention[mt] = attn
        # contiguous: a batch-major view of time-major memory would reach every LLM matmul of the pass as an input
        # that cannot fold into one matrix, and each would copy its weight once per clip (a bmm)
        return tokens.transpose(0, 1).reshape(b, t * k, tok.shape[-1]).contiguous(), attention.transpose(0, 1)

    def _next_queries(self, hidden: Tensor) -> Tensor:
        """hidden (B, D_llm) at a frame's last token -> the k queries for the next frame (B, 1, k, Dq)."""
        return self.llm_to_query(hidden).view(hidden.shape[0], 1, *self.q_init.shape)

    def visual_tokens(self, visual: Visual, mode: str = "coarse_fine") -> tuple[Tensor, Tensor]:
        """Parallel modes: tokens (B, T*k, D_llm) and attention (B, T, k, 1+P) of the final read."""
        cache, frame_mask = visual.features, visual.frame_mask
        b, t = frame_mask.shape
        coarse, attn = self._read(cache, self.q_static.expand(b, t, *self.q_static.shape), frame_mask)
        if mode == "coarse_only" or t == 0:
            return coarse, attn
        # pass 1: under causal attention the text after the frames cannot influence the visual positions,
        # so the LLM over [head, coarse tokens] alone gives each frame's query for the next frame
        hidden = visual.pass1 if isinstance(visual, Glanced) else self._frame_hidden(coarse, frame_mask)
        tokens = coarse
        for p in range(self.config.fine_passes):
            if p:  # a further pass: the queries written from the previous fine read, as at inference
                hidden = self._frame_hidden(tokens, frame_mask)
            last = hidden.view(b, t, self.config.glimpses, -1)[:, :-1, -1]  # (B, T-1, D)
            q_next = self.llm_to_query(last).view(b, t - 1, *self.q_init.shape)
            queries = torch.cat([self.q_init.expand(b, 1, *self.q_init.shape), q_next], dim=1)  # (B, T, k, Dq)
            tokens, attn = self._read(cache, queries, frame_mask)
        return tokens, attn

    def _frame_hidden(self, tokens: Tensor, frame_mask: Tensor) -> Tensor:
        """tokens (B, T*k, D_llm) -> the LLM's hidden states over [head, tokens] at the frame slots (B, T*k, D)."""
        b, h = frame_mask.shape[0], len(self.head_ids)
        mask = torch.cat([frame_mask.new_ones(b, h, dtype=torch.long), self.slot_mask(frame_mask)], dim=1)
        return self._llm(tokens, mask, self.open_head(b, None)[1])

    # ---- sequence ----------------------------------------------------------------------

    def prefix(
        self,
        visual: Visual,
        input_ids: Tensor,
        attention_mask: Tensor,
        kv_cache: bool = False,
        rows: Tensor | None = None,
        room: int | None = None,
        **read: Any,
    ) -> Prefix:
        """The base's layout; autoregressive mode runs its own frame-by-frame loop first (with `room`, every step
        writes into one static cache sized for head + T*k frame slots + text + room)."""
        read = read or self.train_read
        if read.get("mode") != "autoregressive":
            return super().prefix(visual, input_ids, attention_mask, kv_cache, rows, room, **read)
        self.check_read(read)
        h = self.head_length(input_ids, attention_mask)
        text, text_mask = self.embed(input_ids)[:, h:], attention_mask[:, h:].long()
        framed, last = visual.frame_mask.any(1), self.last_slot(visual.frame_mask)
        if rows is not None:
            framed, last = framed[rows], last[rows]
        length = h + visual.frame_mask.shape[1] * self.tokens_per_frame + text.shape[1]
        past = self.new_cache(kv_cache, room, length)
        return self._autoregressive(visual, rows, text, text_mask, past, framed, last)

    def _autoregressive(
        self,
        visual: Visual,
        rows: Tensor | None,
        text: Tensor,
        text_mask: Tensor,
        past: DynamicCache | StaticKV | None,
        framed: Tensor,
        last_slot: Tensor,
    ) -> Prefix:
        """After the head, frame t is read with the query from the fine tokens of frames < t, one LLM step per
        frame (over the B clips); then the `text` (R, L', D) of every row.

        With `past` the LLM advances on its KV cache; without, every step reruns the whole
        sequence so far (the reference the cache must match).
        """
        cache, frame_mask = visual.features, visual.frame_mask
        b, t = frame_mask.shape
        k, head = self.config.glimpses, self.head(b)
        h = head.shape[1]
        counts = frame_mask.sum(0).tolist()  # real frames at each step, contiguous in the cache
        mask = frame_mask.new_ones(b, h, dtype=torch.long)
        seq = head  # (B, S, D), only needed without cache
        head_hidden = self.open_head(b, past)[0] if past is not None else head[:, :0]
        queries = self.q_init.expand(b, 1, *self.q_init.shape)
        start, attns, steps = 0, [], []
        for step in range(t):
            step_cache = cache.narrow(start, counts[step])
            start += counts[step]
            tok, attn = self._read(step_cache, queries, frame_mask[:, step : step + 1])  # (B, k, D)
            attns.append(attn)
            mask = torch.cat([mask, self.slot_mask(frame_mask[:, step : step + 1])], dim=1)
            if past is not None:
                hidden = self._llm(tok, mask, past)
            else:
                seq = torch.cat([seq, tok], dim=1)
                hidden = self._llm(seq, mask)[:, -k:]
            steps.append(hidden)  # (B, k, D)
            queries = self._next_queries(hidden[:, -1])
        slots = torch.cat(steps, dim=1) if steps else head.new_zeros(b, 1, head.shape[-1])  # (B, T*k, D)
        if rows is not None:
            slots, mask, seq, head_hidden = slots[rows], mask[rows], seq[rows], head_hidden[rows]
            if past is not None:
                past.batch_select_indices(rows)
        last_visual = slots[torch.arange(len(slots), device=slots.device), last_slot.clamp(min=0)]
        mask = torch.cat([mask, text_mask], dim=1)
        if past is not None:
            hidden = self._llm(text, mask, past)
        else:
            full = self._llm(torch.cat([seq, text], dim=1), mask)
            head_hidden, hidden = full[:, :h], full[:, seq.shape[1] :]
        attention = torch.cat(attns, dim=1) if attns else None
        return Prefix(torch.cat([head_hidden, hidden], dim=1), mask, past, attention, last_visual, framed, h)

    def forward(
        self,
        frames: Tensor,
        frame_mask: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        visual: Visual | None = None,
        rows: Tensor | None = None,
        logits: bool = True,
        **read: Any,
    ) -> Output:
        """The base's forward; with `coarse_weight` > 0 and labels the loss is fine + weight x the loss of an extra
        LLM pass over the coarse tokens (the same targets, the same encoding), so that one model answers from both
        reads and coarse_only is a trained reader too; `terms` holds the two (fine_loss, coarse_loss), and
        validation, which runs this too, measures what training minimises. `nll` and `count` stay the fine read's.
        Rows reading shared clips (DPO's chosen and rejected answers) take no coarse term: DPO's loss is made of
        the fine read's log-probabilities alone, so that pass would be thrown away.

        In coarse_fine mode that pass is pass 1 as well (the frame slots' hidden states, which the text after
        them cannot change, give the fine queries), so the auxiliary loss costs no extra LLM pass."""
        read = read or self.train_read
        if labels is not None and not logits:
            input_ids, attention_mask, labels = through_labels(input_ids, attention_mask, labels, len(self.head_ids))
        if visual is None:
            visual = self.prepare(frames, frame_mask)
        weight = self.config.coarse_weight
        aux = bool(weight and labels is not None and rows is None and read["mode"] != "coarse_only")
        coarse_loss = None
        if aux and read["mode"] == "coarse_fine":
            pre = self.prefix(visual, input_ids, attention_mask, False, None, mode="coarse_only")
            nll, count = labelled_nll(self.lm_head, pre.hidden, labels, pre.last_visual, pre.framed, pre.cut)
            coarse_loss = nll.sum() / count.sum().clamp(min=1)
            visual = Glanced(visual.frame_mask, visual.features, pre.frame_hidden)
        out = super().forward(frames, frame_mask, input_ids, attention_mask, labels, visual, rows, logits, **read)
        if aux:
            if coarse_loss is None:  # autoregressive: a pass of its own
                coarse_loss = super().forward(frames, frame_mask, input_ids, attention_mask, labels, visual, rows,
                                              False, mode="coarse_only").loss  # fmt: skip
            out.terms = {"fine_loss": out.loss, "coarse_loss": coarse_loss}
            out.loss = out.loss + weight * coarse_loss
        return out

    # ---- rebuilding (vlm/saved.py does the I/O) ----

    def backbone_configs(self) -> dict[str, dict]:
        return {"dino": self.encoder.dino.config.to_dict(), "llm": self.llm.config.to_dict()}

    @classmethod
    def from_configs(cls, config: FoveatedConfig, backbones: dict, tokenizer: Any, frames: FrameSpec) -> FoveatedVLM:
        """A randomly initialised model of the saved shapes (`from_saved` loads the weights into it)."""
        dino = Dinov2Model(Dinov2Config.from_dict(backbones["dino"]))
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**backbones["llm"]))
        return cls(config, dino, llm, tokenizer, frames)

    @classmethod
    def from_backbones(cls, config: FoveatedConfig | None = None, frames: FrameSpec | None = None) -> FoveatedVLM:
        """A new model around pretrained DINOv2 + LLM (hub ids, local dirs, or "packaged")."""
        config = config or FoveatedConfig()
        llm, tokenizer = weights.load_llm(config.llm), weights.load_tokenizer(config.llm)
        return cls(config, weights.load_dino(config.dino), llm, tokenizer, frames)


__all__ = ["MODES", "FoveatedVLM", "Output", "Visual"]
