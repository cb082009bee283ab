"""Stage 7, output: the files a run writes.

    files         atomic writes: JSON (NaN as null), CSV, bytes; safetensors with a canonical header (same bytes)
    provenance    the weights' hash, library versions, and the manifest that identifies a run
    checkpoint    progress saved step by step, for ``--resume``
    report        a node screen's report.json, results.csv, scores.safetensors, manifest.json
    report_md     report.md, rendered from the report dict alone: its order, clean-run check, cost, terms
    findings      report.md's per-site lines and tables, grouped rows, the one disagreement table
    markdown      numbers, names, intervals and tables every report.md shares
    edge_report   an edge screen's report.json, circuit.json, results.csv, edge_scores.safetensors, report.md
    features      a feature screen's features.json, features.csv and report.md's "Features" section
    corruptions   several corruptions compared: corruptions.json and corruptions.md
    mib           MIB's / EAP-IG's edge-score JSON (write, read) and report.md's MIB section
"""
