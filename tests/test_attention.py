"""minisd.attention: parity with diffusers' Attention, half-precision overflow of the logits, the
attention recorder, masks."""

import pytest
import torch
from diffusers.models.attention_processor import Attention as DiffusersAttention
from torch import nn

from minisd.attention import (
    Attention,
    _split_heads,
    attention_probs,
    multi_head_attention,
    record_attention,
)


def _pair(cross_attention_dim):
    torch.manual_seed(0)
    ref = DiffusersAttention(32, cross_attention_dim=cross_attention_dim, heads=4, dim_head=8)
    ours = Attention(32, cross_attention_dim=cross_attention_dim, heads=4, dim_head=8)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("cross_attention_dim", [None, 24], ids=["self", "cross"])
def test_attention_matches_diffusers(cross_attention_dim):
    ours, ref = _pair(cross_attention_dim)
    x = torch.randn(2, 10, 32)
    context = None if cross_attention_dim is None else torch.randn(2, 7, 24)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=context)
        torch.testing.assert_close(ours(x, context), expected, rtol=0, atol=1e-5)
        with record_attention(ours):  # the explicit (recording) path agrees too
            torch.testing.assert_close(ours(x, context), expected, rtol=0, atol=1e-5)


def test_half_precision_logits_overflow_without_upcast():
    # q = k = 300 everywhere, shape (1, 8, 64), float16: a logit is
    # 64·300²/√64 = 720,000 > 65,504, the largest float16.
    q = k = torch.full((1, 8, 64), 300.0, dtype=torch.float16)
    v = torch.linspace(-1, 1, 8 * 64).reshape(1, 8, 64).to(torch.float16)
    naive_logits = q @ k.transpose(-1, -2) / 64 ** 0.5
    naive = naive_logits.softmax(dim=-1) @ v
    assert torch.isinf(naive_logits).all()
    assert not torch.isfinite(naive).any()

    upcast = multi_head_attention(q, k, v, heads=1, upcast=True)
    reference = multi_head_attention(q.float(), k.float(), v.float(), heads=1)
    assert upcast.dtype == torch.float16
    assert torch.isfinite(upcast).all()
    torch.testing.assert_close(upcast.float(), reference, rtol=0, atol=1e-3)
    # all logits are equal, so every query averages the 8 values
    torch.testing.assert_close(reference, v.float().mean(dim=1, keepdim=True).expand(1, 8, 64))


class _TwoAttentions(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = Attention(32, heads=4, dim_head=8)
        self.attn2 = Attention(32, cross_attention_dim=24, heads=4, dim_head=8)

    def forward(self, x, context):
        return self.attn2(self.attn1(x), context)


def test_recorder_probabilities_reproduce_the_fused_output():
    torch.manual_seed(0)
    model = _TwoAttentions().eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    with torch.no_grad():
        fused = model.attn2(x, context)
        with record_attention(model, keep=lambda name: name.endswith("attn2")) as rec:
            recorded_out = model.attn2(x, context)
    assert [name for name, _ in rec.maps] == ["attn2"]
    probs = rec.maps[0][1]
    assert probs.shape == (2, 4, 10, 7) and probs.dtype == torch.float32
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 10), rtol=0, atol=1e-6)

    attn = model.attn2
    with torch.no_grad():
        v = _split_heads(attn.to_v(context), attn.heads)
        by_hand = (probs @ v).transpose(1, 2).reshape(2, 10, 32)
        by_hand = attn.to_out[0](by_hand)
    torch.testing.assert_close(by_hand, fused, rtol=0, atol=1e-5)
    torch.testing.assert_close(recorded_out, fused, rtol=0, atol=1e-5)


def test_nothing_is_recorded_outside_the_context():
    torch.manual_seed(0)
    model = _TwoAttentions().eval()
    x, context = torch.randn(1, 5, 32), torch.randn(1, 3, 24)
    with torch.no_grad():
        with record_attention(model) as rec:
            model(x, context)
        assert [name for name, _ in rec.maps] == ["attn1", "attn2"]
        model(x, context)
    assert len(rec.maps) == 2
    assert model.attn1.recorder is None and model.attn2.recorder is None


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_padding_mask_with_causal_matches_explicit_softmax(kind):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 6, 16).unbind(0)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., 4:] = False  # the first sequence has two padding tokens
    mask = keep if kind == "bool" else torch.zeros(2, 1, 1, 6).masked_fill(~keep, -torch.inf)
    out = multi_head_attention(q, k, v, heads=2, mask=mask, causal=True)
    probs = attention_probs(_split_heads(q, 2), _split_heads(k, 2), mask, causal=True)
    assert probs[0, :, :, 4:].abs().max() == 0  # padding is never attended to
    assert probs[:, :, 1, 2:].abs().max() == 0  # token 1 sees tokens 0 and 1 only
    expected = (probs @ _split_heads(v, 2)).transpose(1, 2).reshape(2, 6, 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_channels_not_divisible_by_heads():
    q = torch.randn(1, 4, 30)
    with pytest.raises(ValueError, match="30 channels, which cannot be split into 4 heads"):
        multi_head_attention(q, q, q, heads=4)
    with pytest.raises(ValueError, match="^k has 6 channels"):
        multi_head_attention(torch.randn(1, 4, 8), torch.randn(1, 3, 6), torch.randn(1, 3, 8),
                             heads=4)
