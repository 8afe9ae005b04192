"""Chat-template tokenisation with loss labels, built in one place for training, DPO and inference.

Labels are aligned with `input_ids` (the model shifts them) and use -100 for "no loss". The pad id is
never used as the ignore value: SmolLM2's pad id is its EOS id `<|im_end|>`, which the model must
learn to emit at the end of every answer.

A conversation is tokenised in three pieces — the prompt up to the generation prompt
(`<|im_start|>assistant\\n`), the answer text, and the template's end-of-turn suffix (`<|im_end|>\\n`) —
so the prompt tokens are exactly those `prompt_ids` gives at inference and the answer's tokens never
merge with the template's. Stage 2 and DPO label the answer and the end-of-turn token only.

A multi-turn conversation (`turns`) is cut the same way at every assistant turn: the rendering of the whole
conversation is split at the start and end of each assistant content, and the pieces are tokenised
separately, so every answer starts on a token boundary exactly where generation would start. The result
equals tokenising the whole rendering at once unless an answer begins with whitespace that BPE would merge
with the template's newline; the shard writer strips contents, so converted data never hits that case.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
DESCRIBE_PROMPT = "Describe this video."  # the user turn given to legacy caption-only samples
CAPTION_PROMPT = "Describe this image."  # the user turn of the caption sets (Flickr30k, COCO)
ROLES = ("system", "user", "assistant")


def _render(tokenizer: Any, user: str, assistant: str | None = None) -> str:
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=assistant is None)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: Any, user: str) -> list[int]:
    """Tokens of a user turn followed by the generation prompt: what the model continues at inference."""
    return _ids(tokenizer, _render(tokenizer, user))


def user_turn_head(tokenizer: Any) -> list[int]:
    """Tokens of the chat template up to the content of the first user turn (system prompt included):
    what every `prompt_ids` / `chat_ids` row starts with, and where `model.frames_at: user_turn` puts the frames."""
    marker = "FVLM_USER_CONTENT"
    rendered = _render(tokenizer, marker)
    head = _ids(tokenizer, rendered[: rendered.index(marker)])
    if prompt_ids(tokenizer, "Hello")[: len(head)] != head:
        raise ValueError("the chat template's opening does not tokenise the same on its own as before a user turn")
    return head


def user_turn_end(tokenizer: Any) -> int:
    """The token that ends a user turn's content in the chat template (SmolLM2's `<|im_end|>`): where
    `model.frames_at: after_question` puts the frames, right after the question's words."""
    marker = "FVLM_USER_CONTENT"
    rendered = _render(tokenizer, marker)
    after = _ids(tokenizer, rendered[rendered.index(marker) + len(marker) :])
    if not after or after[0] not in tokenizer.all_special_ids:
        raise ValueError("the chat template does not close a user turn with a special token: cannot find the question")
    return after[0]


def _answer(tokenizer: Any, user: str, assistant: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt, answer, end-of-turn suffix) token lists of one exchange."""
    prompt, full = _render(tokenizer, user), _render(tokenizer, user, assistant)
    if not full.startswith(prompt + assistant):
        raise ValueError("the chat template does not place the answer right after the generation prompt")
    return _ids(tokenizer, prompt), _ids(tokenizer, assistant), _ids(tokenizer, full[len(prompt + assistant) :])


def answer_labels(prompt: list[int], answer: list[int], suffix: list[int]) -> list[int]:
    """Labels of prompt + answer + suffix that train the answer and its end-of-turn token only."""
    # The suffix's first token is the end-of-turn token; what follows it (a newline) is not an answer.
    return [IGNORE_INDEX] * len(prompt) + answer + suffix[:1] + [IGNORE_INDEX] * (len(suffix) - 1)


def chat_ids(tokenizer: Any, user: str, assistant: str, stage: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one exchange: stage 1 learns every token, later stages the answer only."""
    prompt, answer, suffix = _answer(tokenizer, user, assistant)
    ids = prompt + answer + suffix
    return ids, list(ids) if stage == 1 else answer_labels(prompt, answer, suffix)


def check_turns(turns: Any) -> list[dict[str, str]]:
    """Checked role/content messages: an optional leading system message, then user first, at least one answer.
    Raises ValueError otherwise; the shard writer checks converted conversations with it."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("'turns' must be a non-empty list of {role, content} messages")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            raise ValueError(f"turn {i} must be {{role: {'|'.join(ROLES)}, content: str}}, got {t!r}")
        if t["role"] == "system" and i:
            raise ValueError(f"turn {i}: a system message may only open the conversation")
        out.append({"role": t["role"], "content": t["content"]})
    talk = out[1:] if out[0]["role"] == "system" else out
    if not talk or talk[0]["role"] != "user":
        raise ValueError("a conversation must open with a user turn (after an optional system message)")
    if not any(t["role"] == "assistant" for t in talk):
        raise ValueError("a conversation needs at least one assistant turn")
    return out


def turns_ids(tokenizer: Any, turns: list[dict[str, str]], stage: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation through the chat template: stage 1 learns every token,
    later stages each assistant content and the end-of-turn token after it, nothing else."""
    messages = check_turns(turns)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    cuts = []  # (start, end) character spans of the assistant contents in the full rendering
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt + m["content"]):
            raise ValueError(f"the chat template does not place turn {i}'s answer right after its generation prompt")
        cuts.append((len(prompt), len(prompt) + len(m["content"])))
    ids, labels, pos = [], [], 0
    for start, end in [*cuts, (len(full), len(full))]:  # the sentinel closes the text after the last answer
        context, answer = _ids(tokenizer, full[pos:start]), _ids(tokenizer, full[start:end])
        # A context that follows an answer opens with that answer's end-of-turn token: learned (chat_ids' suffix[:1]).
        learned = 1 if pos and context else 0
        ids += context + answer
        labels += context[:learned] + [IGNORE_INDEX] * (len(context) - learned) + answer
        pos = end
    return ids, list(ids) if stage == 1 else labels


def _text(meta: dict, key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _pretokenized(meta: dict) -> tuple[list[int], list[int]]:
    ids, mask = meta["token_ids"], meta.get("loss_mask")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
        raise ValueError("'token_ids' must be a non-empty list of ints")
    if not isinstance(mask, list) or len(mask) != len(ids):
        raise ValueError("'loss_mask' must be a list as long as 'token_ids'")
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def encode_sample(tokenizer: Any, meta: dict, stage: int, max_len: int) -> dict[str, list[int]]:
    """A shard sample's JSON → token lists, truncated on the right to max_len.

    Accepted forms: pre-tokenized `token_ids` + `loss_mask` (labels follow the mask whatever the
    stage), `user` + `assistant`, a multi-turn `turns` list of {role, content} messages (an optional leading
    system message replaces the template's default one), a legacy `caption` (asked for with
    DESCRIBE_PROMPT), and in stage 3 `user` + `chosen` + `rejected` (both answers after the same prompt).
    Returns `input_ids`/`labels`, or for DPO `chosen_input_ids`/`chosen_labels`/`rejected_input_ids`/`rejected_labels`.
    Raises ValueError for a sample that fits none of these or does not suit the stage.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"sample JSON must be an object, got {type(meta).__name__}")
    if stage == 3:
        if "chosen" not in meta:
            raise ValueError("stage 3 needs 'chosen' and 'rejected' answers")
        prompt, chosen, suffix = _answer(tokenizer, _text(meta, "user"), _text(meta, "chosen"))
        rejected = _ids(tokenizer, _text(meta, "rejected"))
        out = {}
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            out[f"{name}_input_ids"] = (prompt + answer + suffix)[:max_len]
            out[f"{name}_labels"] = answer_labels(prompt, answer, suffix)[:max_len]
        return out
    if "chosen" in meta:
        raise ValueError(f"a preference pair (chosen/rejected) needs stage 3, not stage {stage}")
    if "token_ids" in meta:
        ids, labels = _pretokenized(meta)
    elif "turns" in meta:
        if "user" in meta or "assistant" in meta:
            raise ValueError("a sample holds either 'turns' or 'user'/'assistant', not both")
        ids, labels = turns_ids(tokenizer, meta["turns"], stage)
    elif "user" in meta or "assistant" in meta:
        ids, labels = chat_ids(tokenizer, _text(meta, "user"), _text(meta, "assistant"), stage)
    elif "caption" in meta:
        ids, labels = chat_ids(tokenizer, DESCRIBE_PROMPT, _text(meta, "caption"), stage)
    else:
        raise ValueError("sample JSON has none of token_ids, turns, user/assistant, caption")
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}
