"""The one home of the direction convention (docs/methods.md#directions).

    direction   source    receiver   question                      effect
    denoise     clean     corrupt    is the component sufficient?  m(corrupt, c := clean) - m(corrupt)
    noise       corrupt   clean      is the component necessary?   m(clean, c := corrupt) - m(clean)

Effects and scores keep the sign of the metric change in the receiving run. A noising effect is negative
when the component matters, so the share of the clean-corrupt gap a component *removes* when noised is
``-effect`` (normalised): ``restored_share`` below turns both directions into "how much of the gap this
component carries", positive when it helps the clean behaviour.
"""

from typing import Literal

DIRECTIONS = ("denoise", "noise")
Direction = Literal["denoise", "noise"]
RUNS = {"denoise": ("clean", "corrupt"), "noise": ("corrupt", "clean")}  # direction -> (source, receiver)
QUESTION = {"denoise": "denoising (clean -> corrupt: is it sufficient?)",
            "noise": "noising (corrupt -> clean: is it necessary?)"}
GERUND = {"denoise": "denoising", "noise": "noising"}
SIGN = {"denoise": 1, "noise": -1}  # restored share = SIGN * normalised effect


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"Unknown direction {direction!r}; known: {', '.join(DIRECTIONS)} "
                         "(denoise: clean -> corrupt, noise: corrupt -> clean).")


def source_and_receiver(direction: str) -> tuple[str, str]:
    """("clean", "corrupt") for denoise, ("corrupt", "clean") for noise."""
    check_direction(direction)
    return RUNS[direction]


def clean_and_corrupt(direction: str, source, receiver) -> tuple:
    """Sort the (source, receiver) values of one direction back into (clean, corrupt)."""
    return (source, receiver) if source_and_receiver(direction)[0] == "clean" else (receiver, source)


def restored_share(direction: str, normalised_effect: float) -> float:
    """The share of the clean-corrupt gap a component carries: what denoising restores, or what noising
    removes (the negated noising effect)."""
    return SIGN[direction] * normalised_effect
