"""One RL policy update, end to end: forward of a decoder-only transformer, the loss, backward,
optimizer step, with each loss path a user can run today on the same model and batch.

    python -m benchmarks.step               # GPU: benchmarks/results/<device>.step.{json,png,md}
    python -m benchmarks.step --tiny --out DIR          # CPU check (tiny model, interpreter)
    python -m benchmarks.step --report-only RESULTS.step.json [--readme README.md]

Parts: ``grid`` (models, micro-batches, paths, settings), ``batch`` (the RL batch: prompts,
completions of random length, groups, old log-probs), ``paths`` (the head + loss of each path),
``bench`` (the timed steps, peak memory, the results file), ``report`` (schema, the headline
table, the figure). See ``grid.PATHS`` for what each path runs.
"""
