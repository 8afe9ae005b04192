"""Answer scoring as lmms-eval 0.7.3 does it, so our generate-protocol numbers compare with published ones.

- `normalize_answer` / `vqa_accuracy`: the EvalAI answer processor that lmms-eval applies to TextVQA
  predictions and to all 10 human answers, and the VQA accuracy: the mean over the 10 leave-one-out
  subsets of min(1, matching answers / 3).
- `videomme_letter`, `mvbench_letter`, `scienceqa_letter`: lmms-eval's rules for reading the chosen
  option out of a generated reply. They differ per benchmark, quirks included (noted where they bite),
  because a reply such as "Answer: B" is scored differently by each of them.
- `mvbench_summary`: lmms-eval's MVBench aggregate, which leaves empty replies out of each task's count.
"""

from __future__ import annotations

import re
import statistics
import string
from collections import defaultdict

LMMS_EVAL_VERSION = "0.7.3"  # the release whose prompts, verdicts and aggregates the generate protocol follows

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# EvalAI's table of apostrophe-less spellings. Its entries with capitals ("Im", "Ive", "Id've") are left
# out: answers are lowercased before the lookup, so they can never match.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The original pattern is r"(?!<=\d)(\.)(?!\d)": its "(?!<=" is a typo for a lookbehind and never fires, so
# what it does is drop periods not followed by a digit ("3.5" stays, "end." and "u.s" lose theirs). And it is
# called as sub("", text, re.UNICODE): the flag lands in `count`, so only the first 32 such periods go.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_DROPPED = int(re.UNICODE)


def _strip_punctuation(text: str) -> str:
    """A mark next to a space (or any mark, once a digit,digit comma appears) is deleted, else becomes a space."""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_DROPPED)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processing: lowercase; commas and '?' dropped (so "1,000" -> "1000"); "'s" split
    off; punctuation; number words 0-10 to digits; articles dropped; missing apostrophes restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of min(1, matches / 3), all normalised.

    With 10 answers of which k equal the prediction: 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, 4+. Averaged with
    `statistics.mean` (exact, then rounded once) as lmms-eval does, so the float is the same to the last bit.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    hits = sum(r == pred for r in refs)
    # leaving out a matching answer leaves hits - 1 matches, leaving out another leaves hits
    return statistics.mean(min(1.0, (hits - (r == pred)) / 3) for r in refs)


# lmms-eval 0.7.3's `extract_mcq_answer`: marks stripped from both ends (one kind after the other), the
# formats a letter can stand in, most trusted first, and the phrases after which the first letter counts.
_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'", '"')
_FORMAT_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                    "right_paren": 3, "space": 2, "fallback": 0}  # fmt: skip
_FORMATS = (("parentheses", "(%s)"), ("period", "%s."), ("colon", "%s:"), ("right_paren", "%s)"), ("space", "%s "))
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip


def mcq_letter(reply: str, letters: str = "ABCDEFGH") -> str:
    """lmms-eval's shared multiple-choice reader (Video-MME's since 0.7.2): every place a letter of `letters`
    stands as an answer ("B" at either end, after "the answer is", "(B)", "B.", "B:", "B)", "B ") is a
    candidate; the most trusted format wins, and within it the last one. Only if none is found does a capital
    anywhere count (the last), even inside a word. "" when there is none; lowercase letters never count.
    """
    if not reply.strip():
        return ""
    choices = letters or "ABCDEFGH"
    text = reply.strip()
    for mark in _EDGE_MARKS:
        text = text.strip(mark)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter) in lmms-eval's order of search
    for fmt, pattern in _FORMATS:
        found += [(_FORMAT_PRIORITY[fmt], text.rfind(pattern % x), x) for x in choices if pattern % x in text]
    lower = text.lower()  # quirk: a position found in the lowercased text is used on the original
    for phrase in _ANSWER_PHRASES:
        if (at := lower.find(phrase)) != -1:
            after = at + len(phrase)
            found += [(_FORMAT_PRIORITY["phrase"], text.find(x, after), x) for x in choices if x in text[after:]]
    core = text.strip()
    for x in choices:
        if core.startswith(x) and (len(core) == 1 or not core[1].isalpha()):
            found.append((_FORMAT_PRIORITY["start"], 0, x))
    for x in choices:
        if core.endswith(x) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((_FORMAT_PRIORITY["end"], len(text) - 1, x))
    if not found:
        found = [(_FORMAT_PRIORITY["fallback"], text.rfind(x), x) for x in choices if x in text]
    # the highest (priority, position); among equals the one found first, as a stable reverse sort keeps it
    return max(found, key=lambda c: c[:2], default=(0, 0, ""))[2]


def videomme_letter(reply: str, letters: str = "ABCD") -> str:
    """Video-MME in lmms-eval 0.7.3: `mcq_letter` over A-D ("Answer: B" -> "B", "Best option: (C)" -> "C")."""
    return mcq_letter(reply, letters)


# lmms-eval's list before 0.7.2; two pairs lack a separating comma there, so each pair is ONE string (quirk kept).
_ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)


def videomme_letter_legacy(reply: str, letters: str = "ABCD") -> str:
    """Video-MME up to lmms-eval 0.7.1 (the `legacy` prompt variant): after removing a few answer prefixes,
    the first capital among `letters` anywhere in the reply, even inside a word ("Because" -> "B",
    "Answer: C" -> "A"); "" when there is none.

    (It also returned "" for replies over 10 words without a capital letter option, which the search already
    implies.) Lowercase letters never count.
    """
    text = reply.strip()
    for prefix in _ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(f"[{re.escape(letters)}]", text)
    return found[0] if found else ""


def mvbench_letter(reply: str) -> str:
    """MVBench: "X. anything" at the start gives X (any case); otherwise, after punctuation and
    lowercasing, the first standalone letter a-e ("(b)" -> "B", "the answer is c" -> "C", but also
    "a dog" -> "A": the article counts). "" when there is none.

    Failing that, lmms-eval compares the whole processed reply with the processed right letter, so a reply
    that comes down to one later letter ("f", "(F)") still matches an F option: that letter is returned.
    """
    text = reply.strip()
    lead = re.match(r"([A-E])\.\s*(.+)$", text, re.IGNORECASE)
    if lead:
        return lead[1].upper()
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    found = re.search(r"\b([a-e])\b", text)
    if found:
        return found[1].upper()
    return text.upper() if len(text) == 1 and text in string.ascii_lowercase else ""


def scienceqa_letter(reply: str, letters: str) -> str:
    """ScienceQA: the reply is one option letter in either case ("b" is B), or starts with a capital and a
    period ("B. …", read in either case); anything else ("(B)", "The answer is B") reads as no choice."""
    text = reply.strip()
    for x in letters:
        if text.lower() == x.lower():
            return x
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return next((x for x in letters if x.lower() == text[0].lower()), "")
    return ""


def mvbench_summary(records: list[dict], reads: list[str]) -> dict:
    """lmms-eval 0.7.3's MVBench figures per read, from benchmark.py's generate records.

    Each task's accuracy counts only the questions whose reply is not empty (0 when none is); lmms-eval
    prints no overall figure for the group, so `overall` is the plain mean of the task figures, the default
    of its group averaging (and, at 200 questions a task, the pooled accuracy when no reply is empty). A
    question whose media failed has no reply and counts as answered wrongly.
    """
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["groups"].get("task", "")].append(r)

    def task_figure(rows: list[dict], read: str) -> float:
        answered = [r["reads"][read] for r in rows if r["reads"][read].get("reply", None) != ""]
        return 100 * sum(m["score"] for m in answered) / len(answered) if answered else 0

    tasks = {t: {"n": len(rows), **{m: task_figure(rows, m) for m in reads}} for t, rows in sorted(by_task.items())}
    empty = {m: sum(r["reads"][m].get("reply", None) == "" for r in records) for m in reads}
    overall = {m: statistics.fmean(t[m] for t in tasks.values()) for m in reads} if tasks else {}
    return {"overall": {"n": len(records), **overall}, "tasks": tasks, "empty_replies": empty}
