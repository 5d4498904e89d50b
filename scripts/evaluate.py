#!/usr/bin/env python
"""Evaluate a trained image classifier (local directory or Hub id) on a dataset's test split.

Prints accuracy, top-5 accuracy and cross-entropy. Images are prepared exactly as the model's saved image processor
prepares them (size, padding, channels, mean and std). Runs on many processes under `accelerate launch`.

    python scripts/evaluate.py --model outputs/demo --dataset digits
"""

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser, TrainingArguments

from hf_aace.data import BatchAugmentation, DatasetArguments
from hf_aace.image_batches import ImageBatchTrainer
from hf_aace.metrics import compute_metrics, top_k_predictions


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "Local directory or Hub id of the model (with its image processor)."})
    split: str = field(
        default="test",
        metadata={"help": "'test' (the dataset's test split) or 'train'.", "choices": ["test", "train"]},
    )
    batch_size: int = field(default=256, metadata={"help": "Images per device and batch."})
    use_cpu: bool = field(default=False, metadata={"help": "Evaluate on the CPU even when a GPU is present."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's remote code."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})


def main(argv: list[str]) -> int:
    args, data_args = HfArgumentParser((EvaluationArguments, DatasetArguments)).parse_args_into_dataclasses(argv)
    check_model_location(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForImageClassification.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    size = processor.size
    # Images are prepared as the model's processor prepares them.
    data = data_args.load(
        show_progress=PartialState().is_local_main_process,
        image_size=(size["height"], size["width"]),
        pad_to_square=bool(getattr(processor, "do_pad_to_square", False)),
        num_channels=getattr(processor, "num_channels", None),
    )
    if data.num_labels != model.config.num_labels:
        raise ValueError(
            f"{data_args.dataset} has {data.num_labels} classes but the model predicts {model.config.num_labels}: "
            "evaluate on the dataset the model was trained for (see its model card)."
        )
    model_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    check_class_names(model_names, data.label_names, model=args.model, dataset=data_args.dataset)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_eval_batch_size=args.batch_size,
            use_cpu=args.use_cpu,
            dataloader_pin_memory=not args.use_cpu and torch.accelerator.is_available(),
            bf16=args.bf16,
            report_to="none",
            remove_unused_columns=False,
        )
        trainer = ImageBatchTrainer(
            model=model,
            args=training_args,
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=top_k_predictions,
            # Normalisation only: the processor's own mean and std.
            augmentation=BatchAugmentation(processor.image_mean, processor.image_std),
        )
        split = data.test if args.split == "test" else data.train
        metrics = trainer.evaluate(split, metric_key_prefix=args.split)
    if trainer.is_world_process_zero():
        name = data.test_split if args.split == "test" else "train"
        print(f"{args.model} on {data.name} ({name} split, {len(split)} images):")
        for key in ("accuracy", "top5_accuracy", "loss"):
            print(f"  {key:14s} {metrics[f'{args.split}_{key}']:.4f}")
        if args.output_file:
            with open(args.output_file, "w") as file:
                json.dump(metrics, file, indent=2)
    return 0


def check_model_location(model: str) -> None:
    """Refuses a local path without a model before `from_pretrained` takes it for a Hub id (and retries the Hub)."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(
                f"{model!r} holds no config.json: pass the folder scripts/train.py wrote (its --output_dir) or a "
                "Hub id 'owner/name'."
            )
        return
    try:
        validate_repo_id(model)
        is_hub_id = not model.startswith((".", "~")) and not os.path.isdir(model.split("/")[0])
    except HFValidationError:
        is_hub_id = False
    if not is_hub_id:
        raise ValueError(
            f"No model folder at {model!r} ({os.path.abspath(os.path.expanduser(model))}): pass an existing folder "
            "written by scripts/train.py or a Hub id 'owner/name'."
        )


def check_class_names(model_names: list[str], dataset_names: list[str], *, model: str, dataset: str) -> None:
    """Refuses a dataset whose classes are named differently from the model's (generic LABEL_i names pass).

    Names are compared by their letters and digits only: "T-shirt/top" and "T - shirt / top" are the same class.
    """

    def key(name: str) -> str:
        return re.sub(r"[^0-9a-z]", "", str(name).lower())

    generic = [f"LABEL_{i}" for i in range(len(model_names))]
    if model_names == generic or list(map(key, model_names)) == list(map(key, dataset_names)):
        return
    index = next(i for i, (ours, theirs) in enumerate(zip(model_names, dataset_names)) if key(ours) != key(theirs))
    raise ValueError(
        f"Class {index} of {model} is {model_names[index]!r} but {dataset_names[index]!r} in {dataset}: the "
        "model was trained on other classes or another label order. Evaluate on the dataset the model was trained for "
        "(see its model card)."
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
