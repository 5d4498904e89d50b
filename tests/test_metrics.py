import numpy as np
import pytest
import torch
import yaml
from transformers import EvalPrediction

from hf_aace import WideResNetConfig, WideResNetForImageClassification
from hf_aace.evaluate_metric import TopKAccuracy
from hf_aace.hub import build_model_card
from hf_aace.metrics import accuracy_from_top_k, compute_metrics, top_k_predictions
from hf_aace.plotting import plot_training_curves


def test_top_k_accuracy_from_logits():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4, 0.5], [0.9, 0.1, 0.0, 0.2, 0.3, 0.4, 0.5]])
    top_k = top_k_predictions(logits)
    assert top_k.shape == (2, 5) and top_k[0, 0] == 1
    # Sample 0 is right; sample 1's label (2) has the lowest logit: outside its top 5.
    metrics = compute_metrics(EvalPrediction(predictions=top_k.numpy(), label_ids=np.array([1, 2])))
    assert metrics == {"accuracy": 0.5, "top5_accuracy": 0.5}
    assert top_k_predictions(torch.randn(4, 3)).shape == (4, 3)  # fewer classes than 5


def test_evaluate_module_agrees_and_works_offline():
    top_k = top_k_predictions(torch.randn(50, 10, generator=torch.Generator().manual_seed(0))).numpy()
    labels = np.random.default_rng(0).integers(0, 10, 50)
    assert TopKAccuracy().compute(predictions=top_k, references=labels) == accuracy_from_top_k(top_k, labels)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"shape \(samples, k\)"):
        accuracy_from_top_k(np.zeros(3), np.zeros(3))


def test_model_card_reports_only_measured_numbers():
    model = WideResNetForImageClassification(WideResNetConfig(depth=16, widen_factor=4, num_labels=10))
    metrics = {"test_accuracy": 0.9512, "test_top5_accuracy": 0.999, "test_loss": 0.2, "test_runtime": 3.0}
    card = str(build_model_card(model, {}, metrics, method="sam", model_name="wrn", dataset_id="uoft-cs/cifar10"))
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["datasets"] == ["uoft-cs/cifar10"]
    values = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert values == {"accuracy": 0.9512, "top_5_accuracy": 0.999}
    assert "WRN-16-4" in card and "| test_accuracy | 0.9512 |" in card and "test_runtime" not in card
    assert "with SAM using hf_aace" in " ".join(card.split()) and "AACE-SAM" not in card

    unmeasured = str(
        build_model_card(model, {}, {}, method="aace", model_name="wrn", dataset_id="sklearn.datasets.load_digits")
    )
    metadata = yaml.safe_load(unmeasured.split("---")[1])
    assert "model-index" not in metadata and "datasets" not in metadata
    assert "No evaluation results were recorded." in unmeasured


def test_plots_skip_what_was_not_logged(tmp_path):
    history = [{"step": 1, "loss": 2.0, "clean_loss": 1.9}, {"step": 2, "loss": 1.5, "eval_accuracy": 0.5}]
    written = plot_training_curves(history, tmp_path)
    assert [p.name for p in written] == ["losses.png", "accuracy.png"]
    assert all(p.stat().st_size > 1000 for p in written)
