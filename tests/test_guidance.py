"""minisd.guidance: classifier-free guidance, rescale parity with diffusers."""

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from minisd.guidance import classifier_free_guidance, needs_unconditional_pass


def test_guidance_convention():
    uncond, text = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    assert torch.equal(classifier_free_guidance(uncond, text, 7.5), torch.full((1, 4, 2, 2), 7.5))
    assert torch.equal(classifier_free_guidance(uncond, text, 1.0), text)
    assert torch.equal(classifier_free_guidance(uncond, text, 0.0), uncond)
    assert needs_unconditional_pass(7.5) and needs_unconditional_pass(0.0)
    assert needs_unconditional_pass(0.5)
    assert not needs_unconditional_pass(1.0)                  # one U-Net call per step


def test_scale_one_and_zero_are_exact_on_any_input():
    g = torch.Generator().manual_seed(0)
    uncond, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(classifier_free_guidance(uncond, text, 1), text)
    assert torch.equal(classifier_free_guidance(uncond, text, 0), uncond)
    torch.testing.assert_close(classifier_free_guidance(uncond, text, 3.0),
                               3 * text - 2 * uncond)          # (1 + w)·ε_c − w·ε_u, w = 2


@pytest.mark.parametrize("rescale", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(rescale):
    g = torch.Generator().manual_seed(1)
    uncond, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ours = classifier_free_guidance(uncond, text, 7.5, guidance_rescale=rescale)
    guided = uncond + 7.5 * (text - uncond)
    ref = rescale_noise_cfg(guided, text, guidance_rescale=rescale) if rescale else guided
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_full_rescale_restores_the_conditional_std():
    g = torch.Generator().manual_seed(2)
    uncond, text = torch.randn(2, 4, 8, 8, generator=g), 3 * torch.randn(2, 4, 8, 8, generator=g)
    out = classifier_free_guidance(uncond, text, 7.5, guidance_rescale=1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), text.std(dim=(1, 2, 3)))


def test_bad_input():
    with pytest.raises(ValueError, match=r"same shape, got \(1, 4, 2, 2\) and \(2, 4, 2, 2\)"):
        classifier_free_guidance(torch.zeros(1, 4, 2, 2), torch.zeros(2, 4, 2, 2), 7.5)
    with pytest.raises(ValueError, match=r"guidance_rescale must lie in \[0, 1\], got 1.5"):
        classifier_free_guidance(torch.zeros(1, 4), torch.zeros(1, 4), 7.5, guidance_rescale=1.5)
