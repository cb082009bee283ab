"""Stage 2, model: architecture tables (one row per family), sites and components (what can be scored and
patched, and how to read it from a HuggingFace module), and loading models and tokenizers."""
