"""Model cards of models trained with hf_aace and of checkpoints converted from the AACE paper's code."""

import json
import os
from collections.abc import Sequence
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modelcard import TASK_MAPPING, TASK_TAG_TO_NAME_MAPPING
from transformers.models.auto import modeling_auto
from transformers.pipelines import SUPPORTED_TASKS, TASK_ALIASES
from transformers.trainer_utils import unwrap_peft_model

from .methods import METHODS
from .models.architectures import OWN_MODEL_TYPES, architecture_for
from .models.conversion_utils import reference_preset
from .sharding import GLOBAL_BATCH, unsharded_class

CITATION = """@inproceedings{ratchatorn2024aace,
  title     = {Adaptive Adversarial Cross-Entropy Loss for Sharpness-Aware Minimization},
  author    = {Ratchatorn, Tanapat and Tanaka, Masayuki},
  booktitle = {IEEE International Conference on Image Processing (ICIP)},
  pages     = {479--485},
  year      = {2024},
  doi       = {10.1109/ICIP51287.2024.10647582}
}"""

PROCESSOR_FILES = (  # what `save_pretrained` writes, and the Auto class that loads it
    ("processor_config.json", "AutoProcessor"),
    ("preprocessor_config.json", "AutoImageProcessor"),  # or AutoFeatureExtractor: see `saved_processor_class`
    ("tokenizer_config.json", "AutoTokenizer"),
)


# Auto class -> the model classes it loads (a `MODEL_*_MAPPING_NAMES` dict). Any Auto class listing a model class
# loads that very class, head included; AutoModel comes first so that base models get the usual name.
_AUTO_CLASS_MAPPINGS = {
    name: auto._model_mapping._model_mapping
    for name, auto in sorted(vars(modeling_auto).items(), key=lambda item: item[0] != "AutoModel")
    if name.startswith("AutoModel")
    and isinstance(getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None), dict)
}
# Tasks that the Trainer's `tasks` option (and the Hub) name but TASK_MAPPING does not list.
_EXTRA_CARD_TASKS = {
    "multiple-choice": modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
    "summarization": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "translation": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "zero-shot-classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
}


def _auto_classes_of(names: dict[str, str]) -> tuple[str, ...]:
    """The Auto classes of a task's model names: the one wrapping that very dict, or those of the dicts it unites.

    A TASK_MAPPING value is one `MODEL_FOR_*_MAPPING_NAMES` dict, or for speech recognition the union of two (CTC and
    speech seq2seq), which no Auto class wraps.
    """
    exact = [auto for auto, mapping in _AUTO_CLASS_MAPPINGS.items() if mapping is names]
    return tuple(exact) or tuple(
        auto for auto, mapping in _AUTO_CLASS_MAPPINGS.items() if mapping and mapping.items() <= names.items()
    )


# Task -> its Auto classes, the first being the one to show when the model is in none of them.
AUTO_MODEL_CLASSES = {task: _auto_classes_of(names) for task, names in {**_EXTRA_CARD_TASKS, **TASK_MAPPING}.items()}
# The processors a pipeline of each input type reads; a snippet shows no pipeline the saved processor cannot feed.
_PIPELINE_PROCESSORS = {
    "text": ("AutoTokenizer", "AutoProcessor"),
    "image": ("AutoImageProcessor", "AutoProcessor"),
    "audio": ("AutoFeatureExtractor", "AutoProcessor"),
    "automatic-speech-recognition": ("AutoProcessor",),  # the feature extractor and the tokenizer that decodes
}


def architecture_name(config: PretrainedConfig) -> str:
    """A readable name such as "WRN-28-10" or "PyramidNet-272 (alpha 200, basic)"; the class name for other models."""
    architecture = architecture_for(config)
    return architecture.display_name(config) if architecture else type(config).__name__.removesuffix("Config")


def pipeline_task(model: nn.Module) -> str | None:
    """The pipeline task of a model class, from transformers' Auto mappings (hf_aace's own: image-classification)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in OWN_MODEL_TYPES:
        return "image-classification"
    name = unsharded_class(model).__name__
    task = next((task for task, classes in TASK_MAPPING.items() if name in classes.values()), None)
    # Multiple-choice heads are in no TASK_MAPPING entry; the Hub still knows the task.
    return task or (
        "multiple-choice" if name in modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES.values() else None
    )


def saved_processor_class(folder: str) -> str | None:
    """The Auto class of the processor saved in `folder` (None when none was saved).

    `preprocessor_config.json` holds an image processor or a feature extractor (audio models); AutoImageProcessor
    refuses the latter, so its own keys tell which Auto class loads it.
    """
    auto = next((auto for file, auto in PROCESSOR_FILES if os.path.isfile(os.path.join(folder, file))), None)
    if auto == "AutoImageProcessor":
        with open(os.path.join(folder, "preprocessor_config.json")) as file:
            settings = json.load(file)
        image_processor = "image_processor_type" in settings or "AutoImageProcessor" in settings.get("auto_map", {})
        if not image_processor and "feature_extractor_type" in settings:
            return "AutoFeatureExtractor"
    return auto


def auto_model_class(task: str | None, model_class: str) -> str:
    """The Auto class that loads `model_class` with its head, for a card naming `task`.

    Args:
        task: the card's task (None when it names none).
        model_class: the class name of the (base) model, e.g. "Wav2Vec2ForCTC".

    Returns:
        The task's Auto class whose mapping lists the model; else any Auto class listing it (a task given by hand
        that does not fit the model must not drop its head); else the task's first; else "AutoModel".
    """
    candidates = AUTO_MODEL_CLASSES.get(task, ())
    for auto in (*candidates, *_AUTO_CLASS_MAPPINGS):
        if model_class in _AUTO_CLASS_MAPPINGS.get(auto, {}).values():
            return auto
    return candidates[0] if candidates else "AutoModel"


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _scope_text(scope: str | None) -> str:
    if scope is None:
        return ""
    how = "as on one process, or sharded with FSDP2" if scope == GLOBAL_BATCH else "each process its own, under DDP"
    return f" Each perturbation was taken from the gradient of the {scope} ({how})."


def build_model_card(
    model: nn.Module,
    training_arguments: dict[str, Any],
    metrics: dict[str, float],
    *,
    method: str,
    model_name: str,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    test_split: str = "test",
    repo_id: str | None = None,
    processor_class: str | None = None,
    plots: Sequence[str] = (),
    perturbation: dict[str, Any] | None = None,
    perturbation_scope: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
) -> ModelCard:
    """Builds the model card of a model trained with hf_aace: any transformers model, a PEFT adapter or hf_aace's own.

    Args:
        model: the trained model (a PEFT model for an adapter).
        training_arguments: the run's arguments (training, model and data), shown as given.
        metrics: measured results, e.g. the contents of `all_results.json` (`test_accuracy`, `test_top5_accuracy`,
            `test_loss`, `train_*`); only what is given is reported.
        method: the `sam_method` the model was trained with (a key of `hf_aace.methods.METHODS`).
        model_name: the card's title.
        dataset_id: the Hub id of the training dataset (goes into the metadata).
        dataset_name: a readable dataset name.
        test_split: the dataset split the test metrics were measured on.
        repo_id: the Hub repository, for the loading snippet (defaults to `model_name`).
        processor_class: the Auto class of the processor saved with the model (see `saved_processor_class`); no
            processor line without one.
        plots: paths of training-curve images, relative to the card, shown in the card.
        perturbation: the resolved perturbation settings (rho, normalisation, ...), shown with the method.
        perturbation_scope: the batch each perturbation came from (`hf_aace.sharding`: "global batch" or
            "per-process batch"), said in a sentence; None for plain training.
        language, license, tags, finetuned_from, tasks, dataset_tags, dataset, dataset_args: the Trainer's own card
            options, as for `Trainer.create_model_card`.

    Returns:
        A `huggingface_hub.ModelCard`; `.save(path)` or `.push_to_hub(repo_id)` it.
    """
    base = unwrap_peft_model(model)
    is_adapter = base is not model
    config = base.config
    own = config.model_type in OWN_MODEL_TYPES
    task = _as_list(tasks)[0] if tasks else pipeline_task(base)
    architecture = architecture_name(config)
    datasets = _as_list(dataset) or ([dataset_id] if dataset_id else [])
    first_dataset = datasets[0] if datasets else None
    # Only Hub ids belong in the metadata ("owner/name"); other sources are named in the text.
    hub_datasets = [d for d in datasets if "/" in d and " " not in d]
    base_model = finetuned_from
    if is_adapter:
        base_model = base_model or next(iter(model.peft_config.values())).base_model_name_or_path
    eval_results = [
        EvalResult(
            task_type=task or "image-classification",
            task_name=TASK_TAG_TO_NAME_MAPPING.get(task, task or "Classification"),
            dataset_type=first_dataset or "unknown",
            dataset_name=dataset_name or first_dataset or "unknown",
            dataset_split=test_split,
            dataset_args=_as_list(dataset_args)[0] if dataset_args else None,
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
    method_tags = ["hf_aace", "sam", "sharpness-aware-minimization", method, config.model_type]
    card_data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag=task,
        base_model=base_model if base_model and "/" in base_model else None,
        language=language,
        license=license or ("apache-2.0" if own else None),
        tags=list(dict.fromkeys(_as_list(tags) + _as_list(dataset_tags) + [t for t in method_tags if t])),
        datasets=hub_datasets or None,
        metrics=["accuracy"] if eval_results else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    reported = {k: v for k, v in metrics.items() if k == "epoch" or k.endswith(("accuracy", "_loss"))}
    rows = "\n".join(f"| {key} | {_format(value)} |" for key, value in sorted(reported.items()))
    results = f"| metric | value |\n|---|---|\n{rows}" if rows else "No evaluation results were recorded."
    curves = "\n".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots)
    curves_section = f"\n## Training curves\n\n{curves}\n" if curves else ""
    dataset_label = f"{dataset_name} ({first_dataset})" if dataset_name and first_dataset else first_dataset
    if own:
        what = f"{architecture} image classifier"
    elif task in TASK_TAG_TO_NAME_MAPPING:
        what = f"{architecture} model for {TASK_TAG_TO_NAME_MAPPING[task].lower()}"
    else:
        what = f"{architecture} model"
    if own or getattr(config, "num_labels", None) and task in ("image-classification", "text-classification"):
        what += f" ({config.num_labels} classes)"
    if is_adapter:
        what = f"A PEFT adapter for a {what}"
    origin = f" fine-tuned from `{base_model}`" if base_model else ""
    trained_on = f" on {dataset_label}" if dataset_label else ""
    method_name = METHODS[method].display_name if method in METHODS else method
    settings = ", ".join(f"{k} {v}" for k, v in (perturbation or {}).items() if v is not None)
    class_name = unsharded_class(base).__name__
    arguments = json.dumps(training_arguments, indent=2, sort_keys=True, default=str)
    body = f"""
# {model_name}

{what}{origin}, trained{trained_on} with {method_name}{f" ({settings})" if settings else ""} using hf_aace, an
implementation of *Adaptive Adversarial Cross-Entropy Loss for Sharpness-Aware Minimization* (Ratchatorn & Tanaka,
ICIP 2024) for the Hugging Face `Trainer`.{_scope_text(perturbation_scope)}

## Results

Measured at the end of this run (`{test_split}` split for test metrics):

{results}
{curves_section}
## Architecture

{_architecture_text(model, config, architecture, own, is_adapter)}

## How to use

```python
{_usage(repo_id or model_name, task, class_name, own, processor_class, base_model if is_adapter else None)}
```
{_usage_note(own)}
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


def build_conversion_card(model: PreTrainedModel, dataset: str, source: str, repo_id: str | None = None) -> ModelCard:
    """Builds the model card of a checkpoint of the AACE paper's code converted by `convert_reference_checkpoint`.

    Args:
        model: the converted model.
        dataset: the dataset it was converted for (a convertible preset or an alias).
        source: where the original checkpoint came from (its file name or URL), as given by the user.
        repo_id: the Hub id the model is pushed to, used in the usage snippet; None uses a local path.

    Returns:
        A `huggingface_hub.ModelCard`; `.save(path)` or `.push_to_hub(repo_id)` it.
    """
    preset = reference_preset(dataset)
    config = model.config
    architecture = architecture_name(config)
    pooling = f"AvgPool2d({config.pooling_size})" if config.pooling_size else "global average pooling"
    height, width = preset.image_size
    location = repo_id or "path/to/this/folder"
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["hf_aace", "aace", "sharpness-aware-minimization", "converted"],
        datasets=[preset.hub_id],
    )
    body = f"""
# {architecture} on {preset.name}, converted from the AACE paper's code

Converted, not retrained: these are the weights of the checkpoint `{source}`, written by the reproduction code of
Ratchatorn & Tanaka, "Adaptive Adversarial Cross-Entropy Loss for Sharpness-Aware Minimization" (ICIP 2024,
[arXiv 2406.14329](https://arxiv.org/abs/2406.14329), code: https://github.com/T-Ratchatorn/AACE). Each tensor was
renamed into hf_aace's `{type(model).__name__}` and loaded strictly;
no value was changed. The conversion does not tell how the checkpoint was trained (SGD, SAM or AACE) nor how
accurate it is: evaluate it before relying on it.

## Architecture

- {architecture}, {config.num_labels} classes, {config.num_channels} input channel(s), {pooling}
  before the classifier, as the paper's code builds it for {preset.name}.
- Input: {height}x{width} images.

## Preprocessing

The saved `AACEImageProcessor` converts images to {config.num_channels} channel(s),
{"zero-pads them to a centred square, " if preset.pad_to_square else ""}resizes them to {height}x{width}, scales
them to [0, 1] and normalises them with mean {list(preset.reference_mean)} and std {list(preset.reference_std)}:
{preset.normalization_source}.

## Usage

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{location}", trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained("{location}", trust_remote_code=True)
logits = model(**processor(image, return_tensors="pt")).logits
```

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _architecture_text(model: nn.Module, config: PretrainedConfig, architecture: str, own: bool, adapter: bool) -> str:
    if own:
        return (
            f"`{type(config).__name__}`: {architecture}, {config.num_channels} input channel(s). The weights are "
            "stored as safetensors; the modeling code travels with the model, so it loads with or without hf_aace "
            "installed."
        )
    name = unsharded_class(unwrap_peft_model(model)).__name__
    text = f"`{name}` from transformers (model type `{config.model_type}`)."
    if adapter:
        peft_config = next(iter(model.peft_config.values()))
        text += f" Only the {peft_config.peft_type} adapter weights are stored; load them onto the base model."
    return text


def _pipeline_name(task: str | None, auto_model: str, processor_class: str | None) -> str | None:
    """The name `pipeline()` accepts for the card's task, or None when it has no pipeline that can run this model.

    Card tasks are Hub tags: some have no pipeline in transformers 5 (multiple-choice, question-answering,
    summarization, text2text-generation), and a pipeline needs the processor of its input type.
    """
    name = TASK_ALIASES.get(task, task)
    if name not in SUPPORTED_TASKS or auto_model not in {auto.__name__ for auto in SUPPORTED_TASKS[name]["pt"]}:
        return None
    needed = _PIPELINE_PROCESSORS.get(name, _PIPELINE_PROCESSORS.get(SUPPORTED_TASKS[name]["type"]))
    return name if processor_class and (needed is None or processor_class in needed) else None


# Direct calls for heads without a pipeline, written against `model` and `tokenizer`.
_TOKENIZER_CALLS = {
    "AutoModelForSeq2SeqLM": """
inputs = tokenizer("hf_aace trains models with adaptive adversarial cross-entropy.", return_tensors="pt")
output_ids = model.generate(**inputs, max_new_tokens=32)
print(tokenizer.batch_decode(output_ids, skip_special_tokens=True))""",
    "AutoModelForQuestionAnswering": """
inputs = tokenizer("What does hf_aace train with?", "hf_aace trains with AACE-SAM.", return_tensors="pt")
outputs = model(**inputs)
start, end = outputs.start_logits.argmax(), outputs.end_logits.argmax()
print(tokenizer.decode(inputs["input_ids"][0, start : end + 1]))""",
    "AutoModelForMultipleChoice": """
prompt = "The model was trained with"
choices = ["sharpness-aware minimization.", "a hammer."]
inputs = tokenizer([prompt] * len(choices), choices, return_tensors="pt", padding=True)
logits = model(**{key: value.unsqueeze(0) for key, value in inputs.items()}).logits  # (1, choices)
print(choices[logits.argmax().item()])""",
}


def _usage(
    repo: str, task: str | None, model_class: str, own: bool, processor_class: str | None, adapter_base: str | None
) -> str:
    """The "How to use" code: it loads the model with its head and, where it can, runs it on an example."""
    auto_model = auto_model_class(task, model_class)
    remote = ", trust_remote_code=True" if own else ""
    # An adapter loads onto a base model object, which a pipeline named by folder cannot do.
    pipeline_name = None if adapter_base is not None else _pipeline_name(task, auto_model, processor_class)
    call = _TOKENIZER_CALLS.get(auto_model) if processor_class == "AutoTokenizer" else None
    imports = sorted(
        {auto_model, *([processor_class] if processor_class else []), *(["pipeline"] if pipeline_name else [])}
    )
    lines = [f"from transformers import {', '.join(imports)}", ""]
    if adapter_base is not None:
        lines[0:0] = ["from peft import PeftModel"]
        lines += [
            f'base = {auto_model}.from_pretrained("{adapter_base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
        ]
    else:
        lines.append(f'model = {auto_model}.from_pretrained("{repo}"{remote})')
    if processor_class:
        variable = "tokenizer" if processor_class == "AutoTokenizer" else "processor"
        lines.append(f'{variable} = {processor_class}.from_pretrained("{repo}"{remote})')
    if pipeline_name:
        lines.append(f'pipe = pipeline("{pipeline_name}", model="{repo}"{remote})')
    elif call:
        lines.append(call)
    return "\n".join(lines)


def _usage_note(own: bool) -> str:
    if not own:
        return ""
    return "\nWith hf_aace installed, `import hf_aace` registers the classes and `trust_remote_code` is not needed.\n"


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
