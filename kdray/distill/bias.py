"""Per-class logit bias correction (paper, section 3): a student that never saw a class in its
transfer set learns a too-low bias for it; adding a constant per class fixes most of the damage.

Pure torch, no Ray: the stage collects validation logits ([N_val, C], small) and calls this.
"""

from __future__ import annotations

import torch
from torch import nn


def fit_class_bias(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """The bias b [C] minimising mean cross-entropy of softmax(logits + b) on labelled rows.

    logits [N, C], labels [N] (-1 rows ignored). The problem is convex in b; L-BFGS from b = 0
    converges in a few dozen iterations. b is shifted to mean zero (softmax is shift-invariant).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    mask = labels >= 0
    logits, labels = logits[mask].double(), labels[mask]
    if len(labels) == 0:
        raise ValueError("no labelled rows to fit the class bias on")
    bias = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits + bias, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (bias - bias.mean()).float()
