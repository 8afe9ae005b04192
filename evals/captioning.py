"""Caption evaluation: `python benchmark.py --bench captions --data-root DIR --model M [--num-beams 3]`.

Every image (or clip) is captioned by beam search on the model's KV cache, asked with the prompt the model
was trained with for that source (CAPTION_PROMPT for Flickr30k / COCO images, as readers.CaptionReader
trains them; DESCRIBE_PROMPT for the project's caption shards, as their `caption` samples train), and
scored against its references with caption_metrics.score_captions. Perplexity is the references' own,
teacher-forced: each reference is the assistant turn after that prompt, labelled as stage 2 labels it (the
caption and its end-of-turn token), and the per-token mean NLL over all references of the set is
exponentiated. Each read of the model (the foveated model's reads) gets its own captions and figures.

Data (`--data-root`), told apart by what is there:
  Karpathy split  a dataset_flickr30k.json / dataset_coco.json (or a folder holding one); images beside it
                  or under --images; --split train|val|test|restval (default test)
  COCO 2017       ROOT/annotations/captions_{train,val}2017.json + ROOT/{train,val}2017/; --split (default val)
  caption shards  WebDataset .tar files (a folder, glob or brace list): KEY.json holds `caption` (one string
                  or a list of references) and optionally `id`; media as training shards hold them
                  (KEY.000.jpg …, KEY.mp4 or KEY.jpg). The toy world's caption_eval/ is one.

Writes OUT/captions.jsonl (one line per image: id, references, and per read the caption and the references'
summed NLL and token count) and the summary OUT/captions.json. A rerun with the same references and decoding
settings captions only the images (and reads) the JSONL lacks; other settings caption everything afresh.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

import registry
from evals.answering import Answerer
from evals.caption_metrics import caption_tokens, perplexity, score_captions
from evals.results import default_out, read_predictions
from inputs.frames import Media, MediaError
from inputs.tokenization import CAPTION_PROMPT, DESCRIBE_PROMPT
from layouts.caption_sets import (
    COCO_SPLITS,
    KARPATHY_SPLITS,
    CaptionSet,
    CaptionSetMissing,
    read_coco_captions,
    read_karpathy,
)
from layouts.caption_sets import LAYOUTS as SET_LAYOUTS
from layouts.eval_sets import DatasetMissing
from layouts.shards import expand_shards, media_of

KARPATHY_FILES = ("dataset_flickr30k.json", "dataset_coco.json")
LAYOUTS = {
    "karpathy": f"a Karpathy-split JSON: {SET_LAYOUTS['karpathy']} (ROOT: the JSON's folder, or --images)",
    "coco": f"COCO 2017: {SET_LAYOUTS['coco']}",
    "shards": "caption shards: WebDataset .tar files (a directory of *.tar, a glob or a brace list) whose KEY.json "
    "holds 'caption' (a string or a list of references), media as KEY.000.jpg…, KEY.mp4 or KEY.jpg",
}
ANY_LAYOUT = "; or ".join(LAYOUTS.values())
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "cider_d", "token_f1", "perplexity")
STEM = "captions"


@dataclass
class BeamSettings:
    num_beams: int = 3
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 30


@dataclass
class CaptionItem:
    id: str
    media: Media
    references: list[str]


@dataclass
class CaptionData:
    layout: str  # karpathy | coco | shards
    root: str
    split: str | None  # None for shards
    prompt: str  # the user turn every item is asked with
    items: list[CaptionItem]


def _missing(what: str, layout: str | None) -> DatasetMissing:
    expected = f"Expected layout: {LAYOUTS[layout]}" if layout else f"Expected one of: {ANY_LAYOUT}"
    return DatasetMissing(f"captions: {what}. {expected}")


def _layout(root: str) -> tuple[str, Path]:
    """(layout, the path to read) from what `root` names and holds."""
    path = Path(root)
    if re.search(r"[*?\[{]", root) or path.suffix == ".tar":
        return "shards", path
    if path.suffix == ".json":
        return "karpathy", path
    if not path.is_dir():
        raise _missing(f"{root} {'is not a caption set' if path.exists() else 'not found'}", None)
    if (path / "annotations").is_dir():
        return "coco", path
    found = [path / f for f in KARPATHY_FILES if (path / f).is_file()]
    if len(found) == 1:
        return "karpathy", found[0]
    if found:
        raise DatasetMissing(f"captions: {root} holds both {' and '.join(KARPATHY_FILES)}: name the one to read")
    if any(path.glob("*.tar")):
        return "shards", path
    raise _missing(f"{root} holds no caption set", None)


def _from_set(found: CaptionSet, layout: str, limit: int | None) -> list[CaptionItem]:
    records = found.records[:limit] if limit is not None else found.records
    absent = [r.image for r in records if not r.image.is_file()]
    if absent:
        shown = "\n  ".join(map(str, absent[:5]))
        raise DatasetMissing(
            f"captions: {len(absent)} images are missing, e.g.\n  {shown}\nExpected layout: {LAYOUTS[layout]}"
        )
    return [CaptionItem(r.id, Media("image", [r.image]), r.captions) for r in records]


def _shard_items(spec: str, limit: int | None) -> list[CaptionItem]:
    path = Path(spec)
    try:
        urls = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_shards(spec)
    except FileNotFoundError:
        urls = []
    if not urls or any("://" not in u and not Path(u).exists() for u in urls):
        raise _missing(f"no readable .tar shards at {spec}", "shards")
    items = []
    for raw in tarfile_samples([{"url": u} for u in urls]):
        if limit is not None and len(items) >= limit:
            break
        key = raw["__key__"]
        if "json" not in raw:
            raise ValueError(f"caption shard sample {key} has no JSON member")
        meta = json.loads(raw["json"])
        caption = meta.get("caption")
        references = [caption] if isinstance(caption, str) else caption
        if not isinstance(references, list) or not references or not all(isinstance(c, str) for c in references):
            raise ValueError(f"caption shard sample {key}: 'caption' must be a string or a list of strings")
        kind, payloads = media_of(raw)
        if kind == "text":
            raise ValueError(f"caption shard sample {key} has no media to caption")
        items.append(CaptionItem(str(meta.get("id", key)), Media(kind, payloads), [c.strip() for c in references]))
    return items


def load_captions(
    root: str | Path, split: str | None = None, images: str | Path | None = None, limit: int | None = None
) -> CaptionData:
    """The first `limit` images of a caption set in any of the three layouts, their media checked to exist.

    Raises DatasetMissing (one message naming the expected layout) for missing files, ValueError for a
    split the layout lacks or a malformed file."""
    layout, path = _layout(str(root))
    if layout == "shards":
        if split is not None:
            raise ValueError("caption shards have no splits: leave out --split")
        items, prompt = _shard_items(str(root), limit), DESCRIBE_PROMPT
    else:
        allowed = KARPATHY_SPLITS if layout == "karpathy" else COCO_SPLITS
        split = split or ("test" if layout == "karpathy" else "val")
        if split not in allowed:
            raise ValueError(f"the {layout} layout has splits {allowed}, not {split!r}")
        try:
            if layout == "karpathy":
                found = read_karpathy(path, images, split)
            else:
                found = read_coco_captions(path, split)
                if images is not None:  # the {split}2017/ folders live elsewhere
                    for r in found.records:
                        r.image = Path(images) / r.image.relative_to(path)
        except CaptionSetMissing as e:  # its message names the file and the layout
            raise DatasetMissing(f"captions: {e}") from e
        items, prompt = _from_set(found, layout, limit), CAPTION_PROMPT
    for item in items:  # a reference without words cannot be scored (nor trained on)
        item.references = [r for r in item.references if caption_tokens(r)]
        if not item.references:
            raise ValueError(f"captions: image {item.id} has no reference caption with words")
    if not items:
        raise ValueError(f"captions: no images in {root}" + (f" (split {split})" if split else ""))
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise ValueError("captions: image ids are not unique, so results could not be resumed by id")
    return CaptionData(layout, str(root), split, prompt, items)


def caption_reads(
    answerer: Answerer, item: CaptionItem, prompt: str, reads: list[str], decoding: BeamSettings
) -> dict[str, dict]:
    """One image in every read from one `prepare`: the generated caption and the references' summed NLL and
    token count (teacher-forced, as stage 2 labels them)."""
    model, processor = answerer.model, answerer.processor
    state = answerer.prepare(item.media)
    ids = processor.prompt(prompt, state.pictures)
    continuations, labels = processor.answers(prompt, item.references)
    prompt_ids = torch.tensor([ids], device=answerer.device)
    out = {}
    for name in reads:
        read = answerer.reads[name]
        new = model.generate(
            state.visual, prompt_ids, torch.ones_like(prompt_ids), decoding.max_new_tokens, processor.end_ids,
            decoding.num_beams, decoding.length_penalty, decoding.no_repeat_ngram_size, **read,
        )  # fmt: skip
        caption = processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
        nll, count = model.option_nll(state.visual, ids, continuations, labels, mean=False, **read)
        out[name] = {"caption": caption, "nll": float(nll.sum()), "tokens": int(count.sum())}
    return out


def _done(record: dict | None, item: CaptionItem, decoding: dict) -> dict | None:
    """The record if it holds this image's references under these settings (else it must be redone)."""
    if record and record.get("references") == item.references and record.get("decoding") == decoding:
        return record
    return None


def _cut_short(path: Path) -> bool:
    if not path.exists() or not path.stat().st_size:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def summarize(records: list[dict], reads: list[str]) -> tuple[dict[str, dict], dict]:
    """({read: every metric}, the metrics' tokenisation). An image whose media failed counts with an empty
    caption and adds no tokens to the perplexity."""
    refs = {r["id"]: r["references"] for r in records}
    metrics, tokenisation = {}, {}
    for name in reads:
        per_read = [r["reads"][name] for r in records]
        scores = score_captions({r["id"]: x["caption"] for r, x in zip(records, per_read, strict=True)}, refs)
        tokenisation = scores.pop("tokenisation")
        scores.pop("num_images")
        nll, tokens = [x["nll"] for x in per_read], [x["tokens"] for x in per_read]
        scores["perplexity"] = perplexity(nll, tokens) if sum(tokens) else None
        metrics[name] = {k: scores[k] for k in METRICS}
    return metrics, tokenisation


def evaluate(answerer: Answerer, data: CaptionData, reads: list[str], decoding: BeamSettings, out: Path) -> dict:
    """Caption the images (and reads) the JSONL lacks, appending as it goes, then write the summary."""
    out.mkdir(parents=True, exist_ok=True)
    path = (out / STEM).with_suffix(".jsonl")
    settings = asdict(decoding)
    saved = read_predictions(path)
    done = {i.id: r for i in data.items if (r := _done(saved.get(i.id), i, settings))}
    todo = [(i, [m for m in reads if m not in done.get(i.id, {}).get("reads", {})]) for i in data.items]
    todo = [(i, ms) for i, ms in todo if ms]
    with path.open("a") as f:
        if _cut_short(path):  # a crash left half a line: the next record starts on its own
            f.write("\n")
        for item, wanted in tqdm(todo, desc=f"captions ({data.split or data.layout})", unit="img", disable=not todo):
            record = done.get(item.id) or {"id": item.id, "references": item.references, "decoding": settings,
                                           "reads": {}}  # fmt: skip
            try:
                record["reads"].update(caption_reads(answerer, item, data.prompt, wanted, decoding))
            except MediaError as e:  # an empty caption in every read, and reported
                record["error"] = str(e)
                record["reads"].update({m: {"caption": "", "nll": 0.0, "tokens": 0} for m in wanted})
            done[item.id] = record
            f.write(json.dumps(record) + "\n")
            f.flush()
    records = [done[i.id] for i in data.items]
    metrics, tokenisation = summarize(records, reads)
    summary = {
        "bench": "captions",
        "layout": data.layout,
        "data_root": data.root,
        "split": data.split,
        "prompt": data.prompt,
        "num_images": len(records),
        "answered_now": len(todo),
        "errors": sum("error" in r for r in records),
        "reads": reads,
        "decoding": settings,
        "metrics": metrics,
        "tokenisation": tokenisation,
    }
    (out / STEM).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict) -> None:
    d = summary["decoding"]
    where = f"{summary['layout']} {summary['split']}" if summary["split"] else summary["layout"]
    print(f"\ncaptions ({where}, {summary['num_images']} images; {d['num_beams']} beams, length penalty "
          f"{d['length_penalty']}, no-repeat n-gram {d['no_repeat_ngram_size']}, at most {d['max_new_tokens']} "
          "tokens)")  # fmt: skip
    heads = ("BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-L", "CIDEr-D", "F1", "PPL")
    keys = ("bleu1", "bleu4", "rouge1", "rougeL", "cider_d", "token_f1", "perplexity")
    print(f"  {'read':<16}" + "".join(f"{h:>9}" for h in heads[:-1]) + f"{heads[-1]:>12}")
    for name, m in summary["metrics"].items():
        cells = "".join(f"{m[k]:9.3f}" for k in keys[:-1])
        cells += f"{m['perplexity']:12.2f}" if m["perplexity"] is not None else f"{'-':>12}"
        print(f"  {name:<16}{cells}")
    if summary["errors"]:
        print(f"  {summary['errors']} images had undecodable media (empty captions)")


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """benchmark.py's `--bench captions`: its parsed arguments (`parser` reports a bad combination)."""
    if args.protocol is not None or args.prompt_variant != "default":
        parser.error("captions are generated with the prompt the model was trained with: no --protocol or "
                     "--prompt-variant")  # fmt: skip
    decoding = BeamSettings(args.num_beams, args.length_penalty, args.no_repeat_ngram_size, args.max_new_tokens)
    if decoding.num_beams < 1 or decoding.max_new_tokens < 1 or decoding.no_repeat_ngram_size < 0:
        parser.error("--num-beams and --max-new-tokens must be >= 1, --no-repeat-ngram-size >= 0")
    if decoding.no_repeat_ngram_size and decoding.num_beams == 1:
        parser.error("--no-repeat-ngram-size needs beam search: set --num-beams > 1")
    try:
        data = load_captions(args.data_root, args.split, args.images, args.limit)
    except DatasetMissing as e:
        sys.exit(str(e))
    except ValueError as e:
        sys.exit(f"error: {e}")
    model = registry.load(args.model).to(args.device)
    answerer = Answerer(model, args.max_frames, args.image_frames, args.frame_size)
    reads = args.reads.split(",") if args.reads else list(answerer.reads)
    if unknown := [m for m in reads if m not in answerer.reads]:
        parser.error(f"reads {unknown} are not among this model's {list(answerer.reads)}")
    out = args.out or default_out(args.model)
    summary = evaluate(answerer, data, reads, decoding, out)
    print_summary(summary)
    print(f"captions and summary in {out}")
    return summary
