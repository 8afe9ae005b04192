"""evals/lmms_plugin.py under lmms-eval 0.7.3's own evaluator, against benchmark.py on the same questions.

The same five questions (two on one image, two on one clip, one text-only) are written twice: as evaluation
shards for benchmark.py and as a local lmms-eval task (a JSON file, task YAMLs and their utils module in
tmp_path, no hub), one `generate_until` and one `multiple_choice` task. A tiny random model answers both; the
replies, verdicts and chosen options must be the same. Skipped, with the install line, where lmms-eval's
evaluator cannot be imported.

The task shipped in examples/lmms_eval_task runs as docs/evaluation.md says, through lmms-eval's own command
line, and so does the flag the docs give for a run that must fail when a task's data cannot be loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import benchmark
import registry
from evals.answering import Answerer
from evals.results import read_predictions
from inputs.frames import Media
from layouts.eval_sets import LETTERS
from model import FoveatedVLM
from tests.conftest import jpeg, mp4
from tests.tiny import tiny_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "lmms_eval_task"
INSTALL = "pip install --no-deps -r requirements-eval.txt && pip install --no-deps --no-build-isolation -e ."
OPTIONS = ["a red ball", "a green cube", "a blue cone", "nothing"]
# id, question, options, answer, media
QUESTIONS = [
    ("img-0", "What is in the picture?", OPTIONS, "A", "image"),
    ("img-1", "What colour is it?", ["red", "green", "blue"], "C", "image"),
    ("vid-0", "What moves?", OPTIONS, "B", "video"),
    ("vid-1", "Which way does it go?", ["left", "right"], "B", "video"),
    ("txt-0", "Which is a mammal?", ["a frog", "a cat", "a shark"], "B", "none"),
]
UTILS = """
from PIL import Image
from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

LETTERS = "ABCDEFGHIJ"


def doc_to_visual(doc):
    if doc["image"]:
        return [Image.open(doc["image"]).convert("RGB")]
    return [doc["video"]] if doc["video"] else []


def doc_to_text(doc):
    lines = "\\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(doc["options"]))
    return doc["question"] + "\\n" + lines + "\\nAnswer with the option's letter from the given choices directly."


def doc_to_choice(doc):
    return [f"{LETTERS[i]}. {o}" for i, o in enumerate(doc["options"])]


def doc_to_target(doc):
    return LETTERS.index(doc["answer"])


def process_results(doc, results):
    pred = extract_mcq_answer(results[0], list(LETTERS[: len(doc["options"])]))
    return {"accuracy": float(pred == doc["answer"])}
"""
COMMON = """
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
doc_to_visual: !function fvlm_test_utils.doc_to_visual
doc_to_text: !function fvlm_test_utils.doc_to_text
"""
GENERATE = """
task: fvlm_test_generate
output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  until: ["\\n\\n"]
  do_sample: false
process_results: !function fvlm_test_utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
CHOICE = """
task: fvlm_test_choice
output_type: multiple_choice
doc_to_choice: !function fvlm_test_utils.doc_to_choice
doc_to_target: !function fvlm_test_utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def lmms():
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip(f"lmms-eval is not installed: {INSTALL}")
    from lmms_eval import evaluator, models  # installed but not importable is a failure, not a skip
    from lmms_eval.api.instance import Instance
    from lmms_eval.tasks import TaskManager

    from evals import lmms_plugin

    if "fvlm" not in models.list_available_models():  # the checkout is not installed: register it by hand
        models.MODEL_REGISTRY_V2.register_manifest(lmms_plugin.manifest())
    return types.SimpleNamespace(evaluator=evaluator, models=models, Instance=Instance, TaskManager=TaskManager)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("fvlm")
    tiny_model(tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def after_question_dir(tokenizer, tmp_path_factory):
    """A model whose frames follow the question, so its reads depend on each request's context."""
    path = tmp_path_factory.mktemp("fvlm_after_question")
    tiny_model(glimpses=2, tokenizer=tokenizer, frames_at="after_question").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """The questions as evaluation shards (benchmark.py) and as a local lmms-eval task folder."""
    root = tmp_path_factory.mktemp("questions")
    media = {"image": root / "square.jpg", "video": root / "clip.mp4"}
    media["image"].write_bytes(jpeg((200, 40, 40)))
    media["video"].write_bytes(mp4(8))
    (root / "shards").mkdir()
    docs = []
    with wds.TarWriter(str(root / "shards" / "eval-000000.tar")) as sink:
        for qid, question, options, answer, kind in QUESTIONS:
            sample = {"__key__": qid, "json": {"id": qid, "question": question, "options": options, "answer": answer}}
            if kind != "none":
                sample["jpg" if kind == "image" else "mp4"] = media[kind].read_bytes()
            sink.write(sample)
            docs.append({"id": qid, "question": question, "options": options, "answer": answer,
                         "image": str(media["image"]) if kind == "image" else "",
                         "video": str(media["video"]) if kind == "video" else ""})  # fmt: skip
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.json").write_text(json.dumps(docs))
    (tasks / "fvlm_test_utils.py").write_text(UTILS)
    common = COMMON.format(docs=tasks / "docs.json")
    (tasks / "fvlm_test_generate.yaml").write_text(textwrap.dedent(common + GENERATE))
    (tasks / "fvlm_test_choice.yaml").write_text(textwrap.dedent(common + CHOICE))
    return types.SimpleNamespace(shards=root / "shards", tasks=tasks, media=media)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import datasets.config

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_registered_as_fvlm(lmms):
    from evals import lmms_model, lmms_plugin

    assert lmms.models.get_model("fvlm") is lmms_model.FVLM
    found = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "fvlm"]
    if not found:
        pytest.skip(f"the checkout is not installed, so lmms-eval has no entry point for it: {INSTALL}")
    assert found[0].load() is lmms_plugin.manifest


@pytest.mark.parametrize("saved", ["model_dir", "after_question_dir"])
def test_harness_matches_benchmark(lmms, saved, questions, offline, tmp_path, monkeypatch, request):
    model_dir = request.getfixturevalue(saved)
    prepared = []
    original = FoveatedVLM.prepare
    monkeypatch.setattr(FoveatedVLM, "prepare", lambda self, *a, **k: prepared.append(1) or original(self, *a, **k))
    results = lmms.evaluator.simple_evaluate(
        model="fvlm",
        model_args=f"pretrained={model_dir},read=coarse_fine",
        tasks=["fvlm_test_generate", "fvlm_test_choice"],
        task_manager=lmms.TaskManager("WARNING", include_path=str(questions.tasks), include_defaults=False),
        device="cpu",
        bootstrap_iters=0,
        log_samples=True,
        verbosity="WARNING",
    )
    assert len(prepared) == 2 * 3  # per request type: the image, the clip and no media, each encoded once
    samples = {t: sorted(results["samples"][t], key=lambda s: s["doc_id"]) for t in results["samples"]}

    def ours(protocol: str) -> tuple[dict, dict]:
        args = ["--model", str(model_dir), "--bench", "shards", "--data-root", str(questions.shards)]
        out = tmp_path / protocol
        summary = benchmark.main(args + ["--protocol", protocol, "--reads", "coarse_fine", "--out", str(out)])
        records = read_predictions(out / f"shards_{protocol}.jsonl")
        return summary, {qid: records[qid]["reads"]["coarse_fine"] for qid, *_ in QUESTIONS}

    summary, records = ours("generate")
    replies = [s["filtered_resps"][0] for s in samples["fvlm_test_generate"]]
    assert replies == [records[qid]["reply"] for qid, *_ in QUESTIONS]
    assert not any("\n\n" in r for r in replies)  # else the task's `until` would have cut what benchmark.py keeps
    assert [s["accuracy"] for s in samples["fvlm_test_generate"]] == [records[qid]["score"] for qid, *_ in QUESTIONS]
    generate = results["results"]["fvlm_test_generate"]["accuracy,none"]
    assert 100 * generate == pytest.approx(summary["overall"]["coarse_fine"])

    summary, records = ours("likelihood")
    chosen = [LETTERS[int(np.argmin([v for v, _ in s["filtered_resps"]]))] for s in samples["fvlm_test_choice"]]
    assert chosen == [records[qid]["pred"] for qid, *_ in QUESTIONS]
    means = [v for s in samples["fvlm_test_choice"] for v, _ in s["filtered_resps"]]  # benchmark.py rounds to 1e-5
    assert means == pytest.approx([v for qid, *_ in QUESTIONS for v in records[qid]["losses"]], abs=2e-5)
    assert 100 * results["results"]["fvlm_test_choice"]["acc,none"] == pytest.approx(summary["overall"]["coarse_fine"])


def request(lmms, kind: str, context: str, second, doc_id: int | None = None):
    """An Instance as a task builds it; without doc_id the harness's context-free (context, continuation) one."""
    args = (context, second) if doc_id is None else (context, second, lambda doc: doc["v"], doc_id, "t", "test")
    return lmms.Instance(kind, args, 0, metadata={"task": "t", "doc_id": doc_id or 0, "repeats": 1})


def test_requests(lmms, model_dir, questions):
    """What each request field does, without the evaluator: the default read, `until`, PIL frames, the
    likelihood values and the harness's context-free (context, continuation) requests."""
    from evals import lmms_model

    lm = lmms_model.FVLM(pretrained=str(model_dir), device="cpu", likelihood="logprob")
    assert lm.read == "autoregressive"  # the model's last read
    image = Image.open(questions.media["image"]).convert("RGB")
    frames = [Image.new("RGB", (20, 12), (30 * i, 0, 0)) for i in range(6)]
    lm.task_dict = {"t": {"test": [{"v": [image]}, {"v": frames}, {"v": [str(questions.media["video"])]}]}}

    answerer = Answerer(lm.answerer.model)
    state = answerer.prepare(Media("image", [questions.media["image"]]))
    full = answerer.generate(state, "Describe it.", "autoregressive", 16)
    stop = next(ch for ch in full[1:] if not ch.isspace())
    cut = lm.generate_until([request(lmms, "generate_until", "Describe it.", {"until": stop}, 0)])
    assert cut == [full[: full.index(stop)].strip()]
    replies = lm.generate_until([request(lmms, "generate_until", "Describe it.", {}, d) for d in range(3)])
    assert replies[0] == full and all(isinstance(r, str) for r in replies)

    answers = ["A. a red ball", "B. nothing"]
    scored = lm.loglikelihood([request(lmms, "loglikelihood", "Which?", " " + a, 0) for a in answers])
    means = answerer.score(state, "Which?", answers, "autoregressive")
    counts = [sum(x != -100 for x in labels) for labels in answerer.processor.answers("Which?", answers)[1]]
    assert [r.text[0] for r in scored] == pytest.approx([-m * n for m, n in zip(means, counts, strict=True)], rel=1e-5)
    assert all(isinstance(r.text[1], bool) for r in scored)
    bare = lm.loglikelihood([request(lmms, "loglikelihood", "", "a cat")])
    assert np.isfinite(bare[0].text[0])


def lmms_eval_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`lmms-eval ARGS` (as `python -m lmms_eval`, the same program) from the repository root, offline, its
    dataset cache in tmp_path and no bytecode written beside the example; skipped where lmms-eval cannot find
    `fvlm` through the entry point the checkout's install gives it."""
    if not [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "fvlm"]:
        pytest.skip(f"lmms-eval's command line finds fvlm only in the installed checkout: {INSTALL}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "lmms"),
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    command = [sys.executable, "-m", "lmms_eval", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_the_shipped_example_task_runs_as_documented(lmms, model_dir, tmp_path):
    """docs/evaluation.md's command on examples/lmms_eval_task, the files as shipped: exit 0, every document
    answered, and each reply the one benchmark.py's Answerer gives to the same picture and prompt."""
    from examples.lmms_eval_task import fvlm_example_utils as utils

    out = tmp_path / "out"
    proc = lmms_eval_command(
        tmp_path, "--model", "fvlm", "--model_args", f"pretrained={model_dir}", "--tasks", "fvlm_example",
        "--include_path", "examples/lmms_eval_task", "--device", "cpu", "--output_path", str(out), "--log_samples",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = out.rglob("*_results.json")
    (logged,) = out.rglob("*_samples_fvlm_example.jsonl")
    accuracy = json.loads(results.read_text())["results"]["fvlm_example"]["accuracy,none"]
    samples = sorted((json.loads(line) for line in logged.read_text().splitlines()), key=lambda s: s["doc_id"])
    docs = json.loads((EXAMPLE / "fvlm_example.json").read_text())
    assert [s["doc_id"] for s in samples] == list(range(len(docs))) and 0 <= accuracy <= 1
    assert accuracy == pytest.approx(sum(s["accuracy"] for s in samples) / len(docs))

    answerer = Answerer(registry.load(model_dir).eval())
    read = list(answerer.reads)[-1]  # fvlm's default read
    for doc, sample in zip(docs, samples, strict=True):
        media = Media("image", [EXAMPLE / doc["image"]]) if doc["image"] else Media("none")
        reply = answerer.generate(answerer.prepare(media), utils.doc_to_text(doc), read, 16)
        assert sample["filtered_resps"] == reply.split("\n\n")[0].strip(), doc["id"]


def test_the_documented_strict_flag_fails_a_run_whose_task_data_cannot_be_loaded(model_dir, tmp_path):
    """lmms-eval 0.7.3 catches whatever one evaluation raises, prints it and exits 0, so a task whose data cannot
    be fetched leaves no number and no failed status. `--verbosity DEBUG`, the flag docs/evaluation.md gives,
    makes it re-raise: the run exits non-zero, the missing file named in the error. (One line naming the task
    would need lmms-eval's own code changed: no code of ours runs between its loading the task and its catching
    the error.)"""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    example = (EXAMPLE / "fvlm_example.yaml").read_text()
    broken = example.replace("task: fvlm_example", "task: fvlm_example_broken")
    broken = broken.replace("test: fvlm_example.json", f"test: {tmp_path / 'absent.json'}")
    (tasks / "broken.yaml").write_text(broken)
    (tasks / "fvlm_example_utils.py").write_text((EXAMPLE / "fvlm_example_utils.py").read_text())
    proc = lmms_eval_command(
        tmp_path, "--model", "fvlm", "--model_args", f"pretrained={model_dir}", "--tasks", "fvlm_example_broken",
        "--include_path", str(tasks), "--device", "cpu", "--verbosity", "DEBUG",
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert f"Unable to find '{tmp_path / 'absent.json'}'" in proc.stderr
