"""Sentence-transformers style pooling: mean over real tokens, then L2 normalisation."""

from __future__ import annotations

import numpy as np


def mean_pool_normalize(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """hidden [batch, seq, dim], attention_mask [batch, seq] -> unit vectors [batch, dim].

    Padded positions are masked out, so padding a sentence inside a batch does not change it.
    """
    mask = attention_mask[..., None].astype(hidden.dtype)
    summed = (hidden * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    pooled = summed / counts
    norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return pooled / norms
