"""Generation and option scoring for every kind of model, continuing from the KV cache of its prefix.

`Decoding` is a part of the base VLM (base.py), kept apart because it is a concept of its own: what is done
with a prefix once the frames and the prompt have been read. It uses only the base's interface: `prefix`
(the LLM state after [frames, text], with its KV cache), `_llm` (one LLM call on that cache), `embed` and
`lm_head`. Greedy and beam-search generation (beam.py, with transformers' repetition penalty and n-gram blocking,
both off unless asked for) run on a growing KV cache or, for inference, on a
preallocated static one (kvcache.StaticKV: fixed shapes at every decode step, optionally torch.compile'd; kept by
the model across calls, so a compiled step is compiled and graphed once);
option scoring runs every question's prefix once, with the tokens all its options begin with, and the rest of
all its continuations as one batch on their caches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from inputs.tokenization import IGNORE_INDEX
from vlm.beam import beam_search, check_restraints, restrain, seen
from vlm.loss import head_nll
from vlm.outputs import Prefix, Visual


def shared_lead(continuations: list[list[int]], labels: list[list[int]]) -> int:
    """How many leading tokens (and labels) all of a question's continuations share, leaving each at least one."""
    pairs = [list(zip(c, y, strict=True)) for c, y in zip(continuations, labels, strict=True)]
    n = 0
    while n < min(map(len, pairs)) - 1 and all(p[n] == pairs[0][n] for p in pairs):
        n += 1
    return n


CACHES = ("dynamic", "static")  # generate's KV caches: growing, or preallocated (kvcache.StaticKV)


def _pad(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ids (n, L) with pad 0 and their mask (n, L)."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = 1
    return ids, mask


def _rows(input_ids: Tensor, attention_mask: Tensor) -> list[list[int]]:
    """Each right-padded prompt's real tokens."""
    return [row[: int(n)].tolist() for row, n in zip(input_ids, attention_mask.sum(1), strict=True)]


class Decoding:
    """Generation and scoring, mixed into the base VLM (see the module docstring)."""

    @torch.no_grad()
    def generate(
        self,
        visual: Visual,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int = 64,
        eos_token_id: int | list[int] | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        cache: str = "dynamic",
        compile: bool = False,
        repetition_penalty: float = 1.0,
        **read: Any,
    ) -> Tensor:
        """Continuation of right-padded prompts (B, L) -> new token ids (B, <= max_new_tokens), through the first
        end id; greedy, or beam search with `num_beams` > 1 (beam.py: the beams share each prompt's prefix, its
        KV cache repeated). Finished rows are filled with the first end id.

        `cache` "static" writes into a preallocated KV cache of at least prefix + max_new_tokens slots (the same
        tokens as "dynamic"), so every decode step has fixed shapes; `compile` then runs that step through
        torch.compile (CUDA graphs on a GPU). The static cache is the model's kept one for the length's bucket
        (kvcache.StaticKV.claim), emptied, not reallocated: later calls with the same batch shape and bucket reuse
        its buffers, so the first call compiles (and records the graph) and the later ones replay it.

        `repetition_penalty` (CTRL's rule: > 1 makes every token of the prompt or the reply so far less likely)
        and `no_repeat_ngram_size` (no n-gram of that many tokens, prompt included, twice) act on the scores as
        transformers' processors of the same names do, so its generate writes the same tokens; both are off by
        default, where the scores are not touched at all: benchmarks decode exactly as without them."""
        check_restraints(repetition_penalty, no_repeat_ngram_size)
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, not {cache!r}")
        if compile and cache != "static":
            raise ValueError("compile needs cache='static': only a static cache gives the decode step fixed shapes")
        room = max_new_tokens if cache == "static" else None
        pre = self.prefix(visual, input_ids, attention_mask, True, None, room, **read)
        ends = self._ends(eos_token_id, input_ids.device)
        last = attention_mask.long().sum(1) - 1  # last real prompt token of each row
        hidden = pre.hidden[torch.arange(len(last)), last]  # (B, D)
        if num_beams > 1:
            return self._beams(pre, hidden, input_ids, attention_mask, ends.tolist(), num_beams, max_new_tokens,
                               length_penalty, no_repeat_ngram_size, compile, repetition_penalty)  # fmt: skip
        restrained = repetition_penalty != 1.0 or no_repeat_ngram_size  # off: the scores as they come
        sequences = _rows(input_ids, attention_mask) if restrained else []
        mask, out, held = pre.mask, [], None
        done = torch.zeros_like(last, dtype=torch.bool)
        for _ in range(max_new_tokens):
            logits = self.lm_head(hidden)  # (B, V)
            if restrained:  # in fp32, as transformers processes the scores
                if held is None and repetition_penalty != 1.0:
                    held = seen(sequences, logits.shape[-1], logits.device)
                logits = restrain(logits.float(), sequences, held, repetition_penalty, no_repeat_ngram_size)
            token = logits.argmax(-1)  # (B,)
            token = torch.where(done, ends[0], token)
            out.append(token)
            if restrained:
                for row, t in zip(sequences, token.tolist(), strict=True):
                    row.append(t)
                if held is not None:
                    held[torch.arange(len(token), device=token.device), token] = True
            done |= torch.isin(token, ends)
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(len(token), 1)], dim=1)
            hidden = self._llm(self.embed(token)[:, None], mask, pre.past, compile)[:, -1]
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(len(input_ids), 0)

    def _beams(
        self,
        pre: Prefix,
        hidden: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        ends: list[int],
        k: int,
        max_new_tokens: int,
        length_penalty: float,
        no_repeat_ngram_size: int,
        compiled: bool = False,
        repetition_penalty: float = 1.0,
    ) -> Tensor:
        pre.past.batch_repeat_interleave(k)  # a StaticKV's too: then reordered in place
        mask = pre.mask.repeat_interleave(k, dim=0)  # (B*K, S)

        def step(tokens: Tensor, beams: Tensor) -> Tensor:
            nonlocal mask
            pre.past.reorder_cache(beams)
            mask = torch.cat([mask[beams], mask.new_ones(len(tokens), 1)], dim=1)
            return self.lm_head(self._llm(self.embed(tokens)[:, None], mask, pre.past, compiled)[:, -1])

        prompts = _rows(input_ids, attention_mask)
        first = self.lm_head(hidden).repeat_interleave(k, dim=0)
        return beam_search(first, step, prompts, k, max_new_tokens, ends, length_penalty, no_repeat_ngram_size,
                           repetition_penalty=repetition_penalty)  # fmt: skip

    def _ends(self, eos_token_id: int | list[int] | None, device: torch.device) -> Tensor:
        if eos_token_id is None:
            eos_token_id = getattr(self.llm.generation_config, "eos_token_id", None)
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            raise ValueError("generate needs eos_token_id: neither the LLM nor its tokenizer names one")
        return torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=device)

    def option_nll(
        self,
        visual: Visual,
        prompt: list[int],
        continuations: list[list[int]],
        labels: list[list[int]],
        mean: bool = True,
        **read: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """One question's `options_nll`: `visual` holds its one clip."""
        return self.options_nll(visual, [prompt], [continuations], [labels], mean, **read)

    @torch.inference_mode()
    def options_nll(
        self,
        visual: Visual,
        prompts: list[list[int]],
        continuations: list[list[list[int]]],
        labels: list[list[list[int]]],
        mean: bool = True,
        **read: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Mean NLL (N,) of each continuation's labelled tokens after its question's prefix [frames, prompt], the
        B questions' N continuations in order (with `mean=False`: their summed NLL and token counts, for a corpus
        perplexity). `visual` holds the B clips, question b reading clip b.

        The B prefixes run once, as one right-padded batch, each extended by the leading tokens all its
        continuations share ("The ball is" of "The ball is red." / "... blue."), which then run once rather than
        once per option; the rest of the continuations run as one batch on their KV caches, each row its
        question's, with positions counted over real tokens: what each would see alone. The LM head runs only
        where a label asks.
        """
        device = next(self.parameters()).device
        b = len(prompts)
        shared = [shared_lead(cs, ys) for cs, ys in zip(continuations, labels, strict=True)]  # leading tokens
        ids, prompt_mask = _pad(
            [p + cs[0][:k] for p, cs, k in zip(prompts, continuations, shared, strict=True)], device
        )
        pre = self.prefix(visual, ids, prompt_mask, True, None, **read)
        # prompt position j predicts token j+1; the continuation's first token is predicted by the prompt's last
        # position, or by the last frame slot where the prompt ends with the frames
        start = torch.tensor([len(p) - 1 for p in prompts], device=device)  # (B,)
        bridge = (start + 1 == pre.cut) & pre.framed
        ahead = pre.hidden.clone()  # (B, Lp, D): what each extended prompt's positions predict from
        ahead[bridge, start[bridge]] = pre.last_visual[bridge].to(ahead.dtype)
        # the shared tokens, once per question
        common, common_mask = _pad([ys[0][:k] for ys, k in zip(labels, shared, strict=True)], device)  # (B, K)
        common = common.masked_fill(common_mask == 0, IGNORE_INDEX)
        at = (start[:, None] + torch.arange(common.shape[1], device=device)).clamp(max=ahead.shape[1] - 1)  # (B, K)
        common_nll, common_count = head_nll(self.lm_head, ahead[torch.arange(b, device=device)[:, None], at], common)
        # the rest of each continuation: its first token from the extended prompt's last position, the others
        # from the continuation's own hidden states, run only up to the last token a label asks for
        rows = torch.repeat_interleave(
            torch.arange(b, device=device), torch.tensor([len(c) for c in continuations], device=device)
        )  # (N,)
        rest, rest_mask = _pad([c[k:] for cs, k in zip(continuations, shared, strict=True) for c in cs], device)
        target, _ = _pad([y[k:] for ys, k in zip(labels, shared, strict=True) for y in ys], device)
        target = target.masked_fill(rest_mask == 0, IGNORE_INDEX)  # (N, L): token i predicted from slot i
        asked = (target != IGNORE_INDEX).any(0).nonzero()
        run = int(asked[-1]) if len(asked) else 0  # the tokens whose outputs predict a labelled one
        slots = ahead[rows, prompt_mask.sum(1)[rows] - 1][:, None]  # (N, 1, D)
        if run:
            pre.past.batch_select_indices(rows)
            mask = torch.cat([pre.mask[rows], rest_mask[:, :run]], dim=1)  # (N, S + run)
            slots = torch.cat([slots, self._llm(self.embed(rest[:, :run]), mask, pre.past).to(slots.dtype)], dim=1)
        nll, count = head_nll(self.lm_head, slots, target[:, : run + 1])  # (N,), (N,)
        nll, count = nll + common_nll[rows], count + common_count[rows]
        return nll / count.clamp(min=1) if mean else (nll, count)
