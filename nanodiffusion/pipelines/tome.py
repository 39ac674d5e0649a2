"""Token merging (`tome`: the ratio, AUTOMATIC1111's "Token merging ratio" setting), the
approximate path of models/tome.py: at the UNet's finest attention level, self-attention runs
on the tokens left after merging `ratio` of them into their most similar neighbours. The
option's one rule is `check_tome`; an image made with it carries "Token merging ratio: r" in its
parameters, as A1111 writes it."""
from ..errors import InputError
from ..models.tome import TokenMerging

MAX_RATIO = 0.9  # A1111's slider's end; at most 3/4 of the tokens can merge (models/tome.py)


def check_tome(ratio):
    """None or 0: off (the exact path); a number in (0, MAX_RATIO]: the share of tokens merged
    away. Returns the ratio as a float, None when off."""
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or \
            not 0 <= ratio <= MAX_RATIO:
        raise InputError(f"tome must be a number in [0, {MAX_RATIO}] (the share of the "
                         f"tokens merged at the finest attention level; 0 or none: off), got "
                         f"{ratio!r}")
    return float(ratio) or None


def merging(ratio):
    """One sampling run's TokenMerging (its own generator: a seed makes the same image), or
    None when off."""
    ratio = check_tome(ratio)
    return None if ratio is None else TokenMerging(ratio)


def parameters(ratio):
    """The PNG parameters' field of an image made with token merging ({} when off)."""
    ratio = check_tome(ratio)
    return {"Token merging ratio": ratio} if ratio else {}
