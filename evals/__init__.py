"""Evaluation: answering questions about media with any model (answering.py), the metrics of each benchmark
(metrics.py, caption_metrics.py), captioning, conversations, attention pictures, results files, timing, the GPU
device suite (gpu_suite.py) and the lmms-eval model `fvlm` (lmms_plugin.py, lmms_model.py)."""
