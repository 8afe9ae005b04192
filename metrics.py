"""Answer scoring as the community's evaluation code does it, so our numbers compare with published ones.

- `normalize_answer` / `vqa_accuracy`: the EvalAI answer processor that lmms-eval applies to TextVQA
  predictions and to all 10 human answers, and the VQA accuracy: the mean over the 10 leave-one-out
  subsets of min(1, matching answers / 3).
- `videomme_letter`, `mvbench_letter`, `scienceqa_letter`: lmms-eval's rules for reading the chosen
  option out of a generated reply. They differ per benchmark, quirks included (noted where they bite),
  because a reply such as "Answer: B" is scored differently by each of them.
"""

from __future__ import annotations

import re

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
# what it does is drop every period not followed by a digit ("3.5" stays, "end." and "u.s" lose theirs).
_PERIOD = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    """A mark next to a space (or any mark, once a digit,digit comma appears) is deleted, else becomes a space."""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processing: lowercase; commas and '?' dropped (so "1,000" -> "1000"); "'s" split
    off; punctuation; number words 0-10 to digits; articles dropped; missing apostrophes restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of min(1, matches / 3), all normalised.

    With 10 answers of which k equal the prediction: 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, 4+.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    hits = sum(r == pred for r in refs)
    # leaving out a matching answer leaves hits - 1 matches, leaving out another leaves hits
    return sum(min(1.0, (hits - (r == pred)) / 3) for r in refs) / len(refs)


# lmms-eval's list; two pairs lack a separating comma there, so each pair is ONE string (quirk kept).
_ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)


def videomme_letter(reply: str, letters: str = "ABCD") -> str:
    """Video-MME: after removing a few answer prefixes, the first capital among `letters` anywhere in the
    reply, even inside a word ("Because" -> "B", "Answer: C" -> "A"); "" when there is none.

    (lmms-eval also returns "" for replies over 10 words without a capital letter option, which the
    search already implies.) Lowercase letters never count.
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
    """
    text = reply.strip()
    lead = re.match(r"([A-E])\.\s*(.+)$", text, re.IGNORECASE)
    if lead:
        return lead[1].upper()
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    found = re.search(r"\b([a-e])\b", text)
    return found[1].upper() if found else ""


def scienceqa_letter(reply: str, letters: str) -> str:
    """ScienceQA: the reply is exactly one option letter, or starts with a capital and a period ("B. …");
    anything else ("(B)", "b", "The answer is B") reads as no choice."""
    text = reply.strip()
    if text in letters and len(text) == 1:
        return text
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return text[0]
    return ""
