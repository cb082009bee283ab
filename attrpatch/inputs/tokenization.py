"""Encoding prompts the way the model was trained on them (docs/methods.md#prompts).

    bos_id(tokenizer, mode)     the token to put first in every prompt, or None
        auto  what ``tokenizer(text)`` itself adds in front (Llama 3, Gemma: a BOS; GPT-2, SmolLM2: none)
        yes   the tokenizer's ``bos_token_id`` (an error if it has none)
        no    nothing
        TOKEN any other value names the token itself, e.g. '<|endoftext|>' (SmolLM2 adds no BOS and names
              the chat token <|im_start|> as its BOS; its document separator <|endoftext|> is what helps)
    Answers are always encoded without special tokens. Every position index counts the BOS position.

    role_positions(text, tokenizer, spans)   named roles (IOI's S1, IO, S2; a fact's subject) -> token position,
        read off the tokenizer's character offsets: a role is the last token overlapping its span.

    first_difference(answer_ids, wrong_ids)  the rule for answers of several tokens: the tokens both
        share are appended to the prompt, and the metric compares the first tokens where they differ.
"""

BOS_MODES = ("auto", "yes", "no")


def check_bos_mode(mode: str) -> None:
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"prepend-bos takes {', '.join(BOS_MODES)} or a token, got {mode!r}")


def encode(text: str, tokenizer) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def added_bos(tokenizer) -> int | None:
    """The token ``tokenizer(text)`` puts in front of a text by itself, or None."""
    plain, special = encode("Hello world", tokenizer), list(tokenizer("Hello world")["input_ids"])
    if len(special) > len(plain) and special[1:len(plain) + 1] == plain:
        return special[0]
    return None


def bos_id(tokenizer, mode: str = "auto") -> int | None:
    """The token to prepend to every prompt under ``mode`` (see the module docstring), or None."""
    check_bos_mode(mode)
    if mode == "no" or tokenizer is None:
        return None
    if mode == "auto":
        return added_bos(tokenizer)
    if mode not in BOS_MODES:
        ids = encode(mode, tokenizer) if mode not in tokenizer.get_vocab() else [tokenizer.convert_tokens_to_ids(mode)]
        if len(ids) != 1:
            raise ValueError(f"--prepend-bos {mode!r}: not one token of this tokenizer (it encodes to {len(ids)}); "
                             f"give auto, yes, no, or a token such as {tokenizer.bos_token!r}")
        return int(ids[0])
    if tokenizer.bos_token_id is None:
        raise ValueError(f"--prepend-bos yes: the tokenizer {type(tokenizer).__name__} has no BOS token; "
                         "use --prepend-bos auto or no")
    return int(tokenizer.bos_token_id)


def role_positions(text: str, tokenizer, spans: dict[str, tuple[int, int]]) -> dict[str, int] | None:
    """{role: token position} for character ``spans`` {role: (start, end)} of ``text`` (no special
    tokens counted; add 1 for a BOS). A role's position is the last token that overlaps its span. None
    when the tokenizer gives no character offsets (slow tokenizers)."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return None
    out = {}
    for role, (start, end) in spans.items():
        hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        if not hits:
            return None
        out[role] = hits[-1]
    return out


def first_difference(answer_ids: list[int], wrong_ids: list[int]) -> tuple[list[int], int, int]:
    """(shared prefix, answer token, wrong token) for answers of one or more tokens: the metric compares
    the first tokens where answer and wrong differ, after the prompt is extended by what they share.
    ' New York' vs ' New Delhi' -> ([' New'], ' York', ' Delhi')."""
    n = 0
    while n < min(len(answer_ids), len(wrong_ids)) and answer_ids[n] == wrong_ids[n]:
        n += 1
    if n == len(answer_ids) or n == len(wrong_ids):
        raise ValueError(f"answer tokens {answer_ids} and wrong tokens {wrong_ids}: one is a prefix of the "
                         "other, so no next token tells them apart; choose answers that differ")
    return list(answer_ids[:n]), answer_ids[n], wrong_ids[n]
