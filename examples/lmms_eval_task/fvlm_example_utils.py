"""The functions fvlm_example.yaml names: a document of fvlm_example.json → the model's visuals and prompt, and
its reply → a score.

Image paths in the JSON are relative to this folder, so the task runs from any working directory. The prompt and
the letter reader are lmms-eval's multiple-choice ones (as its ScienceQA and Video-MME tasks ask), so the scores
read as theirs do.
"""

from __future__ import annotations

from pathlib import Path

from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer
from PIL import Image

HERE = Path(__file__).resolve().parent
LETTERS = "ABCDEFGHIJ"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The document's picture, decoded as lmms-eval's image tasks hand theirs over; none for a text question."""
    return [Image.open(HERE / doc["image"]).convert("RGB")] if doc["image"] else []


def doc_to_text(doc: dict) -> str:
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(doc["options"]))
    return f"{doc['question']}\n{options}{POST_PROMPT}"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1 when the letter read from the reply is the answer's, else 0 (a reply with no letter counts as wrong)."""
    letter = extract_mcq_answer(results[0], list(LETTERS[: len(doc["options"])]))
    return {"accuracy": float(letter == doc["answer"])}
