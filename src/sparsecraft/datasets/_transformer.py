"""A small causal transformer language model with tied input/output embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import _positive_int

__all__ = ["CausalTransformer"]


class CausalTransformer(nn.Module):
    """A decoder-only transformer: token + learned position embeddings, causal encoder layers, tied head.

    ``embed(tokens) + pos[:T]`` goes through ``n_layers``
    ``nn.TransformerEncoderLayer(batch_first=True, norm_first=True,
    dropout=0)`` with a causal mask, a final ``LayerNorm`` and a ``Linear``
    head whose weight *is* the embedding matrix (``head.weight =
    embed.weight``, tied as in GPT-2 and Press & Wolf 2017). The tied matrix
    is one parameter: ``named_parameters()`` lists it once, as
    ``embed.weight``. Embeddings start at N(0, 0.02²) as in GPT-2, so the
    tied head's first logits are small.

    Args:
        vocab: Vocabulary size.
        max_len: Longest sequence the position embedding covers.
        d_model: Width.
        n_heads: Attention heads per layer.
        n_layers: Encoder layers.
        d_ff: Width of each feed-forward block.

    Raises:
        ValueError: If a size is not a positive int or ``d_model`` is not a
            multiple of ``n_heads``.
    """

    def __init__(
        self,
        vocab: int,
        max_len: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 128,
    ):
        super().__init__()
        for name, v in (
            ("vocab", vocab),
            ("max_len", max_len),
            ("d_model", d_model),
            ("n_heads", n_heads),
            ("n_layers", n_layers),
            ("d_ff", d_ff),
        ):
            _positive_int(name, v)
        if d_model % n_heads:
            raise ValueError(
                f"Expected d_model to be a multiple of n_heads. "
                f"Received: d_model={d_model}, n_heads={n_heads}"
            )
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, n_heads, d_ff, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[batch, T, vocab]`` for int64 ``tokens [batch, T]`` (``T <= max_len``)."""
        n = tokens.shape[1]
        # Positions and mask are built from n with torch functions, not sliced from stored
        # tensors (pos.weight[:n]): torch.fx cannot slice a real tensor by a traced length,
        # and export.compact and export.save read the model through torch.fx.
        x = self.embed(tokens) + self.pos(torch.arange(n, device=tokens.device))
        # -inf above the diagonal: position t sees positions <= t.
        mask = torch.triu(torch.full((n, n), float("-inf"), device=tokens.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))
