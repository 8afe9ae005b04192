"""A conversation about one clip: the visual prefix computed once, every later turn continuing on its KV cache.

The chat template decides the text: before each turn the whole conversation so far is rendered, and only what
the cache does not hold yet (the previous reply's end of turn, the new user turn, the generation prompt) is
tokenised and fed; the reply is generated greedily on the cache and streamed, optionally under transformers' rules
against repeating (vlm/beam.py's `restrain`, over every token of the conversation so far, as `VLM.generate`
applies them over its prompt and reply). A reply the template would write
otherwise than it was generated (stripped of surrounding spaces, or SmolVLM's "Assistant: " + reply after a
generation prompt of "Assistant:") is taken back out of the cache and fed, as the template writes it, with
the next turn. So what the model has read is
always exactly the template's rendering of the conversation, and a question about the same clip never
re-encodes it. A new clip is a new Conversation.

With the frames after the question (`model.frames_at: after_question`), every question gets a read of its own:
the LLM runs anew over the conversation so far with the frames after the latest question's words, read from the
clip's encoding (computed once) with queries written after that question, and `looks` keeps where each question
looked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from cli import UserError
from evals.answering import Answerer, Prepared
from vlm.beam import check_restraints, restrain, seen


class Conversation:
    def __init__(self, answerer: Answerer, state: Prepared, read: str | None = None) -> None:
        """`state` from answerer.prepare (the clip, encoded once); `read` one of answerer.reads (default: the
        last, the foveated model's autoregressive mode)."""
        self.answerer, self.state = answerer, state
        self.read = read or list(answerer.reads)[-1]
        if self.read not in answerer.reads:
            raise UserError(f"this model reads in {list(answerer.reads)}, not {self.read!r}")
        self.messages: list[dict[str, str]] = []
        self.fed = ""  # the rendered conversation whose tokens the cache holds
        self.ids: list[int] = []  # those tokens
        self.asked: list[int] = []  # the tokens read when the latest reply began
        self.past: Any = None  # the KV cache, after the first turn
        self.mask: Tensor | None = None  # (1, S) over the cache
        self.attention: Tensor | None = None  # the latest read's attention (T, maps, positions), when the kind has one
        self.looks: list[tuple[str, Tensor | None]] = []  # each question and the attention of the read it got
        self.rereads = getattr(answerer.model, "question_end", None) is not None  # frames after each question

    def _feed(self, text: str) -> Tensor:
        """Run the tokens of `text` through the model on the cache; the hidden state after the last one (1, D)."""
        model, processor, device = self.answerer.model, self.answerer.processor, self.answerer.device
        first = self.past is None
        ids = processor.turn_ids(text, self.state.pictures, first)
        self.ids += ids
        tensor = torch.tensor([ids], device=device)
        split = None
        if self.rereads:  # the whole conversation again, the frames after its latest question (the last end of turn)
            tensor = torch.tensor([self.ids], device=device)
            split = torch.tensor([len(self.ids) - 1 - self.ids[::-1].index(model.question_end)], device=device)
        if first or self.rereads:  # the prefix: frames (or the prompt's image tokens) and the user turn
            pre = model.prefix(self.state.visual, tensor, torch.ones_like(tensor), True, None, split=split,
                               **self.answerer.reads[self.read])  # fmt: skip
            self.past, self.mask = pre.past, pre.mask
            self.attention = None if pre.attention is None else pre.attention[0].cpu()
            return pre.hidden[:, -1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(1, len(ids))], dim=1)
        return model._llm(model.embed(tensor), self.mask, self.past)[:, -1]

    @torch.inference_mode()
    def ask(
        self, question: str, max_new_tokens: int = 128, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0
    ) -> Iterator[str]:
        """Stream the reply to `question`: the text so far after every new token. The two rules against repeating
        (off by default) see the whole conversation, so a reply is what `VLM.generate` writes after it."""
        check_restraints(repetition_penalty, no_repeat_ngram_size)
        restrained, held = repetition_penalty != 1.0 or no_repeat_ngram_size, None
        processor, model = self.answerer.processor, self.answerer.model
        messages = [*self.messages, {"role": "user", "content": question}]
        rendered = processor.render(messages, self.state.pictures, generation_prompt=True)
        if not rendered.startswith(self.fed):
            raise ValueError("the chat template rendered the earlier turns differently: cannot continue the cache")
        hidden = self._feed(rendered[len(self.fed) :])
        self.fed, self.asked = rendered, list(self.ids)
        self.looks.append((question, self.attention))
        ends, tokenizer, new = set(processor.end_ids), processor.tokenizer, []
        for _ in range(max_new_tokens):
            logits = model.lm_head(hidden)  # (1, V)
            if restrained:
                if held is None and repetition_penalty != 1.0:
                    held = seen([self.ids], logits.shape[-1], logits.device)
                logits = restrain(logits.float(), [self.ids], held, repetition_penalty, no_repeat_ngram_size)
            token = int(logits.argmax(-1))
            if token in ends:
                break
            new.append(token)
            self.ids.append(token)
            if held is not None:
                held[0, token] = True
            self.mask = torch.cat([self.mask, self.mask.new_ones(1, 1)], dim=1)
            step = model.embed(torch.tensor([[token]], device=self.answerer.device))
            hidden = model._llm(step, self.mask, self.past)[:, -1]
            yield tokenizer.decode(new, skip_special_tokens=True)
        said = tokenizer.decode(new)  # the reply's tokens are in the cache; its end of turn is fed with the next turn
        turn = [*messages, {"role": "assistant", "content": said.strip() or said}]
        if processor.render(turn, self.state.pictures, generation_prompt=False).startswith(self.fed + said):
            self.fed += said
        elif new:  # the template writes the reply otherwise (SmolVLM: "Assistant: " + reply after "Assistant:"):
            self.past.crop(-len(new))  # take it out of the cache; the next turn feeds the template's version
            self.mask, self.ids = self.mask[:, : -len(new)], self.ids[: -len(new)]
        self.messages = turn
        if not new:
            yield ""
