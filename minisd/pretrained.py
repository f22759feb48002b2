"""The loader contract that every model, the tokenizer and the schedulers share.

    Model.from_pretrained(path, subfolder=None, torch_dtype=None)   a folder → a model, eval mode
    Model.from_config(config)                        a config (dict or dataclass) → a new model
    model.save_pretrained(folder)                    the folder that from_pretrained reads
    CLIPTokenizer.from_pretrained(path, subfolder=None)
    checkpoints.scheduler_from_pretrained(path, subfolder=None)   the class its config names

for AutoencoderKL, UNet2DConditionModel, CLIPTextModel and CLIPModel.

`path` is the part's own folder (`vae/`) or a model folder: with `subfolder` the part is read
from `path/subfolder`; a model folder given alone is searched for the part's usual subfolder
(`vae/` for the VAE), so `AutoencoderKL.from_pretrained("model")` and
`AutoencoderKL.from_pretrained("model", subfolder="vae")` are the same. `torch_dtype` None
means float32, whatever the file stores (as in diffusers). Models come back in eval mode;
move them with `.to(device)`.

The same mistake gives the same error everywhere, naming the file and, for a config, the key:

- FileNotFoundError: the folder or a file in it is missing;
- ValueError: a file's content is wrong: not JSON, a key of the wrong type (a string for
  `scaling_factor`) or with an impossible value (0 for `scaling_factor`, negative channels),
  a config of another class, weights that are damaged or do not fit the config.

Config dataclasses (`ModelConfig`) check the types of their fields from the annotations and
their values in `check`, so the public constructors refuse the same inputs as the files.
"""

import difflib
import json
import math
import types
import typing
import warnings
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from minisd.state_dict import load_strict, read_state_dict


class SkipInitialisation(TorchFunctionMode):
    """Inside it, `torch.nn.init`'s functions and the in-place random fills return their
    tensor untouched. A model built on the `meta` device only to adopt loaded weights needs no
    initial values, and on `meta` some initialisers run Python kernels whose first call
    imports `torch._dynamo` (seconds on a 2-core machine, more than the rest of a load)."""

    FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_,
                       torch.Tensor.fill_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))

CONFIG_NAME = "config.json"


# ---------------------------------------------------------------- folders and files

def find_folder(path: str | Path, subfolder: str | None, part: str | None,
                markers: tuple[str, ...]) -> Path:
    """The folder that holds a part: `path/subfolder` when `subfolder` is given, else `path`,
    or `path/part` when `path` is a model folder (no marker file itself, the part's inside).

    `markers`: the files that identify the part's folder (any one of them).
    Raises FileNotFoundError when the folder does not exist or is a file.
    """
    path = Path(path)
    folder = path / subfolder if subfolder else path
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "does not exist"
        raise FileNotFoundError(f"{folder} {what}; expected a folder with {' or '.join(markers)}")
    def holds_part(f: Path) -> bool:
        return any((f / marker).is_file() for marker in markers)

    if not subfolder and part and not holds_part(folder) and holds_part(folder / part):
        return folder / part
    return folder


def require_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of `names` that exists in `folder`. Raises FileNotFoundError naming the
    folder and the files expected there (`what` says what such a folder is)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no {' or '.join(names)}; {what}")


def read_json(path: Path, what: str = "") -> dict:
    """A JSON file holding one object (a config) as a dict.

    Raises FileNotFoundError naming the missing file (`what` adds what its folder should
    hold); ValueError naming the file, with line and column, when it is not valid UTF-8
    JSON, or when it holds something other than an object.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name}" + (f"; {what}" if what else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a JSON text file: byte {error.start} is not UTF-8 "
                         "(a binary file, or a damaged one?)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, "
                         f"column {error.colno}") from None
    if not isinstance(data, dict):   # the file's content is wrong: a ValueError, as above
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of "  # noqa: TRY004
                         "config keys")
    return data


@contextmanager
def naming(source: str | Path | None):
    """Re-raise a TypeError or ValueError raised while reading a config from the file
    `source` as a ValueError that starts with the file's name (unchanged without `source`)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        if source is None:
            raise
        raise ValueError(f"{source}: {error}") from None


def check_dtype(torch_dtype) -> torch.dtype:
    """`torch_dtype` as given (None → float32). Raises TypeError for anything but a floating
    torch.dtype (a string such as "float16" included)."""
    if torch_dtype is None:
        return torch.float32
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise TypeError(f"torch_dtype must be a floating torch.dtype such as torch.float16, "
                        f"got {torch_dtype!r}")
    return torch_dtype


# ---------------------------------------------------------------- configs

def _fits(value, hint) -> bool:
    """Whether `value` has the annotated type: bool, int (not bool), float (an int is a
    float, as JSON writes 1 for 1.0), str, None, tuple[X, ...], unions of these, classes."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_fits(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint)


def check_positive(config, *names: str) -> None:
    """Raise ValueError naming the first field among `names` (or an entry of a tuple field)
    that is not a finite number > 0."""
    for name in names:
        value = getattr(config, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0 (and finite), got {value!r}")


class ModelConfig:
    """Base of the config dataclasses: the fields are the keys of the config files.

    Construction converts lists to tuples, checks every field against its annotation
    (TypeError naming the key) and calls `check` for impossible values (ValueError naming
    the key). `from_config` reads a config dict as a file holds it; `to_config` writes one.
    """

    class_name: ClassVar[str] = ""   # the model class this config builds, as files name it

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in fields(self):
            given = getattr(self, field.name)
            value = tuple(given) if isinstance(given, list) else given
            if not _fits(value, hints[field.name]):
                raise TypeError(f"{field.name} must be {_type_name(hints[field.name])}, got "
                                f"{given!r} ({type(given).__name__})")
            setattr(self, field.name, value)
        self.check()

    def check(self) -> None:
        """Refuse impossible values (ValueError naming the key); subclasses add theirs."""

    @classmethod
    def from_config(cls, config: dict, source: str | Path | None = None):
        """From a config dict (a `config.json` as read). Keys that are not fields are ignored,
        as diffusers does (with a warning when one looks like a misspelt field).

        Args:
            config: the dict; `source`: the file it came from, named in errors and warnings.
        Raises:
            ValueError (naming `source` and the key) when the config describes another class
            (`_class_name` or `architectures`), or a key has the wrong type or an impossible
            value; without a `source`, the constructor's TypeError or ValueError.
        """
        names = {f.name for f in fields(cls)}
        for key in config.keys() - names:
            close = difflib.get_close_matches(key, names - config.keys(), n=1, cutoff=0.85)
            if close:
                warnings.warn(f"{source or 'config'}: unknown key {key!r} is ignored; did you "
                              f"mean {close[0]!r}?", stacklevel=3)
        with naming(source):
            for key in ("_class_name", "architectures"):
                declared = config.get(key)
                declared = declared[0] if isinstance(declared, list) and declared else declared
                if cls.class_name and isinstance(declared, str) and declared != cls.class_name:
                    raise ValueError(f"{key} says this config describes a {declared}; it is "
                                     f"not a config of {cls.class_name}")
            return cls(**{k: v for k, v in config.items() if k in names})

    def to_config(self) -> dict:
        """The fields as a JSON-serialisable dict (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


# ---------------------------------------------------------------- models

class PretrainedModel:
    """The loader contract of the module docstring, for an `nn.Module` built from one config.

    A subclass sets `config_class`, `part` (its usual subfolder in a model folder) and
    `weights_names` (its weight files, preferred first); `weights_prefix` is put before
    every key when saving (transformers' `text_model.`), `file_config` holds the keys a saved
    config.json has besides the fields, and `ldm_prefixes` are key prefixes of the original
    single-file layout, which get a hint towards `from_single_file`.
    """

    config_class: ClassVar[type]
    part: ClassVar[str | None] = None
    weights_names: ClassVar[tuple[str, ...]] = ("diffusion_pytorch_model.safetensors",
                                                "diffusion_pytorch_model.bin")
    weights_prefix: ClassVar[str] = ""
    file_config: ClassVar[dict] = {}
    ldm_prefixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, config):
        """A new model (random weights, train mode) from a config dict or dataclass."""
        if not isinstance(config, cls.config_class):
            config = cls.config_class.from_config(config)
        return cls(config)

    @classmethod
    def load_config(cls, path: str | Path, subfolder: str | None = None):
        """The config of a pretrained folder (`config.json`), read and checked, without the
        weights. Errors as in `from_pretrained`."""
        folder = find_folder(path, subfolder, cls.part, (CONFIG_NAME,))
        config_path = folder / CONFIG_NAME
        return cls.config_class.from_config(read_json(config_path, cls._folder_description()),
                                            config_path)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, *, trust_pickle: bool = False):
        """Load a diffusers/transformers folder: `config.json` and the weights (safetensors,
        or a `.bin` pickle read with `weights_only=True`), strictly: every key present, none
        extra, shapes equal.

        Args:
            path: the part's folder, or a model folder (see the module docstring).
            subfolder: the part's folder inside `path` (e.g. "vae").
            torch_dtype: the model's dtype; None for float32, whatever the file stores.
            trust_pickle: allow `.bin` files holding Python objects (runs their code).
        Returns:
            the model, in eval mode, on the CPU.
        Raises:
            FileNotFoundError naming a missing folder or file; ValueError naming the file for
            a config that is not JSON, of another class, or with a key of the wrong type or an
            impossible value (naming the key), for damaged weights, and for weights that do
            not fit the config (listing the keys); TypeError for a bad `torch_dtype`.
        """
        torch_dtype = check_dtype(torch_dtype)
        config = cls.load_config(path, subfolder)
        folder = find_folder(path, subfolder, cls.part, (CONFIG_NAME,))
        weights = require_file(folder, cls.weights_names, cls._folder_description())
        return cls.from_state_dict(config, read_state_dict(weights, trust_pickle), str(weights),
                                   torch_dtype=torch_dtype)

    @classmethod
    def from_state_dict(cls, config, state_dict: dict[str, torch.Tensor],
                        source: str = "a state dict", file_name=None,
                        torch_dtype: torch.dtype | None = None):
        """A model built on the `meta` device (no memory, no init) that adopts `state_dict`
        (`load_weights`), in `torch_dtype` (None: float32) and eval mode."""
        with torch.device("meta"), SkipInitialisation():
            model = cls(config)
        model.load_weights(state_dict, source, file_name, assign=True)
        return model.to(check_dtype(torch_dtype)).eval()

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "a state dict",
                     file_name=None, assign: bool = False):
        """Load a state dict with this class's key names strictly; returns self.

        `file_name` maps a model key to its name in the file, for errors. `assign=True` adopts
        the tensors (for models built on `meta`). Raises ValueError listing the missing and
        unexpected keys and the shape mismatches (`minisd.state_dict.load_strict`), with a
        hint when the keys are in the original single-file layout.
        """
        hint = ""
        if any(k.startswith(self.ldm_prefixes) for k in state_dict):
            hint = ("These keys are in the original CompVis (ldm) single-file layout; load such "
                    "a file with StableDiffusionPipeline.from_single_file "
                    "(minisd.checkpoints.load_single_file), which maps them to diffusers names.")
        load_strict(self, state_dict, source, file_name, hint=hint, assign=assign)
        return self

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` and the weights (safetensors, the model's dtype), the layout
        that `from_pretrained` and diffusers/transformers read. Returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {**self.file_config, **self.config.to_config()}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {self.weights_prefix + k: v.detach().contiguous().cpu()
                   for k, v in self.state_dict().items()}
        save_file(tensors, folder / self.weights_names[0], metadata={"format": "pt"})
        return folder

    @classmethod
    def _folder_description(cls) -> str:
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        return (f"{article} {cls.__name__} folder holds {CONFIG_NAME} and "
                f"{' or '.join(cls.weights_names)}")
