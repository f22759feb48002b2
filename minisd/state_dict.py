"""Weights files in, state dicts into models: one reader and one strict loader for every model.

`read_state_dict` reads a `.safetensors` file or a pickled PyTorch file (`.ckpt`, `.bin`,
`.pt`, `.pth`) without running code from it and without modifying it. It tells the formats
apart by their first bytes, not by the name alone: a safetensors file starts with the
8-byte little-endian length of its JSON header, then `{`; a PyTorch file is a zip archive
(`PK\x03\x04`, torch.save since PyTorch 1.6) or a bare pickle (`\x80`, protocol ≥ 2). So a
renamed file is named as what it is, and a damaged one as damaged; the libraries' errors
are recognised by their exception types, whose messages change between versions.

PyTorch's own `load_state_dict(strict=True)` error lists keys but not what to do, and
stops at the first shape mismatch. `load_strict` lists every problem at once, by the names
the file uses, with a hint: a truncated file shows missing keys, a checkpoint of another
model unexpected keys, a config that does not fit the weights shape mismatches.
"""

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
ZIP_MAGIC = b"PK\x03\x04"                                   # torch.save since PyTorch 1.6
PICKLE_PROTOCOLS = tuple(bytes([0x80, n]) for n in (2, 3, 4, 5))   # a bare pickle


def file_format(path: Path) -> str:
    """"safetensors", "pickle", "empty" or "unknown", from the file's first bytes: a zip
    archive or a pickle's protocol mark is a pickle; `{` after the 8-byte header length is
    safetensors (checked before the pickle mark, which a header length can begin with)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "pickle"
    if head[8:] == b"{":
        return "safetensors"
    return "pickle" if head.startswith(PICKLE_PROTOCOLS) else "unknown"


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a weights file into a dict of tensors, on the CPU, without modifying the file.

    Args:
        path: a `.safetensors` file (never unpickled), or a pickled PyTorch file (`.ckpt`,
            `.bin`, `.pt`, `.pth`), read with `torch.load(weights_only=True)`: tensors,
            numbers, strings and containers only, no code runs.
        trust_pickle: the explicit opt-in to unpickle arbitrary Python objects
            (`weights_only=False`). Only for files from a source you trust: unpickling can
            run any code the file's author wrote.
    Returns:
        the file's top-level dict (a `state_dict` wrapper is kept).
    Raises:
        FileNotFoundError if the file is missing. ValueError naming the file for an unknown
        extension; an empty file; a file whose first bytes are of the other format than its
        name says (a pickle named `.safetensors`, a safetensors file named `.ckpt`); a
        damaged (truncated, overwritten) file; a pickle holding objects other than tensors and
        numbers (naming them and the `trust_pickle=True` opt-in), or one holding something
        other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; minisd reads "
                         ".safetensors, and .ckpt/.bin/.pt/.pth PyTorch files")
    kind = file_format(path)
    if kind == "empty":
        raise ValueError(f"{path} is empty (0 bytes): damaged, or a download or copy that did "
                         "not finish")
    what = "safetensors file" if path.suffix == ".safetensors" else "PyTorch checkpoint"
    if kind == "unknown":
        start = ("a safetensors header" if path.suffix == ".safetensors"
                 else "a zip archive or a pickle")
        raise ValueError(f"{path} is not a readable {what}: damaged or in another format (its "
                         f"first bytes are not {start})")
    if path.suffix == ".safetensors":
        if kind == "pickle":
            raise ValueError(f"{path} is in another format: a PyTorch pickle named "
                             ".safetensors (its first bytes are a zip archive or a pickle). "
                             "minisd never unpickles a .safetensors file; if you trust its "
                             "source, rename it to .ckpt")
        try:
            return load_file(path)
        except safetensors.SafetensorError as error:
            raise ValueError(f"{path} is not a readable {what}: damaged (truncated?) or in "
                             f"another format ({error})") from None
    if kind == "safetensors":
        raise ValueError(f"{path} is in another format: a safetensors file named "
                         f"{path.suffix} (it starts with a safetensors header); rename it to "
                         ".safetensors")
    return _read_pickle(path, trust_pickle, what)


def _read_pickle(path: Path, trust_pickle: bool, what: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        objects = _unsafe_globals(path)
        if not objects:
            raise ValueError(f"{path} is not a readable {what}: damaged (truncated?) or in "
                             f"another format ({str(error).splitlines()[0]})") from None
        raise ValueError(f"{path} holds Python objects besides tensors and numbers: "
                         f"{', '.join(objects)}. minisd does not unpickle them "
                         "because that runs code from the file. If you trust its source, "
                         "pass trust_pickle=True (command line: --trust-pickle); better, "
                         "convert it to .safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable {what}: damaged (truncated?) or in "
                         f"another format ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict):   # the file's content is wrong: a ValueError, as above
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors")  # noqa: TRY004
    return state


def _unsafe_globals(path: Path) -> list[str]:
    """The names of the Python objects a pickle would build, read without running it;
    empty when the file cannot be scanned (not a zip-format PyTorch file)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, pickle.UnpicklingError):
        return []


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
