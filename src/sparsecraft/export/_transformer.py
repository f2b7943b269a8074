"""``compact`` inside ``nn.TransformerEncoderLayer``: dead FFN neurons and dead attention heads.

The layer is rewritten in place of the original, independently of how the
model calls it (each removal below is exact for any input), so it also works
when the model around it cannot be traced.

* FFN neuron ``j``: when row ``j`` of ``linear1`` is zero its hidden value is
  the constant ``act(b1[j])``, folded exactly into ``linear2``'s bias
  (``b2 += W2[:, j] * act(b1[j])``); when column ``j`` of ``linear2`` is zero
  the neuron is read by nobody. Either way it is removed. The layer keeps its
  class (``nn.TransformerEncoderLayer`` with a smaller ``dim_feedforward``).
* Attention head ``h``: when its value projection weights are zero, its output
  is ``softmax(...) @ (1 b_v) = b_v`` (attention rows sum to 1), a constant
  folded into the output projection's bias; when its columns of the output
  projection are zero it contributes nothing. Either way it is removed. A
  head whose query or key weights are zero is *not* dead: its attention is
  uniform and it still averages ``v``; it is kept and reported. Removing heads
  changes the attention width, which ``nn.MultiheadAttention`` cannot express,
  so such a layer becomes a :class:`CompactEncoderLayer` (same forward
  signature and result, eval mode, within float rounding).

Head pruning is the idea of Michel et al., "Are Sixteen Heads Really Better
than One?" (NeurIPS 2019), restricted here to heads that are exactly zero.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class _HeadAttention(nn.Module):
    """Multi-head self-attention over a subset of the original heads.

    ``scale`` stays ``1/sqrt(head_dim)`` of the original layer; a per-head
    3-D ``attn_mask`` of the original (``[batch * heads, S, S]``) is indexed
    by the kept heads.
    """

    def __init__(self, mha: nn.MultiheadAttention, heads: list[int], out_bias: torch.Tensor | None):
        super().__init__()
        e, hd = mha.embed_dim, mha.head_dim
        self.batch_first = mha.batch_first
        self.embed_dim, self.head_dim, self.num_heads = e, hd, len(heads)
        self.orig_num_heads = mha.num_heads
        self.dropout = mha.dropout
        self.register_buffer("heads", torch.tensor(heads, dtype=torch.long), persistent=False)
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        idx = torch.cat([rows, rows + e, rows + 2 * e])
        w = mha.in_proj_weight.detach()
        b = mha.in_proj_bias
        self.in_proj = nn.Linear(e, idx.numel(), bias=b is not None, device=w.device, dtype=w.dtype)
        self.out_proj = nn.Linear(rows.numel(), e, bias=out_bias is not None,
                                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(w[idx.to(w.device)])
            if b is not None:
                self.in_proj.bias.copy_(b.detach()[idx.to(w.device)])
            self.out_proj.weight.copy_(mha.out_proj.weight.detach()[:, rows.to(w.device)])
            if out_bias is not None:
                self.out_proj.bias.copy_(out_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                key_padding_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            x = x.transpose(0, 1)
        n, s, _ = x.shape
        q, k, v = self.in_proj(x).view(n, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # [batch * orig_heads, S, S]
                attn_mask = attn_mask.view(n, self.orig_num_heads, s, s)[:, self.heads]
            mask = _additive(attn_mask, q.dtype)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(n, 1, 1, s)
            mask = padding if mask is None else mask + padding
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=bool(is_causal and mask is None), scale=1.0 / math.sqrt(self.head_dim))
        out = out.transpose(1, 2).reshape(n, s, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out.squeeze(0 if self.batch_first else 1) if unbatched else out

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} "
                f"(of {self.orig_num_heads}), head_dim={self.head_dim}")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MultiheadAttention's mask rule as an additive mask: a bool mask is True where
    attention is *not* allowed (``-inf``); a float mask is added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


class CompactEncoderLayer(nn.Module):
    """An ``nn.TransformerEncoderLayer`` with some attention heads removed.

    Same forward signature and, in eval mode, the same outputs (within float
    rounding) as the layer it was made from; built by :func:`compact`.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer, heads: list[int],
                 out_bias: torch.Tensor | None) -> None:
        super().__init__()
        self.self_attn = _HeadAttention(layer.self_attn, heads, out_bias)
        self.norm_first = layer.norm_first
        for name in ("linear1", "linear2", "norm1", "norm2", "dropout", "dropout1", "dropout2"):
            setattr(self, name, copy.deepcopy(getattr(layer, name)))
        self.activation = copy.deepcopy(layer.activation)
        self.train(layer.training)  # new submodules start in training mode

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attention(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))

    def _attention(self, x, mask, padding, is_causal) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, mask, padding, is_causal))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


def _ffn(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, str] | None:
    """Smaller linear1/linear2 with dead neurons removed and folded, and what was done."""
    w1, b1 = layer.linear1.weight.detach(), layer.linear1.bias
    w2, b2 = layer.linear2.weight.detach(), layer.linear2.bias
    dead_in = (w1 == 0).all(1)
    unread = (w2 == 0).all(0)
    drop = dead_in | unread
    if not drop.any():
        return None
    if drop.all():
        drop[0] = False  # keep one neuron: every layer keeps a valid shape
    keep = ~drop
    bias2 = (b2.detach().double() if b2 is not None
             else torch.zeros(w2.shape[0], dtype=torch.float64, device=w2.device))
    fold = drop & dead_in & ~unread
    if fold.any():
        hidden = (b1.detach() if b1 is not None else torch.zeros_like(w1[:, 0]))[fold]
        with torch.no_grad():
            const = layer.activation(hidden.unsqueeze(0))[0].double()
        bias2 = bias2 + w2[:, fold].double() @ const
    lin1 = nn.Linear(w1.shape[1], int(keep.sum()), bias=b1 is not None, device=w1.device,
                     dtype=w1.dtype)
    needs_b2 = b2 is not None or bool((bias2 != 0).any())
    lin2 = nn.Linear(int(keep.sum()), w2.shape[0], bias=needs_b2, device=w2.device,
                     dtype=w2.dtype)
    with torch.no_grad():
        lin1.weight.copy_(w1[keep])
        if b1 is not None:
            lin1.bias.copy_(b1.detach()[keep])
        lin2.weight.copy_(w2[:, keep])
        if needs_b2:
            lin2.bias.copy_(bias2.to(w2.dtype))
    note = (f"{int(drop.sum())} of {drop.numel()} FFN neurons removed "
            f"({int(fold.sum())} constant, folded into linear2.bias)")
    return lin1, lin2, note


def _heads(layer: nn.Module) -> tuple[list[int], torch.Tensor | None, str, list[str]]:
    """Heads to keep, the output bias with constants folded, a note, and refusals."""
    mha = layer.self_attn
    refusals = []
    h_count, hd, e = mha.num_heads, mha.head_dim, mha.embed_dim
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return list(range(h_count)), None, "", [
            "attention heads kept: separate q/k/v projections, bias_k/bias_v or add_zero_attn "
            "are not rewritten"]
    w = mha.in_proj_weight.detach()
    b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
    wo = mha.out_proj.weight.detach()
    bo = mha.out_proj.bias
    out_bias = (bo.detach().double() if bo is not None
                else torch.zeros(e, dtype=torch.float64, device=wo.device))
    keep, folds = [], {}
    for h in range(h_count):
        sl = slice(h * hd, (h + 1) * hd)
        q_zero, k_zero = bool((w[sl] == 0).all()), bool((w[e:][sl] == 0).all())
        v_zero = bool((w[2 * e:][sl] == 0).all())
        if bool((wo[:, sl] == 0).all()):
            continue  # read by nobody
        if v_zero:
            if b is not None and bool((b[2 * e:][sl] != 0).any()):
                folds[h] = wo[:, sl].double() @ b[2 * e:][sl].double()
                out_bias = out_bias + folds[h]
            continue
        keep.append(h)
        if q_zero or k_zero:
            refusals.append(
                f"head {h} kept: its {'query' if q_zero else 'key'} weights are zero, so its "
                "attention is uniform, not zero (it still averages v over the allowed keys)")
    if len(keep) == h_count:
        return keep, None, "", refusals
    if not keep:
        keep = [0]  # keep one head: an empty attention has no valid shape
        if 0 in folds:  # head 0 computes its constant itself again
            out_bias = out_bias - folds.pop(0)
    folded = len(folds)
    needs_bias = bo is not None or bool((out_bias != 0).any())
    note = f"{h_count - len(keep)} of {h_count} attention heads removed" + (
        f" ({folded} with zero value weights: constant b_v folded into out_proj.bias)"
        if folded else "")
    return keep, out_bias.to(wo.dtype) if needs_bias else None, note, refusals


def compact_encoder_layer(
    layer: nn.TransformerEncoderLayer, nested_fast_path: bool
) -> tuple[nn.Module | None, list[str], list[str]]:
    """Removes the dead FFN neurons and attention heads of one encoder layer.

    Args:
        layer: The layer (not modified).
        nested_fast_path: The layer sits in an ``nn.TransformerEncoder`` that may
            hand it nested tensors; heads are then kept (the rewritten layer
            does not take nested tensors).

    Returns:
        ``(new_layer or None, notes of what was removed, reasons for what was kept)``.
    """
    notes: list[str] = []
    ffn = _ffn(layer)
    keep, out_bias, head_note, refusals = _heads(layer)
    drop_heads = len(keep) < layer.self_attn.num_heads
    if drop_heads and nested_fast_path:
        refusals.append("attention heads kept: the enclosing nn.TransformerEncoder may pass "
                        "nested tensors (enable_nested_tensor=True), which the rewritten layer "
                        "does not take")
        drop_heads = False
    if ffn is None and not drop_heads:
        return None, notes, refusals
    new = copy.deepcopy(layer)
    if ffn is not None:
        new.linear1, new.linear2, note = ffn
        notes.append(note)
    if drop_heads:
        new = CompactEncoderLayer(new, keep, out_bias)
        notes.append(head_note)
    return new, notes, refusals
