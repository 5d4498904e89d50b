"""Classification metrics shared by training and `scripts/evaluate.py` (and `hf_aace.evaluate_metric`).

The Trainer keeps only each sample's top-5 class indices (`top_k_predictions`, run on the device before logits are
gathered), so evaluation never holds a (samples x classes) logit matrix on the host.
"""

import numpy as np
import torch
from transformers import EvalPrediction

TOP_K = 5


def top_k_predictions(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the `TOP_K` highest logits per sample, best first (fewer when there are fewer classes).

    Matches the Trainer's `preprocess_logits_for_metrics` signature.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices


def accuracy_from_top_k(top_k: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 and top-5 accuracy from top-k class indices (best first) and the true labels."""
    top_k, labels = np.asarray(top_k), np.asarray(labels)
    if top_k.ndim != 2 or labels.shape != (top_k.shape[0],):
        raise ValueError(
            f"Expected top-k predictions of shape (samples, k) and labels of shape (samples,), got {top_k.shape} and "
            f"{labels.shape}."
        )
    hits = top_k == labels[:, None]
    return {"accuracy": float(hits[:, 0].mean()), "top5_accuracy": float(hits.any(axis=1).mean())}


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """The Trainer's `compute_metrics`, to be used with `preprocess_logits_for_metrics=top_k_predictions`."""
    return accuracy_from_top_k(prediction.predictions, prediction.label_ids)
