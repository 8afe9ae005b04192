"""Answer normalisation, VQA accuracy and lmms-eval 0.7.3's letter extraction on hand-checked cases
(tests/test_lmms_eval_parity.py checks the same rules against lmms-eval's own code)."""

from __future__ import annotations

import pytest

from evals.metrics import (
    mvbench_letter,
    normalize_answer,
    scienceqa_letter,
    videomme_letter,
    videomme_letter_legacy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat", "cat"),  # lowercase, article
        ("an apple a day", "apple day"),
        ("Two", "2"),  # number words 0-10
        ("none", "0"),
        ("Ten dogs", "10 dogs"),
        ("dont", "don't"),  # missing apostrophes restored
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # commas go before anything else
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes.", "yes"),
        ("u.s.a.", "usa"),
        ("hello!", "hello"),  # a mark touching no space becomes a space
        ("coca-cola", "coca cola"),
        ("coca - cola", "coca cola"),  # a mark next to a space is deleted
        ("What?", "what"),
        ("the cat's toy", "cat 's toy"),
        ("  Stop\tsign\n", "stop sign"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("agree, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_agreeing_annotators(agree, expected):
    answers = ["Cat"] * agree + ["dog"] * (10 - agree)
    assert vqa_accuracy("the cat.", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("1000", ["1,000"] * 10) == 1.0


@pytest.mark.parametrize(
    "reply, videomme, mvbench, scienceqa, legacy",
    [
        ("B", "B", "B", "B", "B"),
        ("(B)", "B", "B", "", "B"),
        ("B.", "B", "B", "B", "B"),
        ("B. a red ball", "B", "B", "B", "B"),
        ("The answer is C", "C", "C", "", "C"),
        ("The best answer is: D", "D", "D", "", "D"),
        ("", "", "", "", ""),
        ("b", "", "B", "B", ""),  # lowercase: MVBench lowercases before searching, ScienceQA compares in any case
        ("b. a red ball", "", "B", "", ""),  # ... but ScienceQA's "X." rule wants a capital
        ("Because it rolls", "B", "", "", "B"),  # no letter standing alone: Video-MME takes a capital in a word
        ("Answer: C", "C", "C", "", "A"),  # the end of the reply beats the A of "Answer"; the old reader took it
        ("Answer: B", "B", "B", "", "A"),
        ("Best answer: C", "C", "C", "", "B"),  # the old prefix list joins "Best answer:Best option:" into one
        ("Best option: (C)", "C", "C", "", "B"),
        ("The answer is (d)", "", "D", "", ""),
        ("I think A is wrong, B", "B", "A", "", "A"),  # Video-MME: the last, MVBench: the first standalone letter
        ("a dog", "", "A", "", ""),  # MVBench reads the article as option A
        ("(c) dog", "", "C", "", ""),
        ("Option: (D) red", "D", "D", "", "D"),
        ("F", "", "F", "", ""),  # not an option of four; MVBench's rule would still match an F option
        (" C ", "C", "C", "C", "C"),
    ],
)
def test_letter_extraction_matches_lmms_eval(reply, videomme, mvbench, scienceqa, legacy):
    assert videomme_letter(reply) == videomme
    assert mvbench_letter(reply) == mvbench
    assert scienceqa_letter(reply, "ABCD") == scienceqa
    assert videomme_letter_legacy(reply) == legacy


def test_videomme_rule_over_more_letters():
    assert videomme_letter("E", "ABCDE") == "E"
    assert videomme_letter("E", "ABCD") == ""
    assert videomme_letter_legacy("E", "ABCDE") == "E"


def test_only_the_first_32_periods_are_dropped():
    """EvalAI passes re.UNICODE (32) where re.sub takes its count."""
    assert normalize_answer("." * 40) == "." * 8
    assert normalize_answer("wait" + "." * 33) == "wait."
    assert mvbench_letter("x" + "." * 32 + "b") == ""  # "xb": no letter stands alone
    assert mvbench_letter("x" + "." * 33 + "b") == "B"  # "x.b": the 33rd period stays and parts them
