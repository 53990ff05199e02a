"""Offline tools that are not part of the serving runtime: training the bundled model
(`training`: batched training forward, corpus, held-out prompt sets) and self-distilling its
draft-only LoRA (`distill`). Used by `launch/train_bundled_model.py`, `launch/measure_modes.py`
and the tests; nothing under `sglang_nemodiff` outside this package imports it."""
