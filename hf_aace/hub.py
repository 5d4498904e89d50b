"""Model cards for models trained with hf_aace: Hub metadata, architecture, exact arguments, measured results."""

import json
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PretrainedConfig

CITATION = """@inproceedings{ratchatorn2024aace,
  title     = {Adaptive Adversarial Cross-Entropy Loss for Sharpness-Aware Minimization},
  author    = {Ratchatorn, Tanapat and Tanaka, Masayuki},
  booktitle = {IEEE International Conference on Image Processing (ICIP)},
  pages     = {479--485},
  year      = {2024},
  doi       = {10.1109/ICIP51287.2024.10647582}
}"""

METHOD_NAMES = {
    "aace": "AACE-SAM (adaptive adversarial cross-entropy perturbation)",
    "sam": "SAM",
    "asam": "ASAM",
    "sgd": "plain training (no perturbation)",
}


def architecture_name(config: PretrainedConfig) -> str:
    """A short name such as "WRN-28-10" or "PyramidNet-272 (alpha 200, basic)"."""
    if config.model_type == "aace_wide_resnet":
        return f"WRN-{config.depth}-{config.widen_factor}"
    if config.model_type == "aace_pyramidnet":
        return f"PyramidNet-{config.depth} (alpha {config.alpha}, {'bottleneck' if config.bottleneck else 'basic'})"
    return type(config).__name__.removesuffix("Config")


def build_model_card(
    config: PretrainedConfig,
    training_arguments: dict[str, Any],
    metrics: dict[str, float],
    *,
    method: str,
    model_name: str,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    test_split: str = "test",
    repo_id: str | None = None,
) -> ModelCard:
    """Builds the model card of a trained model.

    Args:
        config: the trained model's config.
        training_arguments: the run's arguments (training, model and data), shown as given.
        metrics: measured results, e.g. the contents of `all_results.json` (`test_accuracy`, `test_top5_accuracy`,
            `test_loss`, `train_*`); only what is given is reported.
        method: the `sam_method` the model was trained with ("aace", "sam", "asam" or "sgd").
        model_name: the card's title.
        dataset_id: the Hub id of the training dataset (goes into the metadata).
        dataset_name: a readable dataset name.
        test_split: the dataset split the test metrics were measured on.
        repo_id: the Hub repository, for the loading snippet (defaults to `model_name`).

    Returns:
        A `huggingface_hub.ModelCard`; `.save(path)` or `.push_to_hub(repo_id)` it.
    """
    architecture = architecture_name(config)
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_id or "unknown",
            dataset_name=dataset_name or dataset_id or "unknown",
            dataset_split=test_split,
            metric_type=metric,
            metric_name=label,
            metric_value=metrics[key],
        )
        for key, metric, label in (
            ("test_accuracy", "accuracy", "Test accuracy"),
            ("test_top5_accuracy", "top_5_accuracy", "Test top-5 accuracy"),
        )
        if key in metrics
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=["image-classification", "hf_aace", "sam", "aace", "sharpness-aware-minimization", config.model_type],
        # Only Hub ids belong in the metadata ("owner/name"); other sources are named in the text.
        datasets=[dataset_id] if dataset_id and "/" in dataset_id and " " not in dataset_id else None,
        metrics=["accuracy"],
        model_name=model_name,
        eval_results=eval_results or None,
    )
    reported = {k: v for k, v in metrics.items() if k == "epoch" or k.endswith(("accuracy", "_loss"))}
    rows = "\n".join(f"| {key} | {_format(value)} |" for key, value in sorted(reported.items()))
    results = f"| metric | value |\n|---|---|\n{rows}" if rows else "No evaluation results were recorded."
    repo = repo_id or model_name
    dataset_label = (
        f"{dataset_name} ({dataset_id})" if dataset_name and dataset_id else dataset_id or "an image dataset"
    )
    arguments = json.dumps(training_arguments, indent=2, sort_keys=True, default=str)
    body = f"""
# {model_name}

{architecture} image classifier ({config.num_labels} classes) trained on {dataset_label} with
{METHOD_NAMES.get(method, method)} using hf_aace, an
implementation of *Adaptive Adversarial Cross-Entropy Loss for Sharpness-Aware Minimization* (Ratchatorn & Tanaka,
ICIP 2024) for the Hugging Face `Trainer`.

## Results

Measured at the end of this run (`{test_split}` split for test metrics):

{results}

## Architecture

`{type(config).__name__}`: {architecture}, {config.num_channels} input channel(s). The weights are stored as
safetensors; the modeling code travels with the model, so it loads with or without hf_aace installed.

## How to use

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

model = AutoModelForImageClassification.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)
classifier = pipeline("image-classification", model="{repo}", trust_remote_code=True)
```

With hf_aace installed, `import hf_aace` registers the classes and `trust_remote_code` is not needed.

## Training arguments

```json
{arguments}
```

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
