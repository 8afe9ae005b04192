"""FoveatedVLM: one visual token per frame per glimpse, with the LLM choosing where to look next.

The connector whose reads depend on the LLM. Its three modes (config.MODES) are its ways to read:
- coarse_only: every frame read with the learned static query, no feedback;
- coarse_fine (parallel, for training): pass 1 reads every frame coarsely, the LLM maps frame t's hidden state
  to frame t+1's query (and, with frames_at after_question, its hidden state at the question's last word to
  frame 0's: otherwise frame 0 is read with the learned q_init); pass 2 reads with those queries
  (config.fine_passes > 1: each further pass reads with the queries written from the previous fine read; as
  many passes as frames is the autoregressive read). The patch cache is shared by every pass;
- autoregressive (true inference): frame t is read with the query from the fine tokens of frames < t (frame 0's
  from the question, or q_init), the LLM advancing one frame at a time on its KV cache; then the text.
Only a read written from the question can depend on what is asked: with frames_at start or user_turn, coarse_fine
and autoregressive are as question-blind as coarse_only. With question_query standardised the question's state,
standardised, moves every frame's fine query through a head of its own (`_question_move`).
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
from vlm.base import VLM, Encoded, real_frames
from vlm.kvcache import StaticKV
from vlm.layout import Layout, Lead, clip_rows
from vlm.loss import labelled_nll, through_labels
from vlm.outputs import Output, Prefix, Visual, frames_of
from vlm.running_norm import RunningNorm


@dataclass
class Glanced(Encoded):
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
        if config.question_query == "standardised":
            # every frame's query moved by the question's own state (weight 0: it starts as the question-blind
            # read): the frames' states barely carry the question (their head, llm_to_query, reads another
            # distribution), and a look steered on frame 0 alone leaves the other frames' tokens a bag
            self.question_norm = RunningNorm(d_llm)
            self.question_to_query = nn.Linear(d_llm, k * dq, bias=False)
            nn.init.zeros_(self.question_to_query.weight)

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
        if name.startswith(("q_static", "q_init", "encoder.query_in.", "llm_to_query.", "question_to_query.")):
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

    def prepare(self, frames: Tensor, frame_mask: Tensor) -> Encoded:
        """frames (B, T, 3, H, W), frame_mask (B, T) -> the patch cache of the real frames, time-major (every clip's
        frame 0, then every frame 1, ...), and their places. Padded frames are not encoded: the DINOv2 pass is most
        of a step, and a batch of clips of different lengths is much padding."""
        places = real_frames(frame_mask, time_major=True)
        return Encoded(frame_mask, self.encoder.encode_patches(frames[places]), places)

    def visual_rows(self, visual: Visual, rows: Tensor) -> Encoded:
        mask = visual.frame_mask[rows]
        cache = visual.features.select(frames_of(visual.frame_mask, rows, True))
        return Encoded(mask, cache, real_frames(mask, time_major=True))

    def _read(self, cache: PatchCache, queries: Tensor, places: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """queries (B, T, k, Dq) over the cached frames (`places`: each one's clip and frame) -> tokens
        (B, T*k, D_llm), attention (B, T, k, 1+P); zeros at padded frames.

        Indexed by the places, never by the mask: the mask's selection would be a second size read from the data,
        which a compiled step could not match to the cache's. Built batch-major: a batch-major view of
        time-major memory would reach every LLM matmul of the pass as an input that cannot fold into one matrix,
        and each would copy its weight once per clip (a bmm)."""
        b, t, k, _ = queries.shape
        tok, attn = self.encoder.query_attend(queries[places], cache)  # (N, k, D), (N, k, 1+P)
        tok = self.dino_to_llm(tok) * self.config.visual_scale
        tokens = tok.new_zeros(b, t, k, tok.shape[-1]).index_put(places, tok)
        attention = attn.new_zeros(b, t, k, attn.shape[-1]).index_put(places, attn)
        return tokens.view(b, t * k, tok.shape[-1]), attention

    def _read_step(self, visual: Encoded, queries: Tensor, step: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The autoregressive read of frame `step`: queries (B, 1, k, Dq), `rows` (B,) each clip's row of that frame
        in the cache -> tokens (B, k, D_llm), attention (B, 1, k, 1+P). A clip without the frame reads a stand-in
        row and is zeroed: every step the same B rows, no size read from the data."""
        if not torch.compiler.is_compiling() and not len(visual.places[0]):  # no clip has a frame at all
            return self._read(visual.features, queries, visual.places)
        here = visual.frame_mask[:, step, None, None]  # (B, 1, 1)
        tok, attn = self.encoder.query_attend(queries[:, 0], visual.features.select(rows.clamp(min=0)))
        tok = self.dino_to_llm(tok) * self.config.visual_scale
        return torch.where(here, tok, 0.0), torch.where(here, attn, 0.0)[:, None]

    def _next_queries(self, hidden: Tensor, move: Tensor | None = None) -> Tensor:
        """hidden (B, D_llm) at a frame's last token -> the k queries for the next frame (B, 1, k, Dq), moved by the
        question (`_question_move`) where it steers every read."""
        queries = self.llm_to_query(hidden).view(hidden.shape[0], 1, *self.q_init.shape)
        return queries if move is None else queries + move

    def _question_move(self, lead: Lead) -> Tensor | None:
        """With question_query standardised, how the question moves every frame's fine query (B, 1, k, Dq): its
        own head's map of the question's last state, standardised (vlm/running_norm.py). Called once a forward: in
        training each call adds the batch to the statistics."""
        if not (lead.guided and self.config.question_query == "standardised"):
            return None
        moved = self.question_to_query(self.question_norm(lead.hidden[:, -1]).to(self.q_init.dtype))
        return moved.view(-1, 1, *self.q_init.shape)

    def _first_queries(self, lead: Lead, b: int, move: Tensor | None = None) -> Tensor:
        """Frame 0's fine queries (B, 1, k, Dq): q_init moved by the question (`move`) where the question steers
        every read; written by llm_to_query from the question's last word where the lead holds it; else q_init."""
        if move is not None:
            return self.q_init + move
        if lead.guided:
            return self._next_queries(lead.hidden[:, -1])
        # a copy, not a view: a view of a parameter made under no_grad claims requires_grad without a grad_fn,
        # which autograd's module hooks (torch's FLOP counter) cannot take as an input
        return self.q_init[None, None].repeat(b, 1, 1, 1)

    def visual_tokens(
        self, visual: Visual, lead: Lead | None = None, mode: str = "coarse_fine"
    ) -> tuple[Tensor, Tensor]:
        """Parallel modes: tokens (B, T*k, D_llm) and attention (B, T, k, 1+P) of the final read."""
        cache, frame_mask = visual.features, visual.frame_mask
        b, t = frame_mask.shape
        lead = lead or Lead.empty(b, self.llm.config.hidden_size, frame_mask.device)
        coarse, attn = self._read(cache, self.q_static.expand(b, t, *self.q_static.shape), visual.places)
        if mode == "coarse_only" or t == 0:
            return coarse, attn
        # pass 1: under causal attention the text after the frames cannot influence the visual positions,
        # so the LLM over [lead, coarse tokens] alone gives each frame's query for the next frame
        hidden = visual.pass1 if isinstance(visual, Glanced) else self._frame_hidden(coarse, frame_mask, lead)
        move = self._question_move(lead)
        tokens, first = coarse, self._first_queries(lead, b, move)
        for p in range(self.config.fine_passes):
            if p:  # a further pass: the queries written from the previous fine read, as at inference
                hidden = self._frame_hidden(tokens, frame_mask, lead)
            last = hidden.view(b, t, self.config.glimpses, -1)[:, :-1, -1]  # (B, T-1, D)
            q_next = self.llm_to_query(last).view(b, t - 1, *self.q_init.shape)
            q_next = q_next if move is None else q_next + move
            tokens, attn = self._read(cache, torch.cat([first, q_next], dim=1), visual.places)  # (B, T, k, Dq)
        return tokens, attn

    def _frame_hidden(self, tokens: Tensor, frame_mask: Tensor, lead: Lead) -> Tensor:
        """tokens (B, T*k, D_llm) -> the LLM's hidden states over [lead, tokens] at the frame slots (B, T*k, D)."""
        mask = torch.cat([lead.mask.long(), self.slot_mask(frame_mask)], dim=1)
        return self._llm(tokens, mask, lead.open())

    # ---- sequence ----------------------------------------------------------------------

    def prefix(
        self,
        visual: Visual,
        input_ids: Tensor,
        attention_mask: Tensor,
        kv_cache: bool = False,
        rows: Tensor | None = None,
        room: int | None = None,
        split: Tensor | None = None,
        **read: Any,
    ) -> Prefix:
        """The base's layout; autoregressive mode runs its own frame-by-frame loop first (with `room`, every step
        writes into one static cache sized for lead + T*k frame slots + text + room)."""
        read = read or self.train_read
        if read.get("mode") != "autoregressive":
            return super().prefix(visual, input_ids, attention_mask, kv_cache, rows, room, split, **read)
        self.check_read(read)
        text = self.layout(input_ids, attention_mask, split)
        framed, last = visual.frame_mask.any(1), self.last_slot(visual.frame_mask)
        lead = text
        if rows is not None:  # the loop runs once per clip, on the lead of its first row
            framed, last = framed[rows], last[rows]
            lead = text.select(clip_rows(rows, len(visual.frame_mask), text.lead_ids))
        length = text.lead_ids.shape[1] + visual.frame_mask.shape[1] * self.tokens_per_frame + text.rest_ids.shape[1]
        past = self.new_cache(kv_cache, room, length)
        return self._autoregressive(visual, rows, lead, text, past, framed, last)

    def _autoregressive(
        self,
        visual: Encoded,
        rows: Tensor | None,
        lead_layout: Layout,
        text_layout: Layout,
        past: DynamicCache | StaticKV | None,
        framed: Tensor,
        last_slot: Tensor,
    ) -> Prefix:
        """After the lead (`lead_layout`'s, one row per clip), frame t is read with the query from the fine tokens
        of frames < t (frame 0's from the lead: `_first_queries`), one LLM step per frame (over the B clips); then
        the text after the frames of every row (`text_layout`'s).

        With `past` the LLM advances on its KV cache; without, every step reruns the whole
        sequence so far (the reference the cache must match).
        """
        frame_mask = visual.frame_mask
        b, t = frame_mask.shape
        k = self.config.glimpses
        cached = (frame_mask.T.flatten().long().cumsum(0) - 1).view(t, b)  # (T, B) each frame's row in the cache
        lead = self.lead(lead_layout, past)  # (B rows)
        mask = lead.mask.long()
        seq = self.embed(lead_layout.lead_ids)  # (B, S, D), only needed without cache
        move = self._question_move(lead)
        queries = self._first_queries(lead, b, move)
        attns, steps = [], []
        for step in range(t):
            tok, attn = self._read_step(visual, queries, step, cached[step])  # (B, k, D)
            attns.append(attn)
            mask = torch.cat([mask, self.slot_mask(frame_mask[:, step : step + 1])], dim=1)
            if past is not None:
                hidden = self._llm(tok, mask, past)
            else:
                seq = torch.cat([seq, tok], dim=1)
                hidden = self._llm(seq, mask)[:, -k:]
            steps.append(hidden)  # (B, k, D)
            queries = self._next_queries(hidden[:, -1], move)
        text, text_mask = self.embed(text_layout.rest_ids), text_layout.rest_mask
        slots = torch.cat(steps, dim=1) if steps else seq.new_zeros(b, 1, seq.shape[-1])  # (B, T*k, D)
        lead_hidden = lead.hidden
        if rows is not None:
            slots, mask, seq, lead_hidden = slots[rows], mask[rows], seq[rows], lead_hidden[rows]
            if past is not None:
                past.batch_select_indices(rows)
        last_visual = slots[torch.arange(len(slots), device=slots.device), last_slot.clamp(min=0)]
        mask = torch.cat([mask, text_mask], dim=1)
        if past is not None:
            hidden = self._llm(text, mask, past)
        else:
            everything = self._llm(torch.cat([seq, text], dim=1), mask)
            lead_hidden, hidden = everything[:, : lead_hidden.shape[1]], everything[:, seq.shape[1] :]
        attention = torch.cat(attns, dim=1) if attns else None
        text_hidden = text_layout.text(lead_hidden, hidden)
        return Prefix(text_hidden, mask, past, attention, last_visual, framed, text_layout.cut)

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
        if labels is not None and not logits and not torch.compiler.is_compiling():  # compiled: the caller cuts
            keep = self.lead_columns(input_ids, attention_mask)
            input_ids, attention_mask, labels = through_labels(input_ids, attention_mask, labels, keep)
        if visual is None:
            visual = self.prepare(frames, frame_mask)
        weight = self.config.coarse_weight
        aux = bool(weight and labels is not None and rows is None and read["mode"] != "coarse_only")
        coarse_loss = None
        if aux and read["mode"] == "coarse_fine":
            pre = self.prefix(visual, input_ids, attention_mask, False, None, None, None, mode="coarse_only")
            nll, count = labelled_nll(self.lm_head, pre.hidden, labels, pre.last_visual, pre.framed, pre.cut)
            coarse_loss = nll.sum() / count.sum().clamp(min=1)
            visual = Glanced(visual.frame_mask, visual.features, visual.places, pre.frame_hidden)
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
