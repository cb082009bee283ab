"""Stage 4, methods: the estimators (one module each, formula and cost in its docstring: atp, ig, graddrop,
atp_star with qk_fix; gradients.py is their shared core; attribution.py runs any of them over a prompt
set), exact activation patching (patching.py), and the measurements behind the report's causes
(diagnostics.py)."""
