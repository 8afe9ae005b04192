"""The base vision-language model and its machinery, shared by every kind: the sequence layout and the prefix
(base.py), what passes between reading stages (outputs.py), the loss (loss.py), generation and option scoring
(decoding.py, beam.py), KV caches (kvcache.py), bf16 weight copies (casts.py), LoRA (lora.py), pretrained
backbones (weights.py) and model directories on disk (saved.py)."""
