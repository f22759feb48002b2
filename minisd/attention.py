"""Multi-head attention: the one implementation that the VAE, CLIP and the U-Net share.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1):

    Attention(Q, K, V) = softmax(Q·Kᵀ / √d) · V,   per head, d = head dimension.

In self-attention Q, K and V all come from x; in the U-Net's cross-attention Q comes from
the picture's pixels and K, V from the text context (Rombach et al. 2022, §3.3).

`multi_head_attention` is the core, on PyTorch's fused
`torch.nn.functional.scaled_dot_product_attention`. Two opt-ins:

- `upcast=True` computes Q·Kᵀ and the softmax in float32 when the inputs are half
  precision: with q = k = 300 and d = 64, a logit is 64·300²/8 = 720,000, beyond float16's
  65,504.
- recording: inside `with record_attention(model) as rec:` every `Attention` module of
  `model` also computes its attention probabilities explicitly and stores them in
  `rec.maps`, for plots (e.g. per-token cross-attention maps). Only while recording.

`Attention` has diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`); CLIP keeps
transformers' names (`q_proj` …) in its own module and calls `multi_head_attention`.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads·d) → (B, heads, N, d)."""
    B, N, C = x.shape
    return x.reshape(B, N, heads, C // heads).transpose(1, 2)


def attention_probs(q, k, mask=None, causal=False) -> torch.Tensor:
    """softmax(Q·Kᵀ/√d) written out, float32: q (B, h, N, d), k (B, h, M, d) → (B, h, N, M).

    `mask` is additive (broadcastable to (B, h, N, M), −inf where not allowed) or boolean
    (True where allowed), as in `scaled_dot_product_attention`; `causal` lets position i
    attend to positions ≤ i only.
    """
    q, k = q.float(), k.float()
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        N, M = logits.shape[-2:]
        allowed = torch.ones(N, M, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else logits + mask.float()
    return logits.softmax(dim=-1)


def multi_head_attention(q, k, v, heads: int, mask=None, causal: bool = False,
                         upcast: bool = False, recorder=None, name: str = "") -> torch.Tensor:
    """Multi-head attention on projected inputs.

    Args:
        q: queries (B, N, heads·d); k, v: keys and values (B, M, heads·d).
        heads: number of heads h; the channel count must divide by it.
        mask: optional attention mask broadcastable to (B, h, N, M), boolean (True = keep)
            or additive float.
        causal: mask out future positions (CLIP's text transformer).
        upcast: compute in float32 when the inputs are float16/bfloat16.
        recorder: an `AttentionRecorder`; when given, the probabilities (B, h, N, M) are
            computed explicitly and stored under `name`.
    Returns:
        (B, N, heads·d) in the dtype of q.
    Raises:
        ValueError if the channel count of q, k or v is not divisible by `heads`.
    """
    for label, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] % heads:
            raise ValueError(f"{label} has {t.shape[-1]} channels, which cannot be split "
                             f"into {heads} heads")
    dtype = q.dtype
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    if recorder is not None:
        probs = attention_probs(q, k, mask, causal)
        recorder.add(name, probs)
        out = (probs @ v.float()).to(dtype)
    else:
        if upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
            mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
        if causal and mask is not None:  # fused GPU kernels refuse a mask together with is_causal
            allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool,
                                 device=q.device).tril()
            mask = mask & allowed if mask.dtype == torch.bool else \
                mask + torch.zeros_like(allowed, dtype=mask.dtype).masked_fill(~allowed, -torch.inf)
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = out.to(dtype)
    B, h, N, d = out.shape
    return out.transpose(1, 2).reshape(B, N, h * d)


class Attention(nn.Module):
    """Multi-head self- or cross-attention with diffusers' parameter names.

    Queries come from x (B, N, query_dim); keys and values from `context`
    (B, M, cross_attention_dim) when given, else from x (self-attention). Heads of size
    `dim_head`; `heads · dim_head` is the inner width. The output projection `to_out.0`
    maps back to query_dim (`to_out.1` is a dropout, kept for diffusers' key layout).
    Matches diffusers' `Attention` with the default processor.

    Shapes: x (B, N, query_dim), context (B, M, cross_attention_dim) → (B, N, query_dim).
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True,
                 upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.is_cross_attention = cross_attention_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])
        self.recorder, self.record_name = None, ""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context),
                                   self.heads, mask=mask, upcast=self.upcast,
                                   recorder=self.recorder, name=self.record_name)
        return self.to_out[1](self.to_out[0](out))


class AttentionRecorder:
    """Collects attention probabilities while recording: `maps` is a list of
    (module name, probabilities (B, h, N, M) float32 on the CPU) in call order.
    `keep(name)` decides which modules are kept (default: all)."""

    def __init__(self, keep=None):
        self.maps: list[tuple[str, torch.Tensor]] = []
        self.keep = keep or (lambda name: True)

    def add(self, name: str, probs: torch.Tensor):
        self.maps.append((name, probs.detach().cpu()))


@contextmanager
def record_attention(model: nn.Module, keep=None):
    """Record the attention probabilities of `model`'s attention modules.

    `keep` is an optional predicate on module names (e.g. `lambda n: n.endswith("attn2")`
    for the U-Net's cross-attention). Any module with `recorder`/`record_name` attributes
    takes part (`Attention` and CLIP's attention). Yields an `AttentionRecorder`; on exit
    the modules go back to the fused path.
    """
    rec = AttentionRecorder(keep)
    chosen = [(n, m) for n, m in model.named_modules()
              if hasattr(m, "recorder") and rec.keep(n)]
    for name, module in chosen:
        module.recorder, module.record_name = rec, name
    try:
        yield rec
    finally:
        for _, module in chosen:
            module.recorder, module.record_name = None, ""
