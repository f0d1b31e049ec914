"""Data: read sources, apply the template, tokenize with loss masks, check train/inference parity, cache, batch.

``pipeline.prepare(recipe, tokenizer)`` is what training calls; ``pipeline.prompt_ids`` and
``pipeline.stop_token_ids`` are what generation calls, so both sides tokenize prompts the same way.
"""
