"""The package's classification metric as an `evaluate` module: usable offline, unlike `evaluate.load("accuracy")`.

Kept apart from `hf_aace.metrics` so that the training and evaluation scripts never import the `evaluate` library
(`scripts/evaluate.py` would shadow it).
"""

import datasets
import evaluate
import numpy as np

from .metrics import accuracy_from_top_k


class TopKAccuracy(evaluate.Metric):
    """`evaluate` metric computing `accuracy` and `top5_accuracy` from top-k class indices; works offline.

    Example:
    ```python
    >>> from hf_aace.evaluate_metric import TopKAccuracy
    >>> TopKAccuracy().compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[2, 0])
    {'accuracy': 0.5, 'top5_accuracy': 1.0}
    ```
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Top-1 and top-5 accuracy of image classifiers.",
            citation="",
            inputs_description="predictions: top-k class indices per sample, best first; references: true labels.",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return accuracy_from_top_k(np.asarray(predictions), np.asarray(references))
