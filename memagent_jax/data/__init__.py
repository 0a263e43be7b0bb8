"""Data for memagent-jax: RULER-HotpotQA, RULER synthetic tasks, MemAgent rows, loaders.

Modules (import the one you need; nothing heavy is imported here):

- `hotpotqa`: RULER-HotpotQA documents from a local HotpotQA distractor-format file
  (paragraph pool, per-question document indices, lazy rendering).
- `ruler_haystack`: haystack sources (essays, noise), length fitting and needle insertion.
- `ruler_synthetic`: the RULER synthetic tasks (niah_*, vt, fwe, qa_1), `generate`, `TASKS`.
- `memagent_rows`: MemAgent's released row format (parquet / jsonl) read and write.
- `tfds_builders`: TFDS builders writing array_record files; `build_dataset`, `load_dataset`.
- `loader`: grain pipeline (shuffle, shard, batch) with a saveable iterator state.

Every module returns *sample dicts*: at least {"id", "question", "answers", "context"}.
"""
