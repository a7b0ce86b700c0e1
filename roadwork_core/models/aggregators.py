"""Aggregators: per-view logits and features -> one image-level logit and probability.

Every aggregator: forward(view_logits (B, V), view_feats (B, V, D)) -> (logit (B,), prob (B,)),
with prob in [0, 1] and prob == sigmoid(logit) up to the clamp. All are invariant to the order of
the views.

- `topk_mean` / `mean` aggregate view PROBABILITIES: prob = mean of the k largest view
  probabilities (k = V for `mean`); logit = logit(prob) with prob clamped to [eps, 1 - eps].
  Roadwork is often visible in one tile only, so the top-k mean keeps a single confident tile from
  being averaged away by eight empty ones.
- `attention` learns softmax weights over views from their features (a small scoring MLP) and pools
  the view LOGITS: logit = sum_v w_v * view_logit_v, prob = sigmoid(logit). Weights are
  non-negative, so the output is monotone in every view logit.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AGGREGATORS", "AttentionAggregator", "MeanAggregator", "TopKMeanAggregator", "create_aggregator"]

_EPS = 1e-6


def _prob_to_logit(prob: torch.Tensor) -> torch.Tensor:
    return torch.logit(prob.clamp(_EPS, 1.0 - _EPS))


class TopKMeanAggregator(nn.Module):
    def __init__(self, dim: int, topk: int = 3) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = topk

    def forward(
        self, view_logits: torch.Tensor, view_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        view_probs = view_logits.float().sigmoid()  # (B, V)
        k = min(self.topk, view_probs.shape[1])
        prob = view_probs.topk(k, dim=1).values.mean(dim=1)  # (B,)
        return _prob_to_logit(prob), prob


class MeanAggregator(nn.Module):
    def __init__(self, dim: int, topk: int = 3) -> None:
        super().__init__()

    def forward(
        self, view_logits: torch.Tensor, view_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prob = view_logits.float().sigmoid().mean(dim=1)  # (B,)
        return _prob_to_logit(prob), prob


class AttentionAggregator(nn.Module):
    """Softmax attention over views, scored from view features; pools view logits (see module doc)."""

    def __init__(self, dim: int, topk: int = 3, hidden: int = 128) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(
        self, view_logits: torch.Tensor, view_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.score(view_feats).squeeze(-1).float().softmax(dim=1)  # (B, V)
        logit = (weights * view_logits.float()).sum(dim=1)  # (B,)
        return logit, logit.sigmoid()


AGGREGATORS: dict[str, type[nn.Module]] = {
    "topk_mean": TopKMeanAggregator,
    "mean": MeanAggregator,
    "attention": AttentionAggregator,
}


def create_aggregator(name: str, dim: int, topk: int = 3) -> nn.Module:
    cls = AGGREGATORS.get(name)
    if cls is None:
        raise ValueError(f"Unknown aggregator {name!r}; valid: {', '.join(AGGREGATORS)}")
    return cls(dim, topk=topk)
