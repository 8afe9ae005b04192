"""Evaluation sets read from each benchmark's own published layout into one list-of-questions form.

Every loader returns `Question`s: the user turn (lmms-eval 0.7.3's default prompt for that benchmark, or a
named model-specific variant of it, see PROMPT_VARIANTS; used by both scoring protocols), where the pixels
are (`Media`, decoded later by the model's adapter, which alone knows its input format), the options' texts,
the right answer and the summary groups. A missing file is reported once, with the expected layout, before
any model runs.

Evaluation shards (`--bench shards`, and `--bench toy` for the toy world's held-out split) use the
project's WebDataset format: `KEY.json` plus the media members training shards use
(`KEY.000.jpg, KEY.001.jpg, …` frames, one `KEY.mp4`, one `KEY.jpg`, or none). The JSON of one sample:

    {"question": "Where does the red square go?",      # required
     "options": ["left", "right", "up", "down"],       # option texts in letter order, no "A." prefix
                                                       #   ("candidates" is accepted as a synonym)
     "answer": "B",                                    # the right option: letter, 0-based index, or its text
     "id": "toy-000123",                               # optional; default the sample key
     "task": "motion",                                 # optional summary groups: any of task, duration,
     "category": "tracking"}                           #   domain, category
An open question carries `"answers": [str, ...]` (scored with the VQA accuracy) instead of options/answer.
`"format": "plain"` asks the bare question and takes each option as a whole reply ("The ball is red."):
the likelihood protocol scores the replies as written, and a generated reply counts as the option it equals
(after the EvalAI normalisation), otherwise as none.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from webdataset.tariterators import tarfile_samples

from cli import UserError
from evals.metrics import mvbench_letter, scienceqa_letter, videomme_letter, videomme_letter_legacy
from inputs.frames import Media
from layouts import textvqa
from layouts.shards import expand_shards, media_of

LETTERS = string.ascii_uppercase
LETTER_PROMPT = "\nAnswer with the option's letter from the given choices directly."
MVBENCH_PROMPT = "Only give the best option.\n"
VIDEOMME_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)  # lmms-eval sends this sentence, subtitles or not
VIDEOMME_BEST_ANSWER = "The best answer is:"  # lmms-eval's Video-MME post-prompt for llava_vid, not its default
NAMES = ("mvbench", "videomme", "scienceqa", "textvqa", "toy", "shards")
# Prompt variant -> the benchmarks it applies to. Only "default" (lmms-eval 0.7.3's default prompt and verdict)
# gives numbers comparable with lmms-eval's defaults; the others are model-specific and must be asked for.
PROMPT_VARIANTS: dict[str, tuple[str, ...]] = {
    "default": NAMES,
    "llava_vid": ("videomme",),  # Video-MME ending "\nThe best answer is:", letters read as in 0.7.3
    "legacy": ("videomme",),  # that prompt and lmms-eval's letter reader before 0.7.2: this repo's old numbers
}

# MVBench task -> where its clips are, as (folder under the root or root/video, whether the JSON's
# start/end still apply). First the pre-cut segments of the hub copy that lmms-eval reads, then the
# full videos (or, for episodic reasoning, 3 fps frame folders) of MVBench's own release.
MVBENCH_FOLDERS: dict[str, tuple[tuple[str, bool], ...]] = {
    "action_sequence": (("star/Charades_segment", False), ("star/Charades_v1_480", True)),
    "action_prediction": (("star/Charades_segment", False), ("star/Charades_v1_480", True)),
    "action_antonym": (("ssv2_video_mp4", True), ("ssv2_video", True)),
    "fine_grained_action": (("Moments_in_Time_Raw/videos", True),),
    "unexpected_action": (("FunQA_test/test", True),),
    "object_existence": (("clevrer/video_validation", True),),
    "object_interaction": (("star/Charades_segment", False), ("star/Charades_v1_480", True)),
    "object_shuffle": (("perception/videos", True),),
    "moving_direction": (("clevrer/video_validation", True),),
    "action_localization": (("sta/sta_video_segment", False), ("sta/sta_video", True)),
    "scene_transition": (("scene_qa/video", True),),
    "action_count": (("perception/videos", True),),
    "moving_count": (("clevrer/video_validation", True),),
    "moving_attribute": (("clevrer/video_validation", True),),
    "state_change": (("perception/videos", True),),
    "fine_grained_pose": (("nturgbd_convert", True), ("nturgbd", True)),
    "character_order": (("perception/videos", True),),
    "egocentric_navigation": (("vlnqa", True),),
    "episodic_reasoning": (("tvqa/video_fps3_hq_segment", False), ("tvqa/frames_fps3_hq", True)),
    "counterfactual_inference": (("clevrer/video_validation", True),),
}
FRAME_FOLDER_FPS = 3.0  # MVBench's episodic-reasoning frame folders

LAYOUTS = {
    "mvbench": "ROOT/json/<task>.json (a list of {video, question, candidates, answer, start?, end?}) and each "
    "task's clips under ROOT/video/<folder>/<video> or ROOT/<folder>/<video>, <folder> as in "
    "benchmarks.MVBENCH_FOLDERS (e.g. star/Charades_segment, clevrer/video_validation)",
    "videomme": "ROOT/**/*.parquet (columns videoID, question_id, duration, domain, sub_category, task_type, "
    "question, options, answer) and ROOT/data/<videoID>.mp4",
    "scienceqa": "ROOT/**/*test*.parquet of ScienceQA (image bytes inside), or ROOT/problems.json with "
    "images at ROOT/images/test/<pid>/<image> or ROOT/test/<pid>/<image>",
    "textvqa": "ROOT/TextVQA_0.5.1_val.json and ROOT/train_images/<image_id>.jpg",
    "shards": "WebDataset .tar files: ROOT as a directory of *.tar, a glob or a brace list (layouts/shards.py)",
}
LAYOUTS["toy"] = LAYOUTS["shards"]


class DatasetMissing(FileNotFoundError):
    """A benchmark's files are not where its layout says; the message says what is expected where."""


class DatasetMalformed(UserError):
    """A benchmark's file is there but does not hold what its layout says; the message names the file."""


@dataclass
class Question:
    id: str
    prompt: str  # the user turn
    media: Media
    options: list[str]  # option texts without letters; empty for an open question
    answer: str | list[str]  # the right option's letter, or an open question's reference answers
    groups: dict[str, str] = field(default_factory=dict)  # summary breakdowns, e.g. {"task": "action_count"}
    lettered: bool = True  # the options are listed in the prompt and answered "X. option"; False: each option is a
    # whole reply to the bare question, scored as written (and a generated reply must be one of them)


@dataclass
class Benchmark:
    name: str
    questions: list[Question]
    letter: Callable[[str, int], str]  # generated reply, option count -> chosen letter ("" = none)
    variant: str = "default"  # the prompt variant (PROMPT_VARIANTS) the prompts and `letter` follow


def options_block(options: list[str]) -> str:
    """Lettered option lines ("A. first", "B. second", …), each ending in a newline."""
    return "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options))


def mvbench_prompt(question: str, options: list[str]) -> str:
    """lmms-eval 0.7.3's MVBench prompt: options as "(A) first" lines, then "Only give the best option.\n"."""
    lines = "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(options))
    return "Question:" + question + "\nOption:\n" + lines + MVBENCH_PROMPT


def videomme_prompt(question: str, option_lines: list[str], variant: str = "default") -> str:
    """lmms-eval 0.7.3's Video-MME prompt, options as given ("A. …"). Its default post-prompt starts with a
    newline of its own, so a blank line comes before it; the llava_vid one ("The best answer is:") has none."""
    post = LETTER_PROMPT if variant == "default" else VIDEOMME_BEST_ANSWER
    return VIDEOMME_PROMPT + "\n" + question + "\n" + "\n".join(option_lines) + "\n" + post


def scienceqa_prompt(hint: str | None, question: str, options: list[str]) -> str:
    """lmms-eval 0.7.3's ScienceQA prompt: "Context: hint" when there is one, the question, "A. …" lines."""
    # lmms-eval keeps a falsy hint as it is, so a missing (None) one is written out as "None"
    context = f"Context: {hint}\n" if hint else f"{hint}"
    return context + question + "\n" + options_block(options).rstrip("\n") + LETTER_PROMPT


def _need(path: Path, name: str) -> Path:
    if not path.exists():
        raise DatasetMissing(f"{name}: {path} not found. Expected layout: {LAYOUTS[name]}")
    return path


def _check_media(name: str, questions: list[Question]) -> None:
    missing = [p for q in questions for p in q.media.items if isinstance(p, Path) and not p.exists()]
    if missing:
        shown = "\n  ".join(map(str, missing[:5]))
        raise DatasetMissing(
            f"{name}: {len(missing)} media files are missing, e.g.\n  {shown}\nExpected layout: {LAYOUTS[name]}"
        )


def _mvbench_media(root: Path, task: str, item: dict) -> Media:
    candidates = MVBENCH_FOLDERS.get(task, ((task, True),))
    for folder, timed in candidates:
        for base in (root / "video", root):
            path = base / folder / item["video"]
            if path.exists():
                window = (item.get("start"), item.get("end")) if timed else (None, None)
                if path.is_dir():
                    frames = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                    return Media("frames", list(frames), *window, fps=FRAME_FOLDER_FPS)
                return Media("video", [path], *window)
    return Media("video", [root / "video" / candidates[0][0] / item["video"]])  # reported as missing


def load_mvbench(root: Path) -> list[Question]:
    files = sorted(_need(root / "json", "mvbench").glob("*.json"))
    if not files:
        raise DatasetMissing(f"mvbench: no task files in {root / 'json'}. Expected layout: {LAYOUTS['mvbench']}")
    questions = []
    for path in files:
        task = path.stem
        for i, item in enumerate(json.loads(path.read_text())):
            options = [str(c) for c in item["candidates"]]
            prompt = mvbench_prompt(item["question"], options)
            answer = LETTERS[options.index(str(item["answer"]))]
            media = _mvbench_media(root, task, item)
            questions.append(Question(f"{task}/{i}", prompt, media, options, answer, {"task": task}))
    return questions


def _video_path(root: Path, video_id: str) -> Path:
    for ext in (".mp4", ".MP4", ".mkv"):
        if (root / "data" / f"{video_id}{ext}").exists():
            return root / "data" / f"{video_id}{ext}"
    return root / "data" / f"{video_id}.mp4"


def _parquet(root: Path, name: str, pattern: str = "*.parquet") -> pd.DataFrame:
    files = sorted(_need(root, name).rglob(pattern))
    if not files:
        raise DatasetMissing(f"{name}: no {pattern} under {root}. Expected layout: {LAYOUTS[name]}")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def load_videomme(root: Path, variant: str = "default") -> list[Question]:
    questions = []
    for row in _parquet(root, "videomme").to_dict("records"):
        lines = [str(o) for o in row["options"]]  # "A. text"
        options = [re.sub(r"^[A-Z]\.\s*", "", o) for o in lines]
        prompt = videomme_prompt(row["question"], lines, variant)
        groups = {k: str(row[k]) for k in ("duration", "domain", "sub_category", "task_type")}
        media = Media("video", [_video_path(root, str(row["videoID"]))])
        questions.append(Question(str(row["question_id"]), prompt, media, options, str(row["answer"]), groups))
    return questions


def _scienceqa_question(qid: str, row: dict, media: Media) -> Question:
    options = [str(c) for c in row["choices"]]
    hint = row.get("hint", "")
    prompt = scienceqa_prompt(None if pd.isna(hint) else hint, row["question"], options)
    groups = {k: str(row[k]) for k in ("subject", "category") if row.get(k)}
    return Question(qid, prompt, media, options, LETTERS[int(row["answer"])], groups)


def load_scienceqa(root: Path) -> list[Question]:
    """The test questions that have an image (ScienceQA-IMG: 2017 in the published test split)."""
    if (root / "problems.json").exists():
        problems = json.loads((root / "problems.json").read_text())
        questions = []
        for pid, row in problems.items():
            if row.get("split") == "test" and row.get("image"):
                base = root / "images" if (root / "images" / "test").is_dir() else root
                media = Media("image", [base / "test" / pid / row["image"]])
                questions.append(_scienceqa_question(pid, row, media))
        return questions
    table = _parquet(root, "scienceqa", "*test*.parquet")
    questions = []
    for i, row in enumerate(table.to_dict("records")):
        image = row.get("image")
        data = image.get("bytes") if isinstance(image, dict) else image
        if data:
            questions.append(_scienceqa_question(f"test/{i}", row, Media("image", [bytes(data)])))
    return questions


def load_textvqa(root: Path) -> list[Question]:
    _need(root / textvqa.FILES["val"], "textvqa")
    return [
        Question(q.question_id, q.prompt, Media("image", [q.image]), [], list(q.answers))
        for q in textvqa.load_questions(root, "val")
    ]


def _shard_question(meta: dict, key: str, raw: dict) -> Question:
    kind, payloads = media_of(raw)
    media = Media("none" if kind == "text" else kind, payloads)
    groups = {k: str(meta[k]) for k in ("task", "duration", "domain", "category") if k in meta}
    qid = str(meta.get("id", key))
    if "answers" in meta:
        answers = [str(a) for a in meta["answers"]]
        return Question(qid, meta["question"] + textvqa.SHORT_ANSWER_PROMPT, media, [], answers, groups)
    options = [str(o) for o in meta.get("options", meta.get("candidates", []))]
    if len(options) < 2:
        raise ValueError("an evaluation sample needs 'options' (2 or more) or 'answers'")
    answer = meta["answer"]
    if isinstance(answer, int):
        index = answer
    elif answer in LETTERS[: len(options)] and len(answer) == 1:
        index = LETTERS.index(answer)
    else:
        index = options.index(str(answer))
    if meta.get("format", "lettered") == "plain":
        return Question(qid, meta["question"], media, options, LETTERS[index], groups, lettered=False)
    prompt = meta["question"] + "\n" + options_block(options).rstrip("\n") + LETTER_PROMPT
    return Question(qid, prompt, media, options, LETTERS[index], groups)


def load_shards(spec: str) -> list[Question]:
    path = Path(spec)
    urls = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_shards(spec)
    if not urls or any("://" not in u and not Path(u).exists() for u in urls):
        raise DatasetMissing(f"shards: no readable .tar shards at {spec}. Expected: {LAYOUTS['shards']}")
    questions = []
    for raw in tarfile_samples([{"url": u} for u in urls]):
        where = f"{raw.get('__url__', spec)}: sample {raw['__key__']}"
        if "json" not in raw:
            raise DatasetMalformed(f"{where} has no JSON member. Expected: {LAYOUTS['shards']}")
        try:
            questions.append(_shard_question(json.loads(raw["json"]), raw["__key__"], raw))
        except (ValueError, KeyError, TypeError) as e:  # the JSON, its fields, or an answer not among the options
            raise DatasetMalformed(f"{where}: {e if isinstance(e, ValueError) else repr(e)}") from e
    return questions


LOADERS: dict[str, Callable[[Path], list[Question]]] = {
    "mvbench": load_mvbench,
    "videomme": load_videomme,
    "scienceqa": load_scienceqa,
    "textvqa": load_textvqa,
}
LETTER_RULES: dict[str, Callable[[str, int], str]] = {
    "mvbench": lambda reply, n: mvbench_letter(reply),
    "videomme": lambda reply, n: videomme_letter(reply),  # A-D whatever the count, as lmms-eval
    "scienceqa": lambda reply, n: scienceqa_letter(reply, LETTERS[:n]),
    "videomme/legacy": lambda reply, n: videomme_letter_legacy(reply),
}


def load_benchmark(name: str, root: str | Path, limit: int | None = None, variant: str = "default") -> Benchmark:
    """The first `limit` questions of a benchmark in its file order, their media checked to exist; prompts
    and letter rule as the prompt `variant` says (PROMPT_VARIANTS)."""
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {NAMES}")
    if name not in PROMPT_VARIANTS.get(variant, ()):
        usable = [v for v, names in PROMPT_VARIANTS.items() if name in names]
        raise ValueError(f"prompt variant {variant!r} does not apply to {name}; expected one of {usable}")
    if name in ("toy", "shards"):
        questions = load_shards(str(root))
    elif name == "videomme":
        questions = load_videomme(Path(root), variant)
    else:
        questions = LOADERS[name](Path(root))
    questions = questions[:limit] if limit is not None else questions
    _check_media(name, questions)
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: question ids are not unique, so results could not be resumed by id")
    # toy/shards: lmms-eval's shared reader (Video-MME's), over as many letters as the question has options
    default_rule = LETTER_RULES.get(name, lambda reply, n: videomme_letter(reply, LETTERS[:n]))
    rule = LETTER_RULES.get(f"{name}/{variant}", default_rule)
    return Benchmark(name, questions, rule, variant)
