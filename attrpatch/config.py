"""The configuration stage: what a screen is asked to do, validated before anything runs; it comes before the
analysis, the outputs and both screens, which all read it."""

from .engine.metrics import check_metric
from .inputs.directions import check_direction


def check_metrics_and_direction(config, discrete: bool = False) -> None:
    """Validate a screen config's ``metric``, ``metrics`` and ``direction`` (denoise | noise | both), adding the
    primary metric to ``metrics`` when missing (node and edge screens alike). The primary metric ranks by
    attribution, so it needs a gradient; ``discrete``: ``metrics`` may hold discrete ones (read from the
    patched runs only)."""
    check_metric(config.metric, gradient=True)
    for m in config.metrics:
        check_metric(m, gradient=not discrete)
    if config.metric not in config.metrics:
        object.__setattr__(config, "metrics", (config.metric, *config.metrics))
    if config.direction != "both":
        check_direction(config.direction)
