"""The generate protocol against lmms-eval 0.7.3's own task code: prompts byte for byte, verdicts, scores.

lmms-eval is imported from its installed package (requirements-eval.txt, installed with --no-deps). Only
its task modules run: the package init of `lmms_eval.tasks` builds the task registry, which imports
accelerate, evaluate and more that the task code never uses, so a bare package stands in for it. Each
task's default `lmms_eval_specific_kwargs` are read from lmms-eval's own YAML files. Skipped, with the
install line, only when lmms-eval cannot be imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from benchmark import summarize
from evals.metrics import (
    LMMS_EVAL_VERSION,
    mcq_letter,
    mvbench_letter,
    mvbench_summary,
    normalize_answer,
    scienceqa_letter,
    videomme_letter,
    vqa_accuracy,
)
from layouts.eval_sets import LETTERS, load_benchmark, load_mvbench, load_scienceqa, load_textvqa, load_videomme

INSTALL = "pip install --no-deps -r requirements-eval.txt"


@pytest.fixture(scope="module")
def lmms():
    """lmms-eval's task modules by short name, and the folder of its task YAMLs."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None:
        pytest.skip(f"lmms_eval is not importable (not installed): {INSTALL}")
    assert importlib.metadata.version("lmms_eval") == LMMS_EVAL_VERSION, "the parity target is one release"
    tasks = Path(spec.origin).parent / "tasks"
    stubbed = "lmms_eval.tasks" not in sys.modules
    if stubbed:  # the bare package: its real init would build the whole task registry
        bare = types.ModuleType("lmms_eval.tasks")
        bare.__path__ = [str(tasks)]
        sys.modules["lmms_eval.tasks"] = bare
    names = {
        "mvbench": "mvbench.utils",
        "videomme": "videomme.utils",
        "scienceqa": "scienceqa.utils",
        "textvqa": "textvqa.utils",
        "mcq": "_task_utils.mcq_extract",
        "evalai": "_task_utils.vqa_eval_metric",
    }
    try:
        modules = {k: importlib.import_module(f"lmms_eval.tasks.{v}") for k, v in names.items()}
    except ImportError as e:
        pytest.skip(f"lmms_eval's task code is not importable ({e}): {INSTALL}")
    yield types.SimpleNamespace(tasks=tasks, **modules)
    if stubbed:  # later tests (the plugin's) import the real package
        for name in [m for m in sys.modules if m == "lmms_eval.tasks" or m.startswith("lmms_eval.tasks.")]:
            del sys.modules[name]


class _Loader(yaml.SafeLoader):
    """lmms-eval's YAML with its `!function` tags read as plain strings."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def default_kwargs(lmms, path: str, variant: str = "default") -> dict:
    """A task's `lmms_eval_specific_kwargs[variant]`, its `include`d template under it."""
    file = lmms.tasks / path
    config = yaml.load(file.read_text(), _Loader)
    if "include" in config:
        config = {**yaml.load((file.parent / config["include"]).read_text(), _Loader), **config}
    return dict(config["lmms_eval_specific_kwargs"][variant])


# ---- replies ---------------------------------------------------------------------------------------

TEMPLATES = [
    "{x}", "({x})", "{x}.", "{x}:", "{x})", " {x} ", "{x}\n", "{x}. a red ball", "{x}.a red ball", "({x}) a red ball",
    "{x}) a red ball", "{x}: a red ball", "{x} - a red ball", "Answer: {x}", "answer: {x}", "Answer:{x}",
    "Best option: ({x})", "Best option:({x})", "Best answer: {x}", "The answer is {x}", "The answer is ({x})",
    "The answer is ({x}).", "THE ANSWER IS {x}", "the answer is {x}.", "The best answer is: {x}",
    "The correct option is {x}, not A.", "I choose {x}", "I think A is wrong, {x}", "Option {x}", "Option: ({x})",
    "'{x}'", '"{x}."', "'{x}'.", "{x}!", "{x}?", "{x};", "**{x}**", "[{x}]", "{x}\nBecause it rolls", "{x}\n\nB",
    "{x}, because", "{x}{x}", "{x} {x}", "Is it {x}?", "答案是{x}", "정답은 {x}", "答えは{x}です", "选{x}", "({x}",
    "{x}" + "." * 40, "." * 33 + "{x}", "x" + "." * 32 + "{x}", "x" + "." * 33 + "{x}", "{x}" + "!" * 30,
]  # fmt: skip
FREE = [
    "", " ", "  \n\t ", "\n", ".", "...", "." * 31, "." * 32, "." * 33, "." * 64, ". " * 40, "?" * 40, "!" * 40,
    "-" * 40, "- " * 20, "(" * 10 + ")" * 10, "'\"'\"", ",,,", "1,000", "1,,000", "3.5", "3.5.", "u.s.a.",
    "Because it rolls", "a dog", "an apple", "A dog", "The cat", "none of the above", "I don't know", "dont know",
    "two", "Two dogs", "ten.", "yes", "Yes.", "no!", "coca-cola", "coca - cola", "hello, world", "What?",
    "the cat's toy", "Im here", "ive been", "somebody'd", "  Stop\tsign\n", "ain't", "aint",
    "İstanbul B", "ß", "Ａ", "(Ａ)", "B\u200b", "\u200bB", "Ⓑ", "é", "É. a", "\u212a", "ǅ", "ﬁ", "日本語の答えはC",
    "Ответ: Б", "Ответ: B", "答：B", "答案：C", "選項 D", "B\u00a0", "\u00a0B\u00a0", "B\u3000", "Β", "(Β)",
    "A or B", "A and B", "Both A and C", "neither", "E", "(E)", "e.", "F", "(f)", "f.", "G: x", "(H)", "Z",
    "Answer", "The answer", "The best answer is", "Best option:", "answer is", "I choose", "option",
]  # fmt: skip


def replies() -> list[str]:
    """Several hundred replies, fixed: templates over letters A-H in both cases, free text, seeded noise."""
    out = [t.format(x=x) for t in TEMPLATES for x in "ABCDEFGHabcde"] + FREE
    rng = random.Random(0)
    alphabet = "ABCDEabcde xyz.,:;()!?'\"-\n\tİßéＡΒ答0123456789"
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(300)]
    out += ["".join(rng.choice(".A b") for _ in range(rng.randint(30, 80))) for _ in range(40)]
    return list(dict.fromkeys(out))  # unique, in a fixed order


REPLIES = replies()


def test_reply_set_is_large_and_fixed():
    assert len(REPLIES) > 900 and REPLIES == replies()


# ---- verdicts --------------------------------------------------------------------------------------

VIDEOMME_DOC = {"question_id": "001-1", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
                "task_type": "Counting Problem", "videoID": "v0"}  # fmt: skip


def test_videomme_verdicts(lmms):
    results, records = [], []
    for i, reply in enumerate(REPLIES):
        assert videomme_letter(reply) == lmms.videomme.extract_characters_regex(reply), reply
        answer = "ABCD"[i % 4]
        out = lmms.videomme.videomme_process_results({**VIDEOMME_DOC, "answer": answer}, [reply])
        out = out["videomme_perception_score"]
        ours = float(videomme_letter(reply) == answer)
        assert ours == out["score"], reply
        results.append(out)
        records.append({"groups": {}, "options": 4, "reads": {"m": {"score": ours}}})
    assert summarize(records, ["m"])["overall"]["m"] == pytest.approx(lmms.videomme.videomme_aggregate_results(results))


@pytest.mark.parametrize("letters", ["AB", "ABC", "ABCDE", "ABCDEFGH", ""])
def test_shared_mcq_reader_over_other_option_counts(lmms, letters):
    for reply in REPLIES:
        assert mcq_letter(reply, letters) == lmms.mcq.extract_mcq_answer(reply, list(letters) or None), reply


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_mvbench_verdicts_and_task_figure(lmms, n):
    candidates = [f"option {i}" for i in range(n)]
    results, records = [], []
    for i, reply in enumerate(REPLIES):
        right = i % n
        doc = {"candidates": candidates, "answer": candidates[right]}
        out = lmms.mvbench.mvbench_process_results(doc, [reply])["mvbench_accuracy"]
        ours = float(mvbench_letter(reply) == LETTERS[right])
        assert ours == out["score"], reply
        results.append(out)
        records.append({"groups": {"task": "t"}, "reads": {"m": {"reply": reply, "score": ours}}})
    summary = mvbench_summary(records, ["m"])
    assert summary["tasks"]["t"]["m"] == lmms.mvbench.mvbench_aggregate_results(results)
    assert summary["empty_replies"]["m"] == sum(r == "" for r in REPLIES) > 0  # empties are left out above


def test_mvbench_overall_is_the_mean_of_the_task_figures(lmms):
    records, figures = [], []
    for t, replies_of_task in enumerate((["A", "", "B"], ["", ""], ["C", " ", "C", "x"])):
        results = []
        for reply in replies_of_task:
            out = lmms.mvbench.mvbench_process_results({"candidates": ["p", "q", "r"], "answer": "r"}, [reply])
            results.append(out["mvbench_accuracy"])
            score = float(mvbench_letter(reply) == "C")
            records.append({"groups": {"task": f"t{t}"}, "reads": {"m": {"reply": reply, "score": score}}})
        figures.append(lmms.mvbench.mvbench_aggregate_results(results))
    summary = mvbench_summary(records, ["m"])
    assert [summary["tasks"][f"t{t}"]["m"] for t in range(3)] == figures == [0.0, 0, 50.0]  # " " is answered
    assert summary["overall"] == {"n": 9, "m": pytest.approx(sum(figures) / 3)}


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_scienceqa_verdicts(lmms, n):
    for i, reply in enumerate(REPLIES):
        doc = {"choices": [f"c{j}" for j in range(n)], "answer": i % n}
        expected = lmms.scienceqa.sqa_process_results(doc, [reply])["exact_match"]
        assert float(scienceqa_letter(reply, LETTERS[:n]) == LETTERS[i % n]) == expected, reply


def test_evalai_normaliser(lmms):
    processor = lmms.evalai.EvalAIAnswerProcessor()
    for reply in REPLIES:
        assert normalize_answer(reply) == processor(reply), reply


def test_textvqa_scores(lmms):
    """Each reply against two answer sets that it matches 0-10 times in different spellings; floats equal exactly."""
    matches = (0, 1, 2, 3, 4, 7, 10)
    hits = set()
    for i, reply in enumerate(REPLIES):
        spellings = [reply, reply.upper(), reply + ".", f"the {reply}", reply.replace(".", "")]
        for k in (matches[i % 7], matches[(i + 3) % 7]):
            answers = [spellings[(i + j) % len(spellings)] for j in range(k)] + ["stop", "two", "1,000"][: 10 - k]
            answers += ["dakota"] * (10 - len(answers))
            expected = lmms.textvqa.textvqa_process_results({"question_id": i, "answers": list(answers)}, [reply])
            assert vqa_accuracy(reply, answers) == expected["exact_match"], (reply, answers)
            hits.add(expected["exact_match"])
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= {round(h, 12) for h in hits}  # every step of the VQA accuracy was met


# ---- prompts ---------------------------------------------------------------------------------------

MVBENCH_DOCS = [
    {"question": "What is the man doing?", "candidates": ["running", "sitting"], "answer": "sitting"},
    {"question": "Which object moved first?\n(Look closely.)", "candidates": ["a red ball", "the cube", "nothing"],
     "answer": "nothing"},
    {"question": "  Was ist passiert? ", "candidates": ["Er läuft.", "(B) sie springt", "A. x", "日本", "  "],
     "answer": "日本"},
    {"question": "", "candidates": ["1", "2", "3", "4", "5", "6"], "answer": "6"},
]  # fmt: skip


def test_mvbench_prompts_for_every_task(lmms, tmp_path):
    tasks = sorted(lmms.mvbench.DATA_LIST)
    assert len(tasks) == 20
    for task in tasks:
        docs = [{**d, "video": f"{task}_{i}.mp4"} for i, d in enumerate(MVBENCH_DOCS)]
        (tmp_path / "json").mkdir(exist_ok=True)
        (tmp_path / "json" / f"{task}.json").write_text(json.dumps(docs))
    questions = {q.id: q for q in load_mvbench(tmp_path)}
    assert len(questions) == 20 * len(MVBENCH_DOCS)
    for task in tasks:
        kwargs = default_kwargs(lmms, f"mvbench/mvbench_{task}.yaml")
        assert kwargs == {"sub_task": task, "post_prompt": "Only give the best option.\n"}
        for i, doc in enumerate(MVBENCH_DOCS):
            assert questions[f"{task}/{i}"].prompt == lmms.mvbench.mvbench_doc_to_text(doc, kwargs)
    assert questions["action_count/1"].prompt == (
        "Question:Which object moved first?\n(Look closely.)\nOption:\n(A) a red ball\n(B) the cube\n(C) nothing\n"
        "Only give the best option.\n"
    )


VIDEOMME_ROWS = [
    {"question": "How many balls?", "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "B"},
    {"question": "What does the sign say?\nRead it.", "options": ["A. \"Stop\"", "B. Go", "C. 出口", "D. "],
     "answer": "C"},
]  # fmt: skip


def test_videomme_prompts(lmms, tmp_path):
    rows = [{**VIDEOMME_DOC, "question_id": f"00{i}-1", **r} for i, r in enumerate(VIDEOMME_ROWS)]
    pd.DataFrame(rows).to_parquet(tmp_path / "test.parquet")
    default = default_kwargs(lmms, "videomme/videomme.yaml")
    llava_vid = default_kwargs(lmms, "videomme/videomme.yaml", "llava_vid")
    assert default["post_prompt"] == "\nAnswer with the option's letter from the given choices directly."
    for variant, kwargs in (("default", default), ("llava_vid", llava_vid), ("legacy", llava_vid)):
        for q, row in zip(load_videomme(tmp_path, variant), rows, strict=True):
            assert q.prompt == lmms.videomme.videomme_doc_to_text(row, kwargs), variant
    assert load_videomme(tmp_path)[0].prompt.endswith(
        "How many balls?\nA. one\nB. two\nC. three\nD. four\n\nAnswer with the option's letter from the given "
        "choices directly."
    )


def test_scienceqa_prompts(lmms, tmp_path):
    kwargs = default_kwargs(lmms, "scienceqa/scienceqa_img.yaml")
    base = {"question": "Which is a mammal?", "choices": ["frog", "cat", "shark"], "answer": 1,
            "image": {"bytes": b"not decoded here", "path": None}}  # fmt: skip
    rows = [
        {**base, "hint": "Look at the picture."},
        {**base, "hint": ""},
        {**base, "hint": None},  # lmms-eval writes it out as "None"
        {**base, "hint": "Line one.\nLine two:", "question": "Pick one.", "choices": ["yes", "no"], "answer": 0},
        {**base, "hint": " ", "choices": ["α", "β", "γ", "δ", "ε"], "answer": 4},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "test-00000.parquet")
    questions = load_scienceqa(tmp_path)
    assert len(questions) == len(rows)
    for q, row in zip(questions, rows, strict=True):
        assert q.prompt == lmms.scienceqa.sqa_doc_to_text(row, kwargs)
    assert questions[2].prompt.startswith("NoneWhich is a mammal?")


def test_textvqa_prompts(lmms, tmp_path):
    kwargs = default_kwargs(lmms, "textvqa/textvqa_val.yaml")
    assert kwargs == {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase.",
                      "ocr": False}  # fmt: skip
    texts = ["what brand is SHOWN?", "WHAT does it say", "é is it?", "ßtraße?", "  leading space", "iPhone model?", ""]
    data = [{"question_id": i, "question": t, "image_id": f"img{i}", "answers": ["x"]} for i, t in enumerate(texts)]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    for q, doc in zip(load_textvqa(tmp_path), data, strict=True):
        assert q.prompt == lmms.textvqa.textvqa_doc_to_text(doc, kwargs)


def test_prompt_variants_are_named_and_only_where_they_apply(tmp_path):
    with pytest.raises(ValueError, match="does not apply to mvbench"):
        load_benchmark("mvbench", tmp_path, variant="llava_vid")
    with pytest.raises(ValueError, match="does not apply"):
        load_benchmark("videomme", tmp_path, variant="no_such_variant")
