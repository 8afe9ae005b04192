"""The sequence layout: which text goes before a clip's frames, and how the LLM's states map back to text columns.

The LLM reads [lead] [frame slots: T x S] [rest of the text]. The lead is
- empty with `frames_at: start` (the published layout);
- the chat template's opening up to the first user turn's content with `frames_at: user_turn`: the same tokens
  in every row (the head), so its LLM state is computed once and shared;
- with `frames_at: after_question`, the opening and the first user turn's words, different in every row. Rows are
  left-padded to the longest lead, so each row's last lead column is its last word (where a read that depends on
  the question takes it from) and the frames start at one column for all rows. The rest, from the end of that
  user turn on, stays right-padded.
Padding is masked and positions are the running count of real tokens (base.positions), so a row padded inside a
batch sees the keys and positions it would see alone. Callers keep their text right-padded as ever: the layout
moves columns for the LLM and `text` moves its hidden states back, so logits and labels stay aligned with the
caller's `input_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from vlm.kvcache import kv_layer


@dataclass
class Layout:
    """One batch's text cut at the frames."""

    lead_ids: Tensor  # (R, P) the text before the frames (left-padded when rows differ)
    lead_mask: Tensor  # (R, P) long
    rest_ids: Tensor  # (R, L') the text after them, right-padded
    rest_mask: Tensor  # (R, L') long
    cut: Tensor  # (R,) each row's text column of the first token after the frames
    back: Tensor | None  # (R, L): the column of [lead, rest] holding each text column (None: they are in order)
    shared: bool  # every row's lead is the head, the same tokens: its state is computed once for all rows

    def text(self, lead_hidden: Tensor, rest_hidden: Tensor) -> Tensor:
        """The LLM's states over [lead, rest] (R, P + L', D) -> at the caller's text columns (R, L, D)."""
        both = torch.cat([lead_hidden.to(rest_hidden.dtype), rest_hidden], dim=1)
        if self.back is None:
            return both
        return both.gather(1, self.back[..., None].expand(-1, -1, both.shape[-1]))

    def select(self, rows: Tensor) -> Layout:
        """The layout of rows `rows` only."""
        back = None if self.back is None else self.back[rows]
        return Layout(self.lead_ids[rows], self.lead_mask[rows], self.rest_ids[rows], self.rest_mask[rows],
                      self.cut[rows], back, self.shared)  # fmt: skip


def head_first(input_ids: Tensor, attention_mask: Tensor, h: int) -> Layout:
    """The layouts whose lead is the head (the first `h` columns of every row, the same tokens)."""
    cut = torch.full((len(input_ids),), h, dtype=torch.long, device=input_ids.device)
    mask = attention_mask.long()
    return Layout(input_ids[:, :h], mask[:, :h], input_ids[:, h:], mask[:, h:], cut, None, True)


def question_splits(input_ids: Tensor, attention_mask: Tensor, h: int, end_id: int) -> Tensor:
    """(R,) each row's column of the first user turn's end-of-turn token: the first `end_id` at or after the head
    (`h` columns, the template's opening, whose system message ends with the same token)."""
    ends = (input_ids == end_id) & attention_mask.bool()
    ends[:, :h] = False
    found = ends.any(1)
    if not torch.compiler.is_compiling() and not bool(found.all()):  # a host sync: compiled, lead_columns checked it
        row = int((~found).nonzero()[0, 0])
        raise ValueError(
            f"model.frames_at is 'after_question': text row {row} has no end of its first user turn (token "
            f"{end_id}) after the chat template's opening; tokenise it with tokenization.py's chat functions"
        )
    return ends.long().argmax(1)


def question_first(input_ids: Tensor, attention_mask: Tensor, cut: Tensor) -> Layout:
    """The layout that puts each row's frames before its text column `cut` (R,): the lead left-padded."""
    r, length = input_ids.shape
    device = input_ids.device
    p = int(cut.max()) if r else 0  # compiled: read from the data, symbolic sizes (base.COMPILE_OPTIONS)
    low = int(cut.min()) if r else 0
    if torch.compiler.is_compiling():
        # what the compiler must know of them, since transformers' attention branches on a length of 1: the lead
        # and the rest are 2 columns or more (a chat template's opening; the end of the turn and what follows)
        torch._check(1 < low)
        torch._check(low <= p)
        torch._check(low + 1 < length)
    rest = length - low
    mask = attention_mask.long()
    col = torch.arange(p, device=device) - (p - cut)[:, None]  # (R, P): text column of each lead column
    lead_in = col >= 0
    col = col.clamp(min=0)
    lead_ids = input_ids.gather(1, col).masked_fill(~lead_in, 0)
    lead_mask = mask.gather(1, col) * lead_in
    col = cut[:, None] + torch.arange(rest, device=device)  # (R, L'): text column of each rest column
    rest_in = col < length
    col = col.clamp(max=length - 1)
    rest_ids = input_ids.gather(1, col).masked_fill(~rest_in, 0)
    rest_mask = mask.gather(1, col) * rest_in
    text = torch.arange(length, device=device)[None]  # (1, L)
    back = torch.where(text < cut[:, None], text + (p - cut)[:, None], p + text - cut[:, None])
    return Layout(lead_ids, lead_mask, rest_ids, rest_mask, cut, back, False)


@dataclass
class Lead:
    """The LLM's state over each row's lead: where the frames' reads and the text after them continue from."""

    hidden: Tensor  # (R, P, D) final-norm hidden states
    mask: Tensor  # (R, P)
    kv: list[tuple[Tensor, Tensor]]  # per layer keys and values (R, H_kv, P, hd); empty for an empty lead
    guided: bool  # the lead holds each row's question: a read may be written from it

    @staticmethod
    def empty(rows: int, width: int, device: torch.device) -> Lead:
        """No text before the frames (frames_at start), for `rows` rows of an LLM of hidden size `width`."""
        return Lead(torch.zeros(rows, 0, width, device=device), torch.zeros(rows, 0, dtype=torch.long, device=device),
                    [], False)  # fmt: skip

    def open(self, past: DynamicCache | None = None) -> DynamicCache | None:
        """A DynamicCache (`past`, filled, or a new one) holding the lead's keys and values; the lead's own tensors
        are left as they are (the calls that continue concatenate onto them). None for an empty lead and no
        `past`."""
        if not self.kv:
            return past
        past = DynamicCache() if past is None else past
        past.layers = [kv_layer(k, v) for k, v in self.kv]
        return past

    def select(self, rows: Tensor) -> Lead:
        kv = [(k[rows], v[rows]) for k, v in self.kv]
        return Lead(self.hidden[rows], self.mask[rows], kv, self.guided)


def clip_rows(rows: Tensor | None, clips: int, lead_ids: Tensor) -> Tensor | None:
    """For text rows reading shared clips (`rows` (R,): each row's clip), the first row of each of the `clips`
    clips, whose lead stands for every row of that clip; the leads of one clip's rows must be the same (DPO's
    chosen and rejected answers follow one question), since a read written from the question is made once per clip.
    None when each row reads its own clip."""
    if rows is None:
        return None
    order = torch.arange(len(rows), device=rows.device)
    first = torch.full((clips,), len(rows), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, rows, order, "amin").clamp(max=max(len(rows) - 1, 0))
    # a host sync, left out of a compiled step (DPO's pairs share their prompt by construction: loss.pair_batch)
    if not torch.compiler.is_compiling() and not torch.equal(lead_ids, lead_ids[first[rows]]):
        raise ValueError("text rows reading one clip must ask the same question when the frames follow it")
    return first
