"""Stage 3, engine: hooks (one context manager installs and removes them all), forward passes that read
the last token's logits, passes resumed at a block, the metrics, and data parallelism over prompts."""
