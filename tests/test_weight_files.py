"""Damaged or mislabelled weight files give an error that names the file and says it is
damaged or in another format; the file is never modified. The variants are those that broke
other loaders (Comfy-Org/ComfyUI #15602 and PR #15687): library errors are recognised by
their exception types (safetensors 0.6 reworded its messages), and a pickle is told apart
from a safetensors file by its first bytes."""

import hashlib
import json
import os
import struct

import pytest
import torch
from conftest import tiny_pipeline
from safetensors.torch import load_file

from minisd import checkpoints
from minisd.state_dict import file_format, read_state_dict
from minisd.vae import AutoencoderKL

DAMAGED = "damaged|another format"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_header(data: bytes, change) -> bytes:
    """The safetensors file `data` with its JSON header edited by `change` (padded with
    spaces to a multiple of 8 bytes, as the format's writers do)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real safetensors file (a tiny VAE's weights) and the same weights pickled."""
    folder = tmp_path_factory.mktemp("weights")
    vae = tiny_pipeline().vae
    vae.save_pretrained(folder / "vae")
    safetensors_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(vae.state_dict(), folder / "weights.ckpt")
    return {"safetensors": safetensors_file.read_bytes(),
            "ckpt": (folder / "weights.ckpt").read_bytes(), "folder": folder / "vae"}


def vae_folder(files, tmp_path):
    """A vae/ folder with the config and no weights yet."""
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_bytes((files["folder"] / "config.json").read_bytes())
    return folder


def variants(files) -> dict:
    st, ckpt = files["safetensors"], files["ckpt"]
    return {
        "header length 2**40.safetensors": struct.pack("<Q", 2 ** 40) + st[8:],
        "cut in half.safetensors": st[:len(st) // 2],
        "1000 bytes more.safetensors": st + bytes(1000),
        "random.safetensors": os.urandom(4096),
        "random.ckpt": os.urandom(4096),
        "empty.safetensors": b"",
        "empty.ckpt": b"",
        "pickle renamed.safetensors": ckpt,
        "safetensors renamed.ckpt": st,
        "cut at 100 kB.ckpt": ckpt[:100_000],
        "shape off its offsets.safetensors": with_header(
            st, lambda h: h["encoder.conv_in.weight"].update(shape=[8, 3, 3, 4])),
    }


def test_every_damaged_or_mislabelled_file_names_itself_and_stays_unchanged(files, tmp_path):
    assert len(files["ckpt"]) > 100_000            # so that the cut one is really cut
    for name, data in variants(files).items():
        path = tmp_path / name
        path.write_bytes(data)
        before = sha256(path)
        with pytest.raises(ValueError, match=DAMAGED) as error:
            read_state_dict(path)
        assert str(path) in str(error.value), name
        assert sha256(path) == before, name


def test_the_first_bytes_tell_a_pickle_from_a_safetensors_file(files, tmp_path):
    for name, data, kind in (("a.safetensors", files["safetensors"], "safetensors"),
                             ("a.ckpt", files["ckpt"], "pickle"),
                             ("empty.bin", b"", "empty"), ("text.ckpt", b"not a checkpoint",
                                                           "unknown")):
        (tmp_path / name).write_bytes(data)
        assert file_format(tmp_path / name) == kind
    # a header of 384 bytes: the length's first byte is 0x80, a pickle's first byte too
    padded = with_header(files["safetensors"], lambda h: h.update(__metadata__={"pad": ""}))
    n = struct.unpack("<Q", padded[:8])[0]
    padded = with_header(files["safetensors"], lambda h: h.update(
        __metadata__={"pad": " " * (-(n - 128) % 256)}))
    assert padded[0] == 0x80
    (tmp_path / "c.safetensors").write_bytes(padded)
    assert file_format(tmp_path / "c.safetensors") == "safetensors"
    assert read_state_dict(tmp_path / "c.safetensors").keys() == load_file(
        files["folder"] / "diffusion_pytorch_model.safetensors").keys()
    (tmp_path / "b.safetensors").write_bytes(files["ckpt"])
    with pytest.raises(ValueError, match="in another format: a PyTorch pickle named "
                                         r"\.safetensors.*rename it to \.ckpt"):
        read_state_dict(tmp_path / "b.safetensors")
    (tmp_path / "b.ckpt").write_bytes(files["safetensors"])
    with pytest.raises(ValueError, match=r"in another format: a safetensors file named \.ckpt"
                                         r".*rename it to \.safetensors"):
        read_state_dict(tmp_path / "b.ckpt")


def test_a_flattened_shape_is_a_shape_mismatch_naming_the_key(files, tmp_path):
    """Same byte size, another shape: safetensors reads it; the strict loader names it."""
    weights = vae_folder(files, tmp_path) / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(with_header(files["safetensors"],
                                    lambda h: h["encoder.conv_in.weight"].update(shape=[216])))
    assert load_file(weights)["encoder.conv_in.weight"].shape == (216,)
    before = sha256(weights)
    with pytest.raises(ValueError, match=rf"(?s){weights} does not match the AutoencoderKL.*"
                                         r"1 shape mismatches: encoder\.conv_in\.weight \(216,\) "
                                         r"\(model: \(8, 3, 3, 3\)\)"):
        AutoencoderKL.from_pretrained(weights.parent)
    assert sha256(weights) == before


def test_every_loader_reads_weights_through_the_same_checks(files, tmp_path):
    weights = vae_folder(files, tmp_path) / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(files["ckpt"])
    with pytest.raises(ValueError, match=rf"{weights} is in another format"):
        AutoencoderKL.from_pretrained(weights.parent)
    single = tmp_path / "model.safetensors"
    single.write_bytes(files["safetensors"][:1000])
    with pytest.raises(ValueError, match=rf"{single} is not a readable safetensors file: "
                                         "damaged"):
        checkpoints.load_single_file(single)
