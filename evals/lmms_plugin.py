"""lmms-eval 0.7.3's model `fvlm`: any saved model of the project under the official harness.

    lmms-eval --model fvlm --model_args pretrained=runs/toy/final,read=autoregressive \
        --tasks mvbench,videomme,scienceqa_img,textvqa_val

lmms-eval finds it through its entry-point group `lmms_eval.models` (pyproject.toml; the checkout installed
with `pip install --no-deps --no-build-isolation -e .`). lmms-eval imports this module for every run it makes, so
it names the model class only; the class (evals/lmms_model.py) and the project load when the model is used.
A request is answered as benchmark.py answers a question: its media read with the model's own frame settings
and processor (answering.Answerer), its context as the user turn, a greedy reply or options scored on one
shared prefix. Requests showing the same media share one decode and one encoding, whatever task or document
they come from.

Model args: `pretrained` (a saved model directory, any kind), `read` (one of `model.reads`, default the
last: the foveated model's autoregressive mode), `device`, `batch_size` (accepted as the harness passes it:
the options of one question always run as one batch, a reply is generated one prompt at a time, as the
model's generate continues one clip per row), `max_frames` / `image_frames` / `frame_size` (default the
model's), `max_new_tokens` (when a task sets none; 16, benchmark.py's), `likelihood` (see `loglikelihood`).

A local task runs the same way with `--include_path` (examples/lmms_eval_task is one). lmms-eval 0.7.3 exits 0
when a task cannot load its data, having caught the error; `--verbosity DEBUG` makes it exit non-zero. The model
cannot do it for the harness: the tasks load after the model is built and before it is asked anything
(docs/evaluation.md, "A run that must fail when a task does").
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "fvlm"


def manifest() -> ModelManifest:
    """The entry point's payload (pyproject.toml, group `lmms_eval.models`)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path="evals.lmms_model.FVLM")
