"""Pixels and text in: media decoded into frames as a model is fed (frames.py), chat-template tokenization
(tokenization.py), and each model's processor, which turns samples into a batch with its labels (processors.py)."""
