"""Multi-turn conversations (`turns`) through SmolLM2's real chat template: tokens and labels."""

import pytest

from inputs.tokenization import IGNORE_INDEX, chat_ids, encode_sample, turns_ids

CONVERSATION = [
    {"role": "user", "content": "What is in the picture?"},
    {"role": "assistant", "content": "A red bus on a street."},
    {"role": "user", "content": "How many wheels can you see?"},
    {"role": "assistant", "content": "Four, 2 on each side."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


def whole(tokenizer, turns):
    """The chat template's rendering of the whole conversation, tokenised at once."""
    return tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False)["input_ids"]


def spans(labels):
    """Maximal runs of labelled positions, as (start, end) pairs."""
    out, start = [], None
    for i, y in enumerate([*labels, IGNORE_INDEX]):
        if y != IGNORE_INDEX and start is None:
            start = i
        elif y == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("system", [None, "You answer in one short sentence."])
def test_turns_tokens_are_the_whole_rendering_and_labels_exactly_the_answers(tokenizer, system):
    turns = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    ids, labels = turns_ids(tokenizer, turns, stage=2)
    assert ids == whole(tokenizer, turns)  # (a) the same tokens as the whole conversation tokenised at once
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [t["content"] for t in turns if t["role"] == "assistant"]
    runs = spans(labels)
    assert len(runs) == len(answers)  # (b) one labelled run per assistant turn …
    for (start, stop), answer in zip(runs, answers, strict=True):
        assert ids[start:stop] == tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]  # … content + end
        assert labels[start:stop] == ids[start:stop]
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")  # … right after its prompt
    text = tokenizer.decode(ids)
    assert (system or "You are a helpful AI assistant named SmolLM") in text  # a given system message replaces it
    assert text.count("<|im_start|>system") == 1
    ids1, labels1 = turns_ids(tokenizer, turns, stage=1)
    assert ids1 == ids and labels1 == ids  # stage 1: every token


def test_single_exchange_as_turns_equals_chat_ids(tokenizer):
    turns = CONVERSATION[:2]
    user, answer = turns[0]["content"], turns[1]["content"]
    for stage in (1, 2):
        assert turns_ids(tokenizer, turns, stage) == chat_ids(tokenizer, user, answer, stage)
    sample = encode_sample(tokenizer, {"turns": turns}, 2, 1000)
    assert (sample["input_ids"], sample["labels"]) == chat_ids(tokenizer, user, answer, 2)
    assert len(encode_sample(tokenizer, {"turns": CONVERSATION}, 2, 10)["labels"]) == 10  # truncated like the rest


def test_where_piecewise_tokens_differ_from_the_whole_rendering(tokenizer):
    """An answer that opens with whitespace BPE merges with the template's newline ("\\n\\n", two spaces) is
    tokenised from its own start, as generation after the prompt would produce it: the token list then differs
    from the whole rendering's, though both decode to the same text. The shard writer strips contents."""
    for answer, same in (("\n\nA bus.", False), ("  A bus.", False), (" A bus.", True), ("A bus. ", True)):
        turns = [CONVERSATION[0], {"role": "assistant", "content": answer}]
        ids, labels = turns_ids(tokenizer, turns, stage=2)
        assert (ids == whole(tokenizer, turns)) == same, repr(answer)
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(turns, tokenize=False)
        assert tokenizer.decode([y for y in labels if y != IGNORE_INDEX]) == answer + "<|im_end|>"


@pytest.mark.parametrize(
    "turns",
    [
        [],
        "not a list",
        [{"role": "user", "content": "only a question"}],
        [{"role": "assistant", "content": "an answer first"}, {"role": "user", "content": "q"}],
        [{"role": "user", "content": "q"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}],
    ],
)
def test_bad_turns_are_rejected(tokenizer, turns):
    with pytest.raises(ValueError):
        encode_sample(tokenizer, {"turns": turns}, 2, 100)


def test_turns_and_user_together_or_in_stage_3_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="not both"):
        encode_sample(tokenizer, {"turns": CONVERSATION, "user": "q"}, 2, 100)
    with pytest.raises(ValueError, match="stage 3"):
        encode_sample(tokenizer, {"turns": CONVERSATION}, 3, 100)
