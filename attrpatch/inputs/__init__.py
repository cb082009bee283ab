"""Stage 1, inputs: prompt pairs (text or token ids), built-in tasks, padded batches, corruptions, and the
one table of directions (which run is the source and which the receiver). No model here."""
