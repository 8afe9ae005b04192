"""The base vision-language model: whatever turns frames into tokens, a causal LM reading them, its tokenizer.

Every kind of model (model.py's foveated one, towers.py + a connector, SmolVLM) is a `VLM`; the runs (training,
evaluation, chat, the demo, the speed benchmark) use nothing else. The base owns, once for every kind:

- the sequence layout [lead] [frame tokens: T_max x S slots] [rest of the text, right-padded] (vlm/layout.py):
  the lead is empty with `frames_at: start` (the published layout), the chat template's opening with `user_turn`
  (the same head in every row: a pretrained chat LLM reads what stands inside a user turn, but all but ignores
  what precedes its template), and that opening with the first user turn's words with `after_question`, so that a
  read can be written from the question (the foveated model's). Padded frames and padded text are masked out,
  and positions are the running count of real tokens, so a sample padded inside a batch sees exactly the keys
  and positions it would see alone; a text-only sample (T = 0) is valid;
- `prefix` (the LLM state after frames + text, with its KV cache), the loss, parameter groups by submodule
  name, activation checkpointing and the per-batch counts the log needs; generation and option scoring
  continue from the prefix (decoding.py, part of the base).

A kind implements `prepare` (frames -> a `Visual` state: what its reads need, computed once per clip) and
`visual_tokens` (state and the LLM's state over the lead -> tokens). A kind with several ways to read (the
foveated model's modes) names them in `reads`; they reach `visual_tokens` as keyword options, and a kind with one
way to read takes none.
The model files do no I/O: loading and saving live in saved.py, building from backbones in registry.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from inputs.frames import FrameSpec
from inputs.tokenization import user_turn_end, user_turn_head
from vlm import saved
from vlm.casts import stamp
from vlm.decoding import Decoding
from vlm.kvcache import StaticKV, StepCache
from vlm.layout import Layout, Lead, clip_rows, head_first, question_first, question_splits
from vlm.lora import add_lora, is_lora_param, merge_lora
from vlm.loss import labelled_nll, through_labels
from vlm.outputs import Output, Prefix, Visual

# the compiler's settings under which a training step compiles to one graph (`configure_compile`)
COMPILE_OPTIONS = {
    "dynamo": {
        # the sizes a step reads from its data (the real frames a batch encodes, the labelled tokens its loss reads,
        # with frames_at after_question the width of the questions) become symbolic sizes, not graph breaks
        "capture_dynamic_output_shape_ops": True,
        "capture_scalar_outputs": True,
        # a checkpointed LLM layer writes the KV cache of a frame-by-frame read (a StepCache) in the forward; its
        # replay in backward would write the same keys and values again (vlm/kvcache.py), so it need not
        "skip_fwd_side_effects_in_bwd_under_checkpoint": True,
    },
    "inductor": {
        # on a CPU inductor lays convolutions out channels-last, and with the frames' count read from the data the
        # patch embedding's output then fails its own stride check (torch 2.13); a GPU does not do it with symbolic
        # sizes anyway
        "layout_optimization": False,
    },
}


def configure_compile() -> None:
    """Set the process's compiler so that a training step (`forward` with labels and logits=False, the batch cut
    by loss.cut_to_labels as batch_losses cuts it) compiles to one graph, torch.compile(fullgraph=True): call it
    before compiling a model."""
    for name, value in COMPILE_OPTIONS["dynamo"].items():
        setattr(torch._dynamo.config, name, value)
    for name, value in COMPILE_OPTIONS["inductor"].items():
        setattr(torch._inductor.config, name, value)


@dataclasses.dataclass
class Encoded(Visual):
    """A Visual whose features hold the real frames only (padded frames are not encoded), with each one's place in
    the batch, which the reads scatter their tokens back by. Carried rather than found again at each read: their
    number depends on the data, and in a compiled step every read must agree on that one size."""

    places: tuple[Tensor, Tensor] | None = None  # (N,), (N,): each encoded frame's clip and frame, in their order


def real_frames(frame_mask: Tensor, time_major: bool = False) -> tuple[Tensor, Tensor]:
    """frame_mask (B, T) -> the clip and frame (N,), (N,) of each real frame, batch-major (clip 0's frames, then
    clip 1's) or time-major (every clip's frame 0, then every frame 1, ...)."""
    if time_major:
        frame, clip = frame_mask.T.nonzero().unbind(1)
        return clip, frame
    clip, frame = frame_mask.nonzero().unbind(1)
    return clip, frame


def positions(mask: Tensor, new: int) -> Tensor:
    """Position ids of the last `new` slots: the count of real tokens before each slot."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]


class VLM(Decoding, nn.Module):
    """The base: see the module docstring. Subclasses set `kind` and implement `prepare` / `visual_tokens`."""

    kind = ""
    # prefixes of parameter names in the vision tower and the LLM; everything else is the connector
    vision_prefixes: tuple[str, ...] = ()
    llm_prefixes: tuple[str, ...] = ("llm.",)

    def __init__(self, config: Any, llm: nn.Module, tokenizer: Any = None, frames: FrameSpec | None = None):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer  # not a module: carried so generation and saving find it
        self.frames = frames or FrameSpec()  # how clips are fed to the model; saved with it
        lora = getattr(config, "lora", None)
        if lora is not None:
            add_lora(self.llm, lora)
        frames_at = getattr(config, "frames_at", "start")
        if frames_at != "start" and tokenizer is None:
            raise ValueError(f"model.frames_at {frames_at!r} needs the tokenizer: its chat template places the frames")
        head = user_turn_head(tokenizer) if frames_at != "start" else []
        self.register_buffer("head_ids", torch.tensor(head, dtype=torch.long), persistent=False)  # (H,)
        # after_question: the frames go before the end of the first user turn, whose token this is
        self.question_end = user_turn_end(tokenizer) if frames_at == "after_question" else None

    # ---- what a kind provides ----------------------------------------------------------------

    @property
    def reads(self) -> dict[str, dict[str, Any]]:
        """The model's ways to read a clip, by name, as the keyword options `visual_tokens` takes."""
        return {"default": {}}

    @property
    def train_read(self) -> dict[str, Any]:
        """The read training uses."""
        return {}

    @property
    def tokens_per_frame(self) -> int:
        raise NotImplementedError

    def prepare(self, frames: Tensor, frame_mask: Tensor) -> Visual:
        """frames (B, T, 3, H, W) normalised, frame_mask (B, T) -> what every read of these clips needs."""
        raise NotImplementedError

    def visual_tokens(self, visual: Visual, lead: Lead | None = None, **read: Any) -> tuple[Tensor, Tensor | None]:
        """-> tokens (B, T*S, D_llm) (zeros in padded slots) and the read's attention, if the kind has one. `lead` is
        the LLM's state over each clip's text before the frames (its question, with frames_at after_question);
        None: nothing before them."""
        raise NotImplementedError

    def visual_rows(self, visual: Visual, rows: Tensor) -> Visual:
        """The encoding of clips `rows` (R,) of a batch, row r a copy of clip rows[r]'s: questions about one clip
        (a benchmark's several questions about a video) read one encoding of it, each with its own read."""
        raise NotImplementedError

    def backbone_configs(self) -> dict[str, dict]:
        """The transformers configs of the backbones, by name: enough to rebuild the shapes offline."""
        raise NotImplementedError

    @classmethod
    def from_backbones(cls, config: Any, frames: FrameSpec | None = None) -> VLM:
        """A new model around pretrained backbones (hub ids, local directories, or "packaged"), its own parts new."""
        raise NotImplementedError

    @classmethod
    def from_configs(cls, config: Any, backbones: dict, text: Any, frames: FrameSpec) -> VLM:
        """A randomly initialised model of saved shapes (`text`: the tokenizer, or SmolVLM's processor)."""
        raise NotImplementedError

    # the foreign checkpoint layouts this class reads (the published fVLM for the foveated kind: release.py)
    adapters: tuple[saved.Adapter, ...] = ()

    @classmethod
    def holds(cls, kind: str) -> bool:
        """Whether this class builds models of `kind` (one class may build several: the tower + connector kinds)."""
        return kind == cls.kind

    @classmethod
    def from_saved(cls, s: saved.Saved) -> VLM:
        """The model a saved directory (or an adapted foreign checkpoint) describes, with its weights, in eval mode."""
        model = cls.from_configs(s.config, s.backbones, s.text, s.frames)
        model.load_state_dict(s.state_for(model), strict=False)  # state_for: nothing missing, nothing left over
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: Any) -> VLM:
        """A saved model directory, or a foreign checkpoint this class has an adapter for; of this class's kind."""
        s = saved.read_model(path, cls.adapters)
        if not cls.holds(s.kind):
            raise ValueError(f"{path} holds a {s.kind} model, not a {cls.kind or cls.__name__}: use registry.load")
        return cls.from_saved(s)

    def save_pretrained(self, path: Any) -> None:
        saved.save_model(self, path)

    # ---- the LLM's parts (SmolVLM keeps them elsewhere) ------------------------------------------

    def decoder(self) -> nn.Module:
        return self.llm.get_decoder()

    def embed(self, ids: Tensor) -> Tensor:
        return self.llm.get_input_embeddings()(ids)

    def lm_head(self, hidden: Tensor) -> Tensor:
        return self.llm.get_output_embeddings()(hidden)

    def _llm(
        self, embeds: Tensor, mask: Tensor, past: DynamicCache | StaticKV | None = None, compiled: bool = False
    ) -> Tensor:
        """Run the decoder over `embeds` (B, S_new, D), `mask` covering past + new; final-norm hidden states.

        With a DynamicCache `past`, the call writes through a StepCache, so activation checkpointing can replay
        it; a StaticKV (inference) is written in place, the mask padded to its N slots (`compiled`: through
        torch.compile, for the one-token decode step)."""
        if isinstance(past, StaticKV):
            return past.run(self.decoder(), embeds, mask, positions(mask, embeds.shape[1]), compiled)
        step = StepCache(past) if past is not None else None
        decoder = self.decoder()
        # checkpointed layers turn use_cache off themselves and write the StepCache all the same, but say so in a
        # warning, which would break a compiled graph
        checkpointed = getattr(decoder, "gradient_checkpointing", False) and decoder.training
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions(mask, embeds.shape[1]),
            past_key_values=step,
            use_cache=step is not None and not checkpointed,
        )
        if step is not None:
            step.commit(past)
        return out.last_hidden_state

    # ---- sequence layout ----------------------------------------------------------------------

    def slot_mask(self, frame_mask: Tensor) -> Tensor:
        return frame_mask.repeat_interleave(self.tokens_per_frame, dim=1).long()  # (B, T*S)

    def last_slot(self, frame_mask: Tensor) -> Tensor:
        """(B,) index among the T*S frame slots of each clip's last real slot (-1 for a clip without frames)."""
        b, t = frame_mask.shape
        if t == 0:
            return frame_mask.new_full((b,), -1, dtype=torch.long)
        last_frame = (frame_mask.long() * torch.arange(1, t + 1, device=frame_mask.device)).amax(1) - 1
        s = self.tokens_per_frame
        return torch.where(last_frame >= 0, last_frame * s + s - 1, -1)

    def layout(self, input_ids: Tensor, attention_mask: Tensor, split: Tensor | None = None) -> Layout:
        """Where the frames go in each text row (vlm/layout.py). `split` (R,): the column each row's frames go
        before, for a conversation whose latest question is not its first (default: the end of the first user
        turn's words with frames_at after_question, the head's end otherwise)."""
        h = self.head_length(input_ids, attention_mask)
        if self.question_end is None:
            return head_first(input_ids, attention_mask, h)
        if split is None:
            split = question_splits(input_ids, attention_mask, h, self.question_end)
        return question_first(input_ids, attention_mask, split)

    def lead(self, layout: Layout, past: DynamicCache | StaticKV | None = None) -> Lead:
        """The LLM over each row's lead; `past`, when given, then holds its keys and values for the rest of the
        sequence to continue from (a StaticKV is written in place; fill a DynamicCache with `Lead.open`).

        A shared head (frames_at user_turn: half of a short sample's tokens, and the whole of a foveated pass over
        [head, frames] but its T slots) runs for one row and its keys and values are expanded to all rows
        (`_head_state`)."""
        rows, p = layout.lead_ids.shape
        if not p:
            return Lead.empty(rows, self.llm.config.hidden_size, layout.lead_ids.device)
        if layout.shared:
            hidden, kv = self._head_state()
            kv = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv]
            lead = Lead(hidden.expand(rows, -1, -1), layout.lead_mask, kv, False)
        else:
            one = DynamicCache()
            hidden = self._llm(self.embed(layout.lead_ids), layout.lead_mask, one)
            lead = Lead(hidden, layout.lead_mask, [(layer.keys, layer.values) for layer in one.layers], True)
        if isinstance(past, StaticKV):  # preallocated per row: the lead is written into it for every row
            self._llm(self.embed(layout.lead_ids), layout.lead_mask, past)
        elif past is not None:
            lead.open(past)
        return lead

    def _head_state(self) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The LLM over the head for one row: hidden states (1, H, D) and each layer's keys and values.

        While nothing can take a gradient through the LLM (its weights frozen, or no grad), the head's state is
        a constant of the weights: it is kept and reused until a weight changes (an optimizer step or a load
        bumps the tensor's version), the model moves, or the autocast or train/eval setting differs, so a
        training step's passes and an evaluation's questions run it once rather than once each."""
        device = self.head_ids.device
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.llm.parameters())
        key = None
        if not grad and not torch.compiler.is_compiling():  # the stamps are the host's: a compiled step recomputes
            key = (
                device,
                self.llm.training,
                torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type),
                tuple(stamp(p) for p in self.llm.parameters()),
            )
            cached = getattr(self, "_head_cache", None)
            if cached is not None and cached[0] == key:
                return cached[1]
        one = DynamicCache()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):  # kept tensors must be usable in training
            head = self.head_ids[None]
            hidden = self._llm(self.embed(head), torch.ones_like(head), one)  # (1, H, D)
        state = hidden, [(layer.keys, layer.values) for layer in one.layers]
        if key is not None:
            self._head_cache = key, state
        return state

    def head_length(self, input_ids: Tensor, attention_mask: Tensor) -> int:
        """H, the number of leading text tokens of the chat template's opening: every row must start with them."""
        h = len(self.head_ids)
        if not h or torch.compiler.is_compiling():  # the check is a host sync: compiled, `lead_columns` made it
            return h
        if not (input_ids.shape[1] >= h and (input_ids[:, :h] == self.head_ids).all() and attention_mask[:, :h].all()):
            raise ValueError(
                f"model.frames_at is {self.config.frames_at!r}: every text must open with the chat template's "
                f"first user turn ({self.tokenizer.decode(self.head_ids)!r}); tokenise it with tokenization.py's "
                "chat functions"
            )
        return h

    def new_cache(self, kv_cache: bool, room: int | None, length: int) -> DynamicCache | StaticKV | None:
        """A prefix's KV cache: none, a growing DynamicCache, or (with `room`) the model's kept static cache
        (`StaticKV.claim`: at least the prefix's `length` slots and `room` more, emptied, reused across calls, so
        a compiled decode step is captured once). The static one is for inference: training replays the dynamic one
        through StepCache."""
        if room is None:
            return DynamicCache() if kv_cache else None
        if torch.is_grad_enabled():
            raise RuntimeError("the static KV cache is for inference (torch.no_grad); training keeps the dynamic one")
        return StaticKV.claim(self.decoder(), length + room)

    def check_read(self, read: dict[str, Any]) -> None:
        if read not in self.reads.values():
            names = {k: v for k, v in self.reads.items()}
            raise ValueError(f"this {self.kind} model reads in one of {names}, not with options {read}")

    def prefix(
        self,
        visual: Visual,
        input_ids: Tensor,
        attention_mask: Tensor,
        kv_cache: bool = False,
        rows: Tensor | None = None,
        room: int | None = None,
        split: Tensor | None = None,
        **read: Any,
    ) -> Prefix:
        """Run the LLM over [lead, frame tokens, rest of the text]; `kv_cache` keeps its state for continuing (with
        `room`, in a static cache with that many slots to spare: see `new_cache`). `split`: see `layout`.

        `rows` (R,) names the clip of each text row (default: row i reads clip i): several texts about one
        clip (DPO's chosen and rejected answers) share its encoding and its read, which the text cannot change
        (with frames_at after_question they share the question the read is written from).
        """
        self.check_read(read)
        frame_mask = visual.frame_mask
        layout = self.layout(input_ids, attention_mask, split)
        slots, framed, last = self.slot_mask(frame_mask), frame_mask.any(1), self.last_slot(frame_mask)
        if rows is not None:
            slots, framed, last = slots[rows], framed[rows], last[rows]
        mask = torch.cat([layout.lead_mask, slots, layout.rest_mask], dim=1)
        past = self.new_cache(kv_cache, room, mask.shape[1])
        lead = self.lead(layout, past)  # (R rows)
        first = clip_rows(rows, len(frame_mask), layout.lead_ids)  # the reads run once per clip
        vis, attn = self.visual_tokens(visual, lead if first is None else lead.select(first), **read)
        if rows is not None:
            vis = vis[rows]
        run = past if past is not None else lead.open()
        hidden = self._llm(torch.cat([vis, self.embed(layout.rest_ids)], dim=1), mask, run)  # (R, T*S + L', D)
        last_visual = hidden[torch.arange(len(hidden), device=hidden.device), last.clamp(min=0)]
        text_hidden = layout.text(lead.hidden, hidden[:, vis.shape[1] :])
        return Prefix(text_hidden, mask, past, attn, last_visual, framed, layout.cut, hidden[:, : vis.shape[1]])

    def lead_columns(self, input_ids: Tensor, attention_mask: Tensor) -> int:
        """How many leading text columns must stay when a loss cuts the columns after the last label
        (`through_labels`): the head, and with frames_at after_question each row's end of the question. Checks that
        every row opens with the head (`head_length`): a compiled forward leaves that check to its caller."""
        h = self.head_length(input_ids, attention_mask)
        if self.question_end is None or not len(input_ids):
            return h
        return int(question_splits(input_ids, attention_mask, h, self.question_end).max()) + 1

    def uses_cache(self, **read: Any) -> bool:
        """Whether a read itself runs the LLM on a KV cache (then training keeps one too)."""
        return False

    def forward(
        self,
        frames: Tensor,
        frame_mask: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        visual: Visual | None = None,
        rows: Tensor | None = None,
        logits: bool = True,
        **read: Any,
    ) -> Output:
        """frames (B, T, 3, H, W), frame_mask (B, T) bool, input_ids/attention_mask/labels (R, L); `rows` (R,)
        the clip each text row reads (default R = B, row i reads clip i). A precomputed `visual` (from
        `prepare`) lets several reads or options share one encoding; `logits=False` leaves out the logits at
        every position (training needs only the loss, whose few labelled positions are computed apart, and only the
        columns through the last labelled one: `through_labels`)."""
        read = read or self.train_read
        if labels is not None and not logits and not torch.compiler.is_compiling():  # compiled: the caller cuts
            keep = self.lead_columns(input_ids, attention_mask)
            input_ids, attention_mask, labels = through_labels(input_ids, attention_mask, labels, keep)
        if visual is None:
            visual = self.prepare(frames, frame_mask)
        pre = self.prefix(visual, input_ids, attention_mask, self.uses_cache(**read), rows, **read)
        out = Output(self.lm_head(pre.hidden) if logits else None, attention=pre.attention)
        if labels is not None:
            out.nll, out.count = labelled_nll(self.lm_head, pre.hidden, labels, pre.last_visual, pre.framed, pre.cut)
            out.loss = out.nll.sum() / out.count.sum().clamp(min=1)
        return out

    # ---- training support ---------------------------------------------------------------------

    def group_of(self, name: str) -> str:
        """A parameter's learning-rate group by its name: vision | connector | llm, or frozen (an LLM base weight
        under LoRA, which only its adapters train)."""
        if name.startswith(self.vision_prefixes):
            return "vision"
        if name.startswith(self.llm_prefixes):
            if getattr(self.config, "lora", None) is not None and not is_lora_param(name):
                return "frozen"
            return "llm"
        return "connector"

    def share_frozen(self, other: VLM, batches: int = 1) -> bool:
        """Let `other`, a model that reads the same batches (`batches` at a time) right after this one (runs trained
        side by side), reuse this model's work on them that depends only on frozen weights both hold equal; True
        when something is shared.
        Exact: shared work is reused only for equal inputs through unchanged weights. The base shares nothing."""
        return False

    def merge_lora(self) -> VLM:
        """Fold the LLM's LoRA adapters into its weights (for export): the same logits, no adapters, a plain LLM
        that saves without adapter.safetensors. Returns the model."""
        if getattr(self.config, "lora", None) is None:
            raise ValueError("this model has no LoRA adapters to merge")
        merge_lora(self.llm)
        self.config = dataclasses.replace(self.config, lora=None)
        return self

    def checkpoint_activations(self) -> None:
        """Recompute activations in backward instead of keeping them. transformers' checkpointed LLM layers are
        told to keep the KV cache: every call that feeds one writes through a replay-safe StepCache."""
        self.llm.activation_checkpointing_enable({"use_reentrant": False})
        for layer in self.decoder().layers:
            layer._can_checkpoint_with_cache = True

    def counts(self, batch: dict[str, Tensor]) -> tuple[int, int]:
        """(samples, LLM tokens) of a batch: every text token plus S per real frame (DPO: both answers)."""
        text = sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
        rows = sum(1 for k in batch if k.endswith("attention_mask"))
        return batch["frame_mask"].shape[0], text + rows * int(batch["frame_mask"].sum()) * self.tokens_per_frame
