"""Data sets in their own layouts: the training shard format and its readers (shards.py, readers.py, shardwriter.py),
the converters from published layouts to shards (converters/), TextVQA and the caption sets, the evaluation sets
(eval_sets.py: MVBench, Video-MME, ScienceQA, TextVQA, shards), and the toy worlds (toy.py)."""
