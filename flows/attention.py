"""The causal transformer conditioner of TarFlow, with a key/value cache for decoding.

A :class:`CausalTransformer` maps a sequence ``(B, L, features)`` to ``(B, L, out_features)``
so that output ``t`` depends only on inputs ``0..t`` (and on the context): pre-norm
self-attention with a causal mask and an MLP per layer, as in GPT-2. Decoding runs it a
few positions at a time: a :class:`KVCache` keeps the keys and values of the positions
already decoded, so each step attends over them without recomputing them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KVCache", "CausalSelfAttention", "TransformerLayer", "CausalTransformer"]


class KVCache:
    """Keys and values of the positions decoded so far, one entry per attention layer.

    A decoding call feeds the next positions; each layer attends over the committed keys
    and values plus the new ones and keeps the new ones as *pending*. :meth:`commit`
    appends the pending ones, so a block of positions may be run several times (fixed-point
    iterations) before its final keys and values join the cache. Tensors are concatenated,
    never written in place, so decoding stays differentiable (reparameterized sampling).

    Args:
        num_layers: attention layers of the transformer.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self._pending: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self.length = 0  # committed positions

    def extend(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """The committed keys and values of ``layer`` followed by the new ``(B, H, L, d)`` ones."""
        self._pending[layer] = (key, value)
        if self.keys[layer] is None:
            return key, value
        return torch.cat([self.keys[layer], key], 2), torch.cat([self.values[layer], value], 2)

    def commit(self, length: int) -> None:
        """Appends the pending keys and values of every layer (those of the last call), which
        were computed for the ``length`` positions after the committed ones."""
        for layer, pending in enumerate(self._pending):
            if pending is None:
                continue
            key, value = pending
            previous = self.keys[layer]
            self.keys[layer] = key if previous is None else torch.cat([previous, key], 2)
            self.values[layer] = value if previous is None else torch.cat([self.values[layer], value], 2)
            self._pending[layer] = None
        self.length += length


def _block_mask(length: int, prefix: int, device: torch.device) -> Tensor:
    """``(L, prefix + L)`` bool: new position ``i`` sees every cached one and new ones ``<= i``."""
    new = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(length, prefix, dtype=torch.bool, device=device), new], 1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` attends to positions ``<= t``.

    Args:
        features: ``D`` of the ``(B, L, D)`` tokens.
        num_heads: heads; ``D`` must be divisible by it.
    """

    def __init__(self, features: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(features, 3 * features)
        self.out = nn.Linear(features, features)

    def forward(self, h: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        batch, length, features = h.shape
        heads = self.qkv(h).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d)
        query, key, value = heads.unbind(0)
        if cache is None:
            attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        else:
            prefix = cache.length
            key, value = cache.extend(layer, key, value)
            # One new position sees the whole cache: no mask needed (and the fastest kernel).
            mask = None if length == 1 else _block_mask(length, prefix, h.device)
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(batch, length, features))


class TransformerLayer(nn.Module):
    """``h + attention(norm(h))``, then ``h + mlp(norm(h))``: a pre-norm transformer layer.

    Args:
        features: ``D``.
        num_heads: attention heads.
        expansion: the MLP's hidden width over ``D`` (4, as in GPT-2 and TarFlow).
    """

    def __init__(self, features: int, num_heads: int, expansion: int = 4) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(features)
        self.attention = CausalSelfAttention(features, num_heads)
        self.mlp_norm = nn.LayerNorm(features)
        self.mlp = nn.Sequential(
            nn.Linear(features, expansion * features), nn.GELU(), nn.Linear(expansion * features, features)
        )

    def forward(self, h: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        h = h + self.attention(self.attention_norm(h), cache, layer)
        return h + self.mlp(self.mlp_norm(h))


class CausalTransformer(nn.Module):
    """A causal transformer over ``num_positions`` positions: ``(B, L, features) -> (B, L, out_features)``.

    Output ``t`` depends only on inputs ``0..t`` and on the context. Each input is embedded
    by a linear map, plus a learned embedding of its position and, with
    ``context_features=K``, a linear embedding of the ``(B, K)`` context added at every
    position (a zero context gives the embedding's bias alone: the "null" context of
    classifier-free guidance). ``num_blocks`` :class:`TransformerLayer`, a final LayerNorm
    and a zero-initialized output layer (a flow built on it starts as the identity).

    Called with a :class:`KVCache`, the inputs are the positions that follow the cached ones.

    Args:
        features: size of each input.
        out_features: size of each output.
        num_positions: the sequence length ``T`` (the number of position embeddings).
        hidden_features: width ``D`` of the tokens.
        num_blocks: transformer layers.
        num_heads: attention heads (``D`` must be divisible by it).
        context_features: size ``K`` of a ``(B, K)`` context; 0 for none.

    Example:
        >>> import torch
        >>> net = CausalTransformer(4, 8, num_positions=6, hidden_features=16, num_blocks=1, num_heads=2)
        >>> net(torch.randn(3, 6, 4)).shape
        torch.Size([3, 6, 8])
    """

    def __init__(
        self,
        features: int,
        out_features: int,
        num_positions: int,
        hidden_features: int,
        num_blocks: int,
        num_heads: int,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        for name, value, least in (
            ("features", features, 1), ("out_features", out_features, 1), ("num_positions", num_positions, 1),
            ("hidden_features", hidden_features, 1), ("num_blocks", num_blocks, 0), ("num_heads", num_heads, 1),
            ("context_features", context_features, 0),
        ):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"CausalTransformer {name} must be an integer >= {least}, got {value!r}")
        if hidden_features % num_heads:
            raise ValueError(
                f"CausalTransformer hidden_features must be divisible by num_heads, got {hidden_features} and "
                f"{num_heads}; pick num_heads among the divisors of {hidden_features}"
            )
        self.num_positions = num_positions
        self.embedding = nn.Linear(features, hidden_features)
        # Small random position embeddings (as in ViT); position 0's doubles as the start token.
        self.position = nn.Parameter(torch.randn(num_positions, hidden_features) * 0.02)
        self.context_embedding = nn.Linear(context_features, hidden_features) if context_features else None
        self.layers = nn.ModuleList(TransformerLayer(hidden_features, num_heads) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(hidden_features)
        self.head = nn.Linear(hidden_features, out_features)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, context: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        start = 0 if cache is None else cache.length
        h = self.embedding(x) + self.position[start : start + x.shape[1]]  # (B, L, D)
        if self.context_embedding is not None:
            h = h + self.context_embedding(context.to(h.dtype))[:, None]
        for index, layer in enumerate(self.layers):
            h = layer(h, cache, index)
        return self.head(self.norm(h))
