"""CLIPModel: the symmetric InfoNCE loss against a hand computation, similarities, the image
tower's shapes, saving and loading (text tower readable by transformers), bad input."""

import math

import pytest
import torch
import transformers
from conftest import tiny_batch, tiny_config

from minisd.clip_contrastive import (
    CLIPConfig,
    CLIPImageConfig,
    CLIPImageEncoder,
    CLIPModel,
    clip_loss,
)


def test_clip_loss_equals_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])   # rows: captions, columns: pictures
    # captions → pictures: both rows −log σ(2) = log(1 + e^−2);
    # pictures → captions: column 0 log(1 + e^−1), column 1 log(1 + e^−3)
    by_hand = (math.log1p(math.exp(-2)) + (math.log1p(math.exp(-1))
                                           + math.log1p(math.exp(-3))) / 2) / 2
    assert by_hand == pytest.approx(0.1539262653)
    assert clip_loss(logits).item() == pytest.approx(by_hand, abs=1e-7)
    # perfectly separated pairs cost nothing; all-equal logits cost log N
    assert clip_loss(torch.eye(3) * 100).item() == pytest.approx(0.0, abs=1e-6)
    assert clip_loss(torch.zeros(4, 4)).item() == pytest.approx(math.log(4), abs=1e-6)


def test_forward_is_scaled_cosine_similarity():
    torch.manual_seed(0)
    model = CLIPModel(tiny_config()).eval()
    ids, pictures = tiny_batch()
    out = model(ids, pictures[:2])
    text = model.text_projection(model.text_model(ids).pooler_output)
    image = model.visual_projection(model.vision_model(pictures[:2]))
    cosine = torch.tensor([[torch.cosine_similarity(t, i, dim=0).item() for i in image]
                           for t in text])
    assert out.logits_per_text.shape == (3, 2)
    torch.testing.assert_close(out.logits_per_text, cosine / 0.07, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits_per_image, out.logits_per_text.T)
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    with torch.no_grad():           # the temperature is capped at 1/100 (Radford et al. §2.5)
        model.logit_scale.fill_(math.log(1000))
    torch.testing.assert_close(model(ids, pictures[:2]).logits_per_text, cosine * 100,
                               rtol=1e-5, atol=1e-4)


def test_image_tower_shapes_and_position_sensitivity():
    encoder = CLIPImageEncoder(CLIPImageConfig())
    x, stages = torch.zeros(2, 3, 64, 64), []
    for block in encoder.blocks:
        x = block(x)
        stages.append(tuple(x.shape))
    assert stages == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
    assert encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 128)
    # the grid is flattened, not averaged: a blob moved to another corner changes the vector
    left, right = -torch.ones(1, 3, 64, 64), -torch.ones(1, 3, 64, 64)
    left[..., 4:14, 4:14], right[..., 4:14, 50:60] = 1, 1
    assert not torch.allclose(encoder(left), encoder(right), atol=1e-3)


def test_save_and_load_round_trip_and_transformers_reads_the_text_tower(tmp_path):
    torch.manual_seed(0)
    model = CLIPModel(tiny_config()).eval()
    model.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = CLIPModel.from_pretrained(tmp_path)
    ids, pictures = tiny_batch()
    torch.testing.assert_close(loaded(ids, pictures).logits_per_text,
                               model(ids, pictures).logits_per_text, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_image", "text_encoder"]

    reference = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    with torch.no_grad():
        expected = reference(ids)
    out = model.text_model(ids)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path / "half")            # float16 storage, float32 in memory
    half = CLIPModel.from_pretrained(tmp_path / "half")
    assert half.logit_scale.dtype == torch.float32
    torch.testing.assert_close(half(ids, pictures).logits_per_text,
                               model(ids, pictures).logits_per_text, rtol=0, atol=0.05)


def test_bad_input_and_files(tmp_path):
    with pytest.raises(ValueError, match="norm_num_groups 5 does not divide"):
        CLIPImageConfig(norm_num_groups=5)
    with pytest.raises(ValueError, match="image_size 60 does not halve 4 times"):
        CLIPImageConfig(image_size=60)
    model = CLIPModel(tiny_config())
    with pytest.raises(ValueError, match=r"shape \(B, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        model.get_image_features(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"square \(N, N\) matrix of pairs, got \(2, 3\)"):
        clip_loss(torch.zeros(2, 3))
    with pytest.raises(FileNotFoundError, match="clip_image has no config.json"):
        CLIPModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    wider = CLIPConfig(tiny_config().text_config,
                       CLIPImageConfig(image_size=16, block_out_channels=(8, 16),
                                       hidden_size=12, norm_num_groups=4), projection_dim=16)
    CLIPModel(wider).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "clip_image" / "model.safetensors").write_bytes(
        (tmp_path / "clip_image" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"(?s)model.safetensors does not match the CLIPModel.*"
                                         r"text_projection\.weight \(8, 16\) \(model: \(16, 16\)\)"):
        CLIPModel.from_pretrained(tmp_path / "other")


def test_pictures_must_be_float_in_minus_one_to_one():
    torch.manual_seed(0)
    model = CLIPModel(tiny_config()).eval()
    ids, pictures = tiny_batch()
    pixels = ((pictures + 1) * 127.5).round()                  # the same pictures in 0–255
    pixels[0, 0, 0, :2] = torch.tensor([0.0, 255.0])
    with pytest.raises(TypeError, match=r"float tensor in \[-1, 1\], got torch.uint8; "
                                        r"convert 0–255 pixels with pixels.float\(\) / 127.5 - 1"):
        model(ids, pixels.to(torch.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\], got values 0…255; "
                                         r"map 0–255 pixels with x / 127.5 - 1"):
        model(ids, pixels)
    with pytest.raises(ValueError, match=r"got values -2…2"):
        model.get_image_features(torch.linspace(-2, 2, 16).expand(1, 3, 16, 16))
    with pytest.raises(TypeError, match="must be a torch.Tensor .* got ndarray"):
        model.get_image_features(pictures.numpy())
    with pytest.raises(ValueError, match=r"no pictures: the batch is empty, shape \(0, 3, 16, 16\)"):
        model.get_image_features(pictures[:0])
    # a small overshoot, as resampling makes, is accepted
    assert model.get_image_features(pictures * 1.2).shape == (3, 8)


def test_forward_reads_no_values_from_the_device():
    """No device sync per training batch: CLIP runs on the `meta` device, where reading a
    tensor's value raises (the range of the pictures is checked on CPU tensors only)."""
    with torch.device("meta"):
        model = CLIPModel(tiny_config())
        ids, pictures = torch.zeros(3, 12, dtype=torch.long), torch.zeros(3, 3, 16, 16)
    assert model(ids, pictures).logits_per_text.shape == (3, 3)
