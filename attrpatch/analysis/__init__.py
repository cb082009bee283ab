"""Stage 5, analysis: pure functions on numbers (no model): ranking and the control draw, agreement and
the false-negative bound, flags and their measured causes, one entry per verified component."""
