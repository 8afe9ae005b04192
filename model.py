"""FoveatedVLM: one visual token per frame per glimpse, with the LLM choosing where to look next.

Sequence layout, for every mode: [head] [frame tokens (T_max * k slots)] [rest of the text (padded)],
padded slots masked out. The head is empty with `frames_at: start` (the published layout: frames before
all text); with `frames_at: user_turn` it is the chat template's opening up to the first user turn's
content, which every text row must start with. A pretrained chat LLM reads what stands inside a user
turn but all but ignores what precedes its template, so a frozen or briefly trained LLM learns to use
the frames far sooner there. Positions are the running count of real tokens, so a sample padded inside
a batch sees exactly the keys and positions it would see alone.

All I/O (backbone weights, save/load) lives in `weights.py` and `checkpoint.py`; the classmethods
at the bottom are entry points into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from config import ModelConfig
from encoder import FoveatedEncoder, PatchCache
from frames import FrameSpec
from kvcache import StepCache
from tokenization import user_turn_head

MODES = ("coarse_only", "coarse_fine", "autoregressive")
IGNORE_INDEX = -100


@dataclass
class FVLMOutput:
    logits: Tensor  # (R, L, vocab) at the text positions
    loss: Tensor | None = None  # mean over every labelled token of the batch
    nll: Tensor | None = None  # (R,) summed negative log-likelihood of each row's labelled tokens
    count: Tensor | None = None  # (R,) labelled tokens per row
    attention: Tensor | None = None  # (B, T, k, 1+P) the final read's attention over [CLS, patches]


@dataclass
class Prefix:
    """The LLM state after [frames, text]: what generation and option scoring continue from."""

    hidden: Tensor  # (R, L, D) final-norm hidden states at the text positions
    mask: Tensor  # (R, S) attention mask of everything in `past`
    past: DynamicCache | None
    attention: Tensor | None  # (B, T, k, 1+P)
    last_visual: Tensor  # (R, D) hidden state at each row's last real frame slot (meaningless for rows without)
    framed: Tensor  # (R,) bool: the row's clip has at least one frame
    cut: int  # text position right after the frames: tokens before it are the head


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample summed negative log-likelihood of the labelled tokens, and their count: (B,), (B,).
    Position j of `logits` (B, L, V) predicts token j+1 of `labels` (B, L)."""
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target.clamp(min=0), reduction="none")  # (B, L-1)
    keep = target != IGNORE_INDEX
    return (nll * keep).sum(1), keep.sum(1)


def sequence_nll(logits: Tensor, labels: Tensor, bridge: Tensor, framed: Tensor, cut: int) -> tuple[Tensor, Tensor]:
    """`token_nll` over text that the LLM read as [text[:cut], frame slots, text[cut:]]: every token is predicted
    from the position just before it in that sequence, so in a row with frames text[cut] is predicted by the last
    frame slot (`bridge` (R, V), its logits) rather than by text[cut-1]; the slots themselves predict nothing."""
    main = labels
    if cut < labels.shape[1]:
        main = labels.clone()
        main[framed, cut] = IGNORE_INDEX
    nll, count = token_nll(logits, main)
    if cut < labels.shape[1]:
        target = labels[:, cut]
        keep = framed & (target != IGNORE_INDEX)
        first = F.cross_entropy(bridge.float(), target.clamp(min=0), reduction="none")  # (R,)
        nll, count = nll + first * keep, count + keep
    return nll, count


def _positions(mask: Tensor, new: int) -> Tensor:
    """Position ids of the last `new` slots: the count of real tokens before each slot."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]


class FoveatedVLM(nn.Module):
    def __init__(
        self, config: ModelConfig, dino: nn.Module, llm: nn.Module, tokenizer=None, frames: FrameSpec | None = None
    ):
        super().__init__()
        self.config = config
        self.encoder = FoveatedEncoder(dino, config.query_dim, config.deep_query)
        self.llm = llm
        self.tokenizer = tokenizer  # not a module: carried so generation and saving find it
        self.frames = frames or FrameSpec()  # how clips are fed to the model; saved with it
        k, dq, d_llm = config.glimpses, config.query_dim, llm.config.hidden_size
        self.dino_to_llm = nn.Linear(self.encoder.dim, d_llm)
        self.llm_to_query = nn.Linear(d_llm, k * dq)
        # std 1.0: with 0.02 the query's attention starts uniform and never learns to look
        self.q_static = nn.Parameter(torch.randn(k, dq))
        self.q_init = nn.Parameter(torch.randn(k, dq))
        if config.frames_at == "user_turn" and tokenizer is None:
            raise ValueError("model.frames_at 'user_turn' needs the tokenizer, whose chat template places the frames")
        head = user_turn_head(tokenizer) if config.frames_at == "user_turn" else []
        self.register_buffer("head_ids", torch.tensor(head, dtype=torch.long), persistent=False)  # (H,)

    def checkpoint_activations(self) -> None:
        """Recompute activations in backward instead of keeping them: DINO layer by layer, the LLM through
        transformers' checkpointed layers, told to keep the KV cache since every call that feeds one writes
        through a replay-safe StepCache (without it the autoregressive loop's text would not see the frames)."""
        self.encoder.gradient_checkpointing = True
        self.llm.activation_checkpointing_enable({"use_reentrant": False})
        for layer in self.llm.get_decoder().layers:
            layer._can_checkpoint_with_cache = True

    # ---- visual side -------------------------------------------------------------------

    def encode(self, frames: Tensor, frame_mask: Tensor) -> PatchCache:
        """frames (B, T, 3, H, W), frame_mask (B, T) -> cache of the real frames, time-major.

        Time-major order (all frames at t=0, then t=1, ...) lets the autoregressive loop take
        each step's frames as a contiguous slice of the cache.
        """
        return self.encoder.encode_patches(frames.transpose(0, 1)[frame_mask.T])

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
        return tokens.transpose(0, 1).reshape(b, t * k, tok.shape[-1]), attention.transpose(0, 1)

    def _next_queries(self, hidden: Tensor) -> Tensor:
        """hidden (B, D_llm) at a frame's last token -> the k queries for the next frame (B, 1, k, Dq)."""
        return self.llm_to_query(hidden).view(hidden.shape[0], 1, *self.q_init.shape)

    def _slot_mask(self, frame_mask: Tensor) -> Tensor:
        return frame_mask.repeat_interleave(self.config.glimpses, dim=1).long()  # (B, T*k)

    def _last_slot(self, frame_mask: Tensor) -> Tensor:
        """(B,) index among the T*k frame slots of each clip's last real slot (-1 for a clip without frames)."""
        b, t = frame_mask.shape
        if t == 0:
            return frame_mask.new_full((b,), -1, dtype=torch.long)
        last_frame = (frame_mask.long() * torch.arange(1, t + 1, device=frame_mask.device)).amax(1) - 1
        return torch.where(last_frame >= 0, last_frame * self.config.glimpses + self.config.glimpses - 1, -1)

    def _head(self, b: int) -> Tensor:
        """(b, H, D) embeddings of the text that goes before the frames (empty with frames_at start)."""
        return self.llm.get_input_embeddings()(self.head_ids)[None].expand(b, -1, -1)

    def _llm(self, embeds: Tensor, mask: Tensor, past: DynamicCache | None = None) -> Tensor:
        """Run the decoder over `embeds` (B, S_new, D), `mask` covering past + new; final-norm hidden states.

        With `past`, the call writes through a StepCache, so activation checkpointing can replay it."""
        step = StepCache(past) if past is not None else None
        out = self.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=_positions(mask, embeds.shape[1]),
            past_key_values=step,
            use_cache=step is not None,
        )
        if step is not None:
            step.commit(past)
        return out.last_hidden_state

    def visual_tokens(self, cache: PatchCache, frame_mask: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        """Parallel modes: tokens (B, T*k, D_llm) and attention (B, T, k, 1+P) of the final read."""
        b, t = frame_mask.shape
        coarse, attn = self._read(cache, self.q_static.expand(b, t, *self.q_static.shape), frame_mask)
        if mode == "coarse_only" or t == 0:
            return coarse, attn
        # pass 1: under causal attention the text after the frames cannot influence the visual positions,
        # so the LLM over [head, coarse tokens] alone gives each frame's query for the next frame
        head = self._head(b)
        h = head.shape[1]
        mask = torch.cat([frame_mask.new_ones(b, h, dtype=torch.long), self._slot_mask(frame_mask)], dim=1)
        hidden = self._llm(torch.cat([head, coarse], dim=1), mask)[:, h:]  # (B, T*k, D)
        last = hidden.view(b, t, self.config.glimpses, -1)[:, :-1, -1]  # (B, T-1, D)
        q_next = self.llm_to_query(last).view(b, t - 1, *self.q_init.shape)
        queries = torch.cat([self.q_init.expand(b, 1, *self.q_init.shape), q_next], dim=1)  # (B, T, k, Dq)
        return self._read(cache, queries, frame_mask)

    # ---- sequence ----------------------------------------------------------------------

    def prefix(
        self,
        cache: PatchCache,
        frame_mask: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        mode: str = "coarse_fine",
        kv_cache: bool = False,
        rows: Tensor | None = None,
    ) -> Prefix:
        """Run the LLM over [frame tokens, text]; `kv_cache` keeps its state for continuing.

        `rows` (R,) names the clip of each text row (default: row i reads clip i): several texts about one
        clip (DPO's chosen and rejected answers) share its encoding and its read, which the text cannot change.
        """
        if mode not in MODES:
            raise ValueError(f"unknown forward mode '{mode}'; expected one of {MODES}")
        h = self._head_length(input_ids, attention_mask)
        embeds = self.llm.get_input_embeddings()(input_ids)  # (R, L, D)
        text, text_mask = embeds[:, h:], attention_mask[:, h:].long()
        past = DynamicCache() if kv_cache else None
        framed, last_slot = frame_mask.any(1), self._last_slot(frame_mask)  # (B,), (B,)
        if rows is not None:
            framed, last_slot = framed[rows], last_slot[rows]
        if mode == "autoregressive":
            return self._autoregressive(cache, frame_mask, rows, text, text_mask, past, framed, last_slot)
        vis, attn = self.visual_tokens(cache, frame_mask, mode)
        slots = self._slot_mask(frame_mask)
        if rows is not None:
            vis, slots = vis[rows], slots[rows]
        mask = torch.cat([attention_mask[:, :h].long(), slots, text_mask], dim=1)
        hidden = self._llm(torch.cat([embeds[:, :h], vis, text], dim=1), mask, past)
        last_visual = hidden[torch.arange(len(hidden), device=hidden.device), h + last_slot.clamp(min=0)]
        text_hidden = torch.cat([hidden[:, :h], hidden[:, h + vis.shape[1] :]], dim=1)
        return Prefix(text_hidden, mask, past, attn, last_visual, framed, h)

    def _head_length(self, input_ids: Tensor, attention_mask: Tensor) -> int:
        """H, the number of leading text tokens that go before the frames: every row must start with them."""
        h = len(self.head_ids)
        if h and not (
            input_ids.shape[1] >= h and (input_ids[:, :h] == self.head_ids).all() and attention_mask[:, :h].all()
        ):
            raise ValueError(
                "model.frames_at is 'user_turn': every text must open with the chat template's first user turn "
                f"({self.tokenizer.decode(self.head_ids)!r}); tokenise it with tokenization.py's chat functions"
            )
        return h

    def _autoregressive(
        self,
        cache: PatchCache,
        frame_mask: Tensor,
        rows: Tensor | None,
        text: Tensor,
        text_mask: Tensor,
        past: DynamicCache | None,
        framed: Tensor,
        last_slot: Tensor,
    ) -> Prefix:
        """After the head, frame t is read with the query from the fine tokens of frames < t, one LLM step per
        frame (over the B clips); then the `text` (R, L', D) of every row.

        With `past` the LLM advances on its KV cache; without, every step reruns the whole
        sequence so far (the reference the cache must match).
        """
        b, t = frame_mask.shape
        k, head = self.config.glimpses, self._head(b)
        h = head.shape[1]
        counts = frame_mask.sum(0).tolist()  # real frames at each step, contiguous in the cache
        mask = frame_mask.new_ones(b, h, dtype=torch.long)
        seq = head  # (B, S, D), only needed without cache
        head_hidden = self._llm(head, mask, past) if past is not None and h else head[:, :0]
        queries = self.q_init.expand(b, 1, *self.q_init.shape)
        start, attns, steps = 0, [], []
        for step in range(t):
            step_cache = cache.narrow(start, counts[step])
            start += counts[step]
            tok, attn = self._read(step_cache, queries, frame_mask[:, step : step + 1])  # (B, k, D)
            attns.append(attn)
            mask = torch.cat([mask, self._slot_mask(frame_mask[:, step : step + 1])], dim=1)
            if past is not None:
                hidden = self._llm(tok, mask, past)
            else:
                seq = torch.cat([seq, tok], dim=1)
                hidden = self._llm(seq, mask)[:, -k:]
            steps.append(hidden)  # (B, k, D)
            queries = self._next_queries(hidden[:, -1])
        visual = torch.cat(steps, dim=1) if steps else head.new_zeros(b, 1, head.shape[-1])  # (B, T*k, D)
        if rows is not None:
            visual, mask, seq, head_hidden = visual[rows], mask[rows], seq[rows], head_hidden[rows]
            if past is not None:
                past.batch_select_indices(rows)
        last_visual = visual[torch.arange(len(visual), device=visual.device), last_slot.clamp(min=0)]
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
        mode: str = "coarse_fine",
        cache: PatchCache | None = None,
        rows: Tensor | None = None,
    ) -> FVLMOutput:
        """frames (B, T, 3, H, W), frame_mask (B, T) bool, input_ids/attention_mask/labels (R, L); `rows` (R,)
        the clip each text row reads (default R = B, row i reads clip i).

        A precomputed `cache` (from `encode`) lets several modes or options share one DINO pass.
        """
        if cache is None:
            cache = self.encode(frames, frame_mask)
        pre = self.prefix(cache, frame_mask, input_ids, attention_mask, mode, mode == "autoregressive", rows)
        head = self.llm.get_output_embeddings()
        logits = head(pre.hidden)
        if labels is None:
            return FVLMOutput(logits=logits, attention=pre.attention)
        nll, count = sequence_nll(logits, labels, head(pre.last_visual), pre.framed, pre.cut)
        loss = nll.sum() / count.sum().clamp(min=1)
        return FVLMOutput(logits=logits, loss=loss, nll=nll, count=count, attention=pre.attention)

    @torch.no_grad()
    def generate(
        self,
        frames: Tensor,
        frame_mask: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        mode: str = "autoregressive",
        max_new_tokens: int = 64,
        eos_token_id: int | list[int] | None = None,
        cache: PatchCache | None = None,
    ) -> Tensor:
        """Greedy continuation of right-padded prompts (B, L) -> new token ids (B, <= max_new_tokens).

        Finished rows are filled with the first end id; generation stops when every row has ended.
        """
        if cache is None:
            cache = self.encode(frames, frame_mask)
        pre = self.prefix(cache, frame_mask, input_ids, attention_mask, mode, kv_cache=True)
        if eos_token_id is None:
            eos_token_id = self.llm.generation_config.eos_token_id
        if eos_token_id is None:
            raise ValueError("generate needs eos_token_id: the LLM's generation config names none")
        ends = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=input_ids.device)
        last = attention_mask.long().sum(1) - 1  # last real prompt token of each row
        hidden = pre.hidden[torch.arange(len(last)), last]  # (B, D)
        head, embed = self.llm.get_output_embeddings(), self.llm.get_input_embeddings()
        mask, out = pre.mask, []
        done = torch.zeros_like(last, dtype=torch.bool)
        for _ in range(max_new_tokens):
            token = head(hidden).argmax(-1)  # (B,)
            token = torch.where(done, ends[0], token)
            out.append(token)
            done |= torch.isin(token, ends)
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(len(token), 1)], dim=1)
            hidden = self._llm(embed(token)[:, None], mask, pre.past)[:, -1]
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(len(input_ids), 0)

    # ---- entry points into weights.py / checkpoint.py (the I/O lives there) -------------

    @classmethod
    def from_backbones(cls, config: ModelConfig | None = None) -> FoveatedVLM:
        """A new model around pretrained DINOv2 + LLM (hub ids, local dirs, or "packaged")."""
        import weights

        config = config or ModelConfig()
        return cls(
            config, weights.load_dino(config.dino), weights.load_llm(config.llm), weights.load_tokenizer(config.llm)
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FoveatedVLM:
        import checkpoint

        return checkpoint.load_model(path)

    def save_pretrained(self, path: str | Path) -> None:
        import checkpoint

        checkpoint.save_model(self, path)
