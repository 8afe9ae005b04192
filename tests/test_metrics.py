"""Answer normalisation, VQA accuracy and lmms-eval's letter extraction on hand-checked cases."""

from __future__ import annotations

import pytest

from metrics import mvbench_letter, normalize_answer, scienceqa_letter, videomme_letter, vqa_accuracy


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
    "reply, videomme, mvbench, scienceqa",
    [
        ("B", "B", "B", "B"),
        ("(B)", "B", "B", ""),
        ("B.", "B", "B", "B"),
        ("B. a red ball", "B", "B", "B"),
        ("The answer is C", "C", "C", ""),
        ("The best answer is: D", "D", "D", ""),
        ("", "", "", ""),
        ("b", "", "B", ""),  # lowercase: only MVBench lowercases before searching
        ("b. a red ball", "", "B", ""),
        ("Because it rolls", "B", "", ""),  # a letter inside a word: Video-MME takes any capital
        ("Answer: C", "A", "C", ""),  # ... even the A of "Answer"
        ("Best answer: C", "B", "C", ""),  # lmms-eval's prefix list joins "Best answer:Best option:" into one
        ("a dog", "", "A", ""),  # MVBench reads the article as option A
        ("(c) dog", "", "C", ""),
        ("Option: (D) red", "D", "D", ""),
        ("F", "", "", ""),  # not an option letter
        (" C ", "C", "C", "C"),
    ],
)
def test_letter_extraction_matches_lmms_eval(reply, videomme, mvbench, scienceqa):
    assert videomme_letter(reply) == videomme
    assert mvbench_letter(reply) == mvbench
    assert scienceqa_letter(reply, "ABCD") == scienceqa


def test_videomme_rule_over_more_letters():
    assert videomme_letter("E", "ABCDE") == "E"
    assert videomme_letter("E", "ABCD") == ""
