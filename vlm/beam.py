"""Beam search over any model that can advance its beams by one token, the way transformers' generate does it.

The model side is a `step(tokens, beams)` function: reorder its KV cache to the beams chosen (`beams` (B*K,),
indices into the current B*K rows) and feed one token per row (`tokens` (B*K,)), returning the next logits.
Everything else (scores, finished hypotheses, the length penalty, the early-stop heuristic, n-gram blocking and
the repetition penalty) is here, following transformers' vectorised beam search (5.x) step for step, so that for
a plain LLM the two give the same sequences: the top max(2, 1 + number of end ids) x K candidates of all beams,
the K best that did not end continue, the ones among the first K that ended (or reached the length limit) join the
K finished hypotheses, scored by summed log-probability / generated length ** length_penalty; the search stops
when no running beam can beat the worst finished one (early_stopping False) or every candidate has stopped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

NEG = -1.0e9


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, ...) gathered along N with index (B, M) -> (B, M, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def banned(sequences: list[list[int]], n: int) -> list[set[int]]:
    """Per sequence, the tokens that would repeat one of its n-grams (no_repeat_ngram_size)."""
    out = []
    for seq in sequences:
        if n < 1 or len(seq) < n:
            out.append(set())
            continue
        tail = tuple(seq[len(seq) - n + 1 :])
        out.append({seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == tail})
    return out


def seen(sequences: list[list[int]], vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, vocab) bool: which tokens each sequence holds. Ids past the vocabulary (a tokenizer's added tokens the
    LM head cannot write) are dropped, as transformers drops them: no score of theirs exists to penalise."""
    out = torch.zeros(len(sequences), vocab + 1, dtype=torch.bool, device=device)
    for row, seq in enumerate(sequences):
        if seq:
            out[row, torch.tensor(seq, device=device).clamp(max=vocab)] = True
    return out[:, :vocab]


def check_restraints(repetition_penalty: float, no_repeat_ngram_size: int) -> None:
    """Refuse settings transformers refuses too, before any model runs."""
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be positive (1.0 is off), not {repetition_penalty}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be 0 (off) or more, not {no_repeat_ngram_size}")


def restrain(
    scores: Tensor,
    sequences: list[list[int]],
    held: Tensor | None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> Tensor:
    """Next-token scores (N, V) of N sequences -> the scores generation picks from, under transformers' two rules
    against repeating (RepetitionPenaltyLogitsProcessor, then NoRepeatNGramLogitsProcessor), so that a greedy or
    beam decode here writes what transformers' generate writes with the same settings.

    CTRL's penalty: the score of every token already in the sequence (`held`, (N, V) bool from `seen`) is divided
    by the penalty where positive and multiplied by it where negative, so it always falls. No n-gram of
    `no_repeat_ngram_size` tokens (prompt included) appears twice: a token that would complete one gets -inf."""
    if repetition_penalty != 1.0:
        if held is None:
            raise ValueError("a repetition penalty needs the tokens each sequence holds")
        penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
        scores = torch.where(held, penalised, scores)
    if no_repeat_ngram_size:
        scores = scores.clone() if repetition_penalty == 1.0 else scores
        for row, tokens in enumerate(banned(sequences, no_repeat_ngram_size)):
            if tokens:
                scores[row, list(tokens)] = -float("inf")
    return scores


@torch.no_grad()
def beam_search(
    first_logits: Tensor,
    step: Callable[[Tensor, Tensor], Tensor],
    prompts: list[list[int]],
    num_beams: int,
    max_new_tokens: int,
    ends: list[int],
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    early_stopping: bool = False,
    repetition_penalty: float = 1.0,
) -> Tensor:
    """first_logits (B*K, V): each prompt's next-token logits, repeated for its K beams (row b*K + k). Returns the
    best hypothesis of each prompt (B, L <= max_new_tokens), padded with the first end id.

    The rules against repeating (`restrain`) act on the log-probabilities, where transformers' beam search applies
    its logits processors: a repetition penalty there multiplies every held token's (negative) log-probability."""
    bk, vocab = first_logits.shape
    k, device = num_beams, first_logits.device
    b = bk // k
    keep = max(2, 1 + len(ends)) * k
    end_ids = torch.tensor(ends, device=device)
    top_mask = torch.arange(keep, device=device) < k  # only the first K candidates may become hypotheses
    running = torch.zeros(b, k, device=device)
    running[:, 1:] = NEG  # all beams start equal: let only the first one expand
    generated = torch.full((b, k, max_new_tokens), ends[0], dtype=torch.long, device=device)  # running tokens
    finished = torch.full((b, k, max_new_tokens), ends[0], dtype=torch.long, device=device)
    finished_len = torch.zeros(b, k, dtype=torch.long, device=device)
    finished_scores = torch.full((b, k), NEG, device=device)
    is_finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    logits = first_logits
    restrained = repetition_penalty != 1.0 or no_repeat_ngram_size
    prompt_held = seen(prompts, vocab, device).repeat_interleave(k, dim=0) if repetition_penalty != 1.0 else None
    for t in range(max_new_tokens):
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        if restrained:
            flat = generated.view(bk, -1)[:, :t]
            held = None if prompt_held is None else prompt_held.scatter(1, flat, True)
            sequences = [prompts[r // k] + row for r, row in enumerate(flat.tolist())] if no_repeat_ngram_size else []
            log_probs = restrain(log_probs, sequences, held, repetition_penalty, no_repeat_ngram_size)
        scores = (log_probs.view(b, k, vocab) + running[:, :, None]).view(b, k * vocab)
        top_scores, top_index = torch.topk(scores, keep)  # (B, keep)
        source, token = top_index // vocab, top_index % vocab
        candidates = _gather(generated, source)  # (B, keep, max_new)
        candidates[:, :, t] = token
        stops = torch.isin(token, end_ids) | (t + 1 >= max_new_tokens)  # (B, keep)
        # the K best candidates that go on
        going = torch.topk(top_scores + stops.float() * NEG, k).indices  # (B, K)
        generated, running = _gather(candidates, going), _gather(top_scores + stops.float() * NEG, going)
        beams = _gather(source, going)  # (B, K): the running row each continues
        # the candidates among the first K that ended join the finished hypotheses if they are better
        ended = stops & top_mask[None]
        penalised = top_scores / ((t + 1) ** length_penalty)
        full = is_finished.all(-1, keepdim=True) & early_stopping
        penalised = penalised + full.float() * NEG + (~improvable).float() * NEG + (~ended).float() * NEG
        merged = torch.cat([finished_scores, penalised], dim=1)
        best = torch.topk(merged, k).indices
        finished = _gather(torch.cat([finished, candidates], dim=1), best)
        finished_len = _gather(torch.cat([finished_len, torch.full_like(token, t + 1)], dim=1), best)
        finished_scores = _gather(merged, best)
        is_finished = _gather(torch.cat([is_finished, ended], dim=1), best)
        # can a running beam still beat the worst finished hypothesis? (transformers' heuristic)
        best_running = running[:, :1] / ((t + 1) ** length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst).any(dim=-1, keepdim=True)
        if not improvable.any() or (is_finished.all() and early_stopping) or stops.all():
            break
        flat_beams = (beams + torch.arange(b, device=device)[:, None] * k).view(-1)
        logits = step(generated[:, :, t].reshape(-1), flat_beams)
    length = int(finished_len[:, 0].max())
    out = finished[:, 0, :length].clone()
    for row, n in enumerate(finished_len[:, 0].tolist()):
        out[row, n:] = ends[0]
    return out
