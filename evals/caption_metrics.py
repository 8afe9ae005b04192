"""Caption scores from the libraries the field reports with, so numbers compare with published ones.

Each metric is the library's own computation; only the glue (reference layout, tokenisation, how several
references combine) is decided here, and every such choice is named in `score_captions`'s "tokenisation".
All scores are on coco-caption's scale: BLEU, ROUGE and token F1 in [0, 1], CIDEr-D in [0, 10].

- BLEU-1..4 (sacrebleu): corpus BLEU, cumulative up to order n (BP · geometric mean of p_1..p_n), one
  `BLEU(max_ngram_order=n)` per n. Lowercased, 13a tokenisation, no smoothing (coco-caption smooths
  nothing either; sacrebleu's default "exp" would lift a corpus with no 4-gram match above 0). sacrebleu
  takes references as streams (stream j = every image's j-th reference); an image with fewer references is
  padded with None, which sacrebleu skips. Padding with "" would count as a zero-length reference and
  move the closest reference length, hence the brevity penalty.
- ROUGE-1 / ROUGE-L F-measure (rouge-score, its default tokenizer, no stemmer): per caption the best
  F-measure over its references (`RougeScorer.score_multi`), then the mean over captions.
- CIDEr-D (pycocoevalcap's `Cider`, which is CIDEr-D despite its name: clipped tf-idf n-gram counts and
  a Gaussian length penalty, sigma 6, ×10). Its idf comes from the references of the images scored, so
  the score depends on the set: a single image scores 0 whatever it says (idf = log(1/1) for every
  n-gram). The PTB tokenizer coco-caption runs first needs Java; `caption_tokens` replaces it.
- token F1 (SQuAD's): normalised bag-of-tokens precision/recall per reference, best over references,
  mean over captions.
- perplexity: exp of the per-token mean NLL over the whole set, not a mean of per-caption perplexities.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import sacrebleu
from pycocoevalcap.cider.cider import Cider
from rouge_score import rouge_scorer

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
CAPTION_TOKENS = "lowercase, ASCII punctuation deleted, whitespace split"


def caption_tokens(text: str) -> list[str]:
    """Stand-in for coco-caption's PTB tokenizer (Java), applied alike to hypotheses and references."""
    return _PUNCT.sub("", text.lower()).split()


def _f1_tokens(text: str) -> list[str]:
    # SQuAD's normalize_answer: lowercase, delete punctuation, drop articles, split
    return _ARTICLES.sub(" ", _PUNCT.sub("", text.lower())).split()


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no captions to score")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
        if not isinstance(hyp, str):
            raise ValueError(f"hypotheses[{i}] is {type(hyp).__name__}, not a caption string")
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] is a string; expected a list of reference captions")
        if not refs:
            raise ValueError(f"references[{i}] is empty: every caption needs at least one reference")
        for j, r in enumerate(refs):
            if not caption_tokens(r):
                raise ValueError(f"references[{i}][{j}] = {r!r} has no words")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """{"bleu1".."bleu4": float in [0, 1], "signature": sacrebleu's signature of the BLEU-4 run}."""
    _check(hypotheses, references)
    width = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    out: dict[str, Any] = {}
    for n in range(1, 5):
        bleu = sacrebleu.BLEU(lowercase=True, tokenize="13a", smooth_method="none", max_ngram_order=n, force=True)
        out[f"bleu{n}"] = bleu.corpus_score(list(hypotheses), streams).score / 100.0
    out["signature"] = bleu.get_signature().format()
    return out


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"rouge1", "rougeL"}: mean over captions of the best F-measure over that caption's references."""
    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    best = [scorer.score_multi(list(refs), hyp) for hyp, refs in zip(hypotheses, references, strict=True)]
    return {k: sum(b[k].fmeasure for b in best) / len(best) for k in ("rouge1", "rougeL")}


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap's corpus CIDEr-D on `caption_tokens` of hypotheses and references."""
    _check(hypotheses, references)
    res = {i: [" ".join(caption_tokens(h))] for i, h in enumerate(hypotheses)}
    gts = {i: [" ".join(caption_tokens(r)) for r in refs] for i, refs in enumerate(references)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def token_f1(hypothesis: str, references: Sequence[str]) -> float:
    """SQuAD token F1 of one caption: best over its references (empty against empty counts as 1)."""
    pred = _f1_tokens(hypothesis)
    best = 0.0
    for ref in references:
        gold = _f1_tokens(ref)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(Σ NLL / Σ tokens) from per-caption summed teacher-forced NLL (nats) and target-token counts.

    Pooling tokens weights long captions by their length, as a language-model perplexity does; a mean of
    per-caption perplexities would let a few short captions dominate.
    """
    if len(nll_sums) != len(token_counts):
        raise ValueError(f"{len(nll_sums)} NLL sums but {len(token_counts)} token counts")
    if any(int(c) < 0 for c in token_counts):
        raise ValueError("token counts must be non-negative")
    total = sum(int(c) for c in token_counts)
    if total == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return math.exp(sum(float(x) for x in nll_sums) / total)


def score_captions(hypotheses: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> dict[str, Any]:
    """Every caption metric for {id: generated caption} against {id: [reference captions]}.

    Returns bleu1..bleu4, rouge1, rougeL, cider_d, token_f1 (floats, coco-caption's scale), num_images and
    "tokenisation": {metric: how its text was tokenised}. Perplexity needs the model's NLLs: `perplexity`.
    """
    missing, extra = set(references) - set(hypotheses), set(hypotheses) - set(references)
    if missing or extra:
        raise ValueError(
            f"hypothesis and reference ids differ: {len(missing)} ids without a hypothesis (e.g. "
            f"{sorted(map(str, missing))[:3]}), {len(extra)} without references (e.g. {sorted(map(str, extra))[:3]})"
        )
    ids = list(hypotheses)
    hyps = [hypotheses[i] for i in ids]
    refs = []
    for i in ids:
        r = references[i]
        if isinstance(r, str) or not r:
            raise ValueError(f"id {i!r}: references must be a non-empty list of captions, got {r!r}")
        if blank := [c for c in r if not caption_tokens(c)]:
            raise ValueError(f"id {i!r}: reference {blank[0]!r} has no words")
        refs.append(list(r))
    _check(hyps, refs)  # what is left to catch: non-string hypotheses, an empty set
    bleu = corpus_bleu(hyps, refs)
    out: dict[str, Any] = {f"bleu{n}": bleu[f"bleu{n}"] for n in range(1, 5)}
    out.update(rouge(hyps, refs))
    out["cider_d"] = cider_d(hyps, refs)
    out["token_f1"] = sum(token_f1(h, r) for h, r in zip(hyps, refs, strict=True)) / len(hyps)
    out["num_images"] = len(ids)
    out["tokenisation"] = {
        "bleu": f"sacrebleu {bleu['signature']}; cumulative BLEU-n, fewer references padded with None",
        "rouge": "rouge-score default tokenizer: lowercase, runs of non-[a-z0-9] as spaces, no stemmer; "
        "best F over references, mean over captions",
        "cider_d": f"{CAPTION_TOKENS} (in place of coco-caption's Java PTB tokenizer); idf from this set's references",
        "token_f1": f"SQuAD normalisation: {CAPTION_TOKENS}, articles a/an/the dropped; best over references",
    }
    return out
