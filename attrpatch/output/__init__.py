"""Stage 6, output: atomic files, checkpoints for --resume, provenance (weights hash, versions, manifest),
report.json / results.csv / scores.safetensors, and report.md."""
