"""Caption metrics against the libraries' own outputs, and exact values on hand-checked cases."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from pycocoevalcap.cider.cider import Cider
from rouge_score import rouge_scorer

from evals import caption_metrics as cm

HYPS = ["A dog runs across the grass.", "Two men are playing guitars on a stage", "a child in a red shirt"]
REFS = [
    ["A brown dog is running through the grass .", "The dog runs on a lawn.", "A dog running outside."],
    ["Two musicians play guitar on stage.", "Men playing guitars at a concert."],  # fewer references
    ["A little girl wearing a red shirt smiles.", "A child in red.", "A kid in a red top stands in a park."],
]


def _bleu(n: int, hyps: list[str], streams: list[list[str | None]]) -> float:
    bleu = sacrebleu.BLEU(lowercase=True, tokenize="13a", smooth_method="none", max_ngram_order=n)
    return bleu.corpus_score(hyps, streams).score / 100


def test_bleu_equals_sacrebleu_with_references_as_none_padded_streams():
    streams = [[r[0] for r in REFS], [r[1] for r in REFS], [REFS[0][2], None, REFS[2][2]]]
    got = cm.corpus_bleu(HYPS, REFS)
    for n in range(1, 5):
        assert got[f"bleu{n}"] == pytest.approx(_bleu(n, HYPS, streams), abs=1e-12)
    assert got["bleu4"] == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, streams, lowercase=True, smooth_method="none").score / 100, abs=1e-12
    )
    assert "tok:13a" in got["signature"] and "nrefs:var" in got["signature"] and "case:lc" in got["signature"]


def test_bleu_one_image_equals_sacrebleu_sentence_score():
    bleu = sacrebleu.BLEU(lowercase=True, smooth_method="none")
    assert cm.corpus_bleu(HYPS[:1], REFS[:1])["bleu4"] == pytest.approx(
        bleu.sentence_score(HYPS[0], REFS[0]).score / 100, abs=1e-12
    )


def test_bleu_padding_with_empty_string_would_change_the_brevity_penalty():
    # why the padding is None: "" is a zero-length reference, closest to a short hypothesis, so BP becomes 1
    hyps, refs = ["a dog", "a man rides a horse"], [["a dog runs in a big park"], ["a man rides a horse", "a man"]]
    padded_empty = [["a dog runs in a big park", "a man rides a horse"], ["", "a man"]]
    assert _bleu(1, hyps, padded_empty) == pytest.approx(1.0)
    # hand-checked: 7 of 7 unigrams match; closest reference lengths 7 and 5, so BP = exp(1 - 12 / 7)
    assert cm.corpus_bleu(hyps, refs)["bleu1"] == pytest.approx(math.exp(1 - 12 / 7))


def test_bleu_hand_checked():
    assert cm.corpus_bleu(["The cat sat on the mat."], [["the cat sat on the mat ."]])["bleu4"] == pytest.approx(1.0)
    disjoint = cm.corpus_bleu(["red car"], [["a dog runs"]])
    assert [disjoint[f"bleu{n}"] for n in range(1, 5)] == [0.0] * 4
    # "the cat sat" against a 6-word reference: every n-gram matches, BP = exp(1 - 6/3); no 4-gram -> BLEU-4 0
    got = cm.corpus_bleu(["the cat sat"], [["the cat sat on the mat"]])
    assert got["bleu1"] == pytest.approx(math.exp(-1)) and got["bleu3"] == pytest.approx(math.exp(-1))
    assert got["bleu4"] == 0.0


def test_rouge_equals_rouge_score_best_over_references_then_mean():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    got = cm.rouge(HYPS, REFS)
    for key in ("rouge1", "rougeL"):
        per_caption = [max(scorer.score(r, h)[key].fmeasure for r in refs) for h, refs in zip(HYPS, REFS, strict=True)]
        assert got[key] == pytest.approx(sum(per_caption) / len(per_caption), abs=1e-12)


def test_rouge_hand_checked():
    # "a cat" in "a cat sat": P 1, R 2/3, F 0.8; the other reference shares nothing
    assert cm.rouge(["a cat"], [["dogs bark", "a cat sat"]]) == pytest.approx({"rouge1": 0.8, "rougeL": 0.8})
    assert cm.rouge(["the cat sat"], [["sat the cat"]])["rouge1"] == pytest.approx(1.0)
    assert cm.rouge(["the cat sat"], [["sat the cat"]])["rougeL"] == pytest.approx(2 / 3)  # LCS "the cat"
    assert cm.rouge(["red car"], [["a dog"]]) == {"rouge1": 0.0, "rougeL": 0.0}


def test_cider_equals_pycocoevalcap_on_the_same_tokens():
    gts = {i: [" ".join(cm.caption_tokens(r)) for r in refs] for i, refs in enumerate(REFS)}
    res = {i: [" ".join(cm.caption_tokens(h))] for i, h in enumerate(HYPS)}
    expected, _ = Cider().compute_score(gts, res)
    assert cm.cider_d(HYPS, REFS) == pytest.approx(expected, abs=1e-12)
    assert cm.caption_tokens("A dog's T-shirt, red.") == ["a", "dogs", "tshirt", "red"]


def test_cider_hand_checked():
    # identical captions of >= 4 words with no n-gram shared across images: cosine 1 at every order, x10
    assert cm.cider_d(["a dog runs fast", "two men play guitar"], [["a dog runs fast"], ["two men play guitar"]]) == (
        pytest.approx(10.0)
    )
    # a 2-word caption has no 3- or 4-grams: those orders add 0 to the mean over n = 1..4, even when identical
    assert cm.cider_d(["a dog runs fast", "red car"], [["a dog runs fast"], ["red car"]]) == pytest.approx(7.5)
    assert cm.cider_d(["red car", "blue sky"], [["a dog"], ["two men"]]) == 0.0
    # idf comes from the scored set: one image alone gives every n-gram idf log(1/1) = 0
    assert cm.cider_d(["a dog runs fast"], [["a dog runs fast"]]) == 0.0


def test_token_f1_hand_checked():
    assert cm.token_f1("A red car.", ["the red car parked", "a blue bus"]) == pytest.approx(0.8)  # P 1, R 2/3
    assert cm.token_f1("The Dog!", ["a dog"]) == 1.0  # articles and punctuation normalised away
    assert cm.token_f1("red car", ["a dog"]) == 0.0
    assert cm.token_f1("", ["a dog"]) == 0.0
    assert cm.token_f1("the", ["a"]) == 1.0  # both normalise to nothing (SQuAD: empty == empty)
    assert cm.token_f1("dog dog dog", ["dog"]) == pytest.approx(0.5)  # bag of tokens: P 1/3, R 1


def test_perplexity_is_exp_of_the_per_token_mean():
    token_nlls = [[0.5, 1.0], [2.0, 0.1, 0.3], [4.0]]
    flat = [x for c in token_nlls for x in c]
    expected = math.exp(sum(flat) / len(flat))
    assert cm.perplexity([sum(c) for c in token_nlls], [len(c) for c in token_nlls]) == pytest.approx(expected)
    assert cm.perplexity([0.0], [3]) == 1.0
    with pytest.raises(ValueError, match="token counts"):
        cm.perplexity([1.0, 2.0], [3])
    with pytest.raises(ValueError, match="zero tokens"):
        cm.perplexity([0.0], [0])


def test_score_captions_reports_every_metric_and_its_tokenisation():
    hyps = {f"img{i}": h for i, h in enumerate(HYPS)}
    refs = {f"img{i}": r for i, r in reversed(list(enumerate(REFS)))}  # order of ids need not match
    got = cm.score_captions(hyps, refs)
    assert got["bleu4"] == pytest.approx(cm.corpus_bleu(HYPS, REFS)["bleu4"])
    assert got["rougeL"] == pytest.approx(cm.rouge(HYPS, REFS)["rougeL"])
    assert got["cider_d"] == pytest.approx(cm.cider_d(HYPS, REFS))
    assert got["token_f1"] == pytest.approx(sum(cm.token_f1(h, r) for h, r in zip(HYPS, REFS, strict=True)) / 3)
    assert got["num_images"] == 3
    assert set(got["tokenisation"]) == {"bleu", "rouge", "cider_d", "token_f1"}
    assert "13a" in got["tokenisation"]["bleu"]
    same = cm.score_captions({1: "a dog runs fast"}, {1: ["a dog runs fast"]})
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge1"] == 1.0 and same["token_f1"] == 1.0


@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        ({1: "a dog"}, {2: ["a dog"]}, "ids differ"),
        ({1: "a dog", 2: "a cat"}, {1: ["a dog"]}, "ids differ"),
        ({1: "a dog"}, {1: []}, "non-empty list"),
        ({1: "a dog"}, {1: "a dog"}, "non-empty list"),
        ({1: "a dog"}, {1: ["a dog", " . "]}, "no words"),
        ({1: None}, {1: ["a dog"]}, "not a caption string"),
        ({}, {}, "no captions"),
    ],
)
def test_score_captions_rejects_bad_input(hyps, refs, message):
    with pytest.raises(ValueError, match=message):
        cm.score_captions(hyps, refs)
