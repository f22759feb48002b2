"""Strict state-dict loading with one clear error format, shared by every model.

PyTorch's own `load_state_dict(strict=True)` error lists keys but not what to do, and
stops at the first shape mismatch. Here every problem is listed at once, by the names the
file uses, with a hint: a truncated file shows missing keys, a checkpoint of another model
unexpected keys, a config that does not fit the weights shape mismatches.
"""

from collections.abc import Callable

import torch
from torch import nn


def listed(what: str, keys: list[str], limit: int = 10) -> str:
    """A new line "  N what: k1, k2, … (M more)" for an error message; "" for no keys."""
    if not keys:
        return ""
    more = f", … ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"\n  {len(keys)} {what}: {', '.join(keys[:limit])}{more}"


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                file_name: Callable[[str], str] | None = None, hint: str = "",
                assign: bool = True):
    """Load `state` into `model` strictly. With `assign=True` (the default) the model adopts
    the tensors, so a model built on the `meta` device gets real weights without a copy;
    `assign=False` copies them into the existing parameters. Returns what
    `nn.Module.load_state_dict` returns (no missing, no unexpected keys).

    Args:
        model: any minisd model; state: its state dict, keys in the model's (diffusers /
            transformers) names.
        source: what the weights are, for the error message (usually a path).
        file_name: model key → the key's name in the file, so errors name keys as the file
            does (identity by default).
        hint: an extra sentence for the error, e.g. how to convert another layout.
    Raises:
        ValueError listing the missing keys, the unexpected keys and the shape mismatches
        (file shape vs model shape), ending with `hint` or a default question.
    """
    own = model.state_dict()
    named = file_name or str
    missing = sorted(named(k) for k in own.keys() - state.keys())
    unexpected = sorted(named(k) for k in state.keys() - own.keys())
    shapes = sorted(f"{named(k)} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
                    for k in own.keys() & state.keys() if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match the {type(model).__name__}:"
                         + listed("missing keys", missing)
                         + listed("unexpected keys", unexpected)
                         + listed("shape mismatches", shapes)
                         + "\n" + (hint or "Are the weights and the config of the same model?"))
    return nn.Module.load_state_dict(model, state, strict=True, assign=assign)  # no override
