#!/usr/bin/env python
"""Train a WideResNet or PyramidNet (or any Hub image classifier) with AACE-SAM and publish it.

Runs unchanged as `python scripts/train.py ...`, `accelerate launch scripts/train.py ...` and
`accelerate launch --multi_gpu ...`. Arguments come from flags or from one JSON file (`scripts/train.py run.json`).

    python scripts/train.py --dataset cifar10 --model wide_resnet --recipe paper --output_dir outputs/wrn-cifar10
"""

import json
import logging
import math
import os
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

import transformers
from transformers import AutoModelForImageClassification, HfArgumentParser, set_seed

from hf_aace import (
    AACETrainer,
    AACETrainingArguments,
    PyramidNetConfig,
    PyramidNetForImageClassification,
    WideResNetConfig,
    WideResNetForImageClassification,
)
from hf_aace.checkpoints import (
    LogAtCheckpointsCallback,
    check_checkpoint,
    find_resumable_checkpoint,
    mean_training_loss,
)
from hf_aace.data import (
    ImageClassificationSplit,
    augmentation_for,
    load_image_classification_dataset,
    symmetric_label_noise,
)
from hf_aace.divergence import TrainingDivergedError
from hf_aace.metrics import compute_metrics, top_k_predictions
from hf_aace.plotting import plot_training_curves

logger = logging.getLogger(__name__)

ARCHITECTURES = {
    "wide_resnet": (WideResNetConfig, WideResNetForImageClassification, ("depth", "widen_factor", "dropout_rate")),
    "pyramidnet": (PyramidNetConfig, PyramidNetForImageClassification, ("depth", "alpha", "bottleneck")),
}


@dataclass
class ModelArguments:
    model: str = field(
        default="wide_resnet",
        metadata={"help": "'wide_resnet', 'pyramidnet', or a local path / Hub id of a checkpoint to fine-tune."},
    )
    depth: int | None = field(default=None, metadata={"help": "Depth (WideResNet 6n+4; PyramidNet 6n+2 or 9n+2)."})
    widen_factor: int | None = field(default=None, metadata={"help": "WideResNet width multiplier k."})
    alpha: int | None = field(default=None, metadata={"help": "PyramidNet widening alpha."})
    bottleneck: bool | None = field(default=None, metadata={"help": "PyramidNet bottleneck units."})
    dropout_rate: float | None = field(default=None, metadata={"help": "WideResNet dropout between convolutions."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code of a Hub checkpoint."})


@dataclass
class DataArguments:
    dataset: str = field(
        default="digits",
        metadata={"help": "cifar10, cifar100, fashion_mnist, food101, digits, a Hub dataset id or a local directory."},
    )
    dataset_source: str | None = field(
        default=None, metadata={"help": "Load a preset's files from this local directory or Hub id instead."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column of a non-preset dataset."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of a non-preset dataset."})
    image_size: int | None = field(default=None, metadata={"help": "Resize images to this size (Food101: 32)."})
    pad_to_square: bool | None = field(
        default=None,
        metadata={"help": "Pad images to a centred square before resizing, keeping their aspect (Food101: true)."},
    )
    coarse_labels: bool = field(default=False, metadata={"help": "CIFAR-100: train on the 20 superclasses."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of decoded datasets."})
    augment: bool = field(
        default=True, metadata={"help": "Apply the dataset's training augmentation (false: normalise only)."}
    )
    crop_padding: int | None = field(default=None, metadata={"help": "Random-crop zero padding (0: off)."})
    flip: bool | None = field(default=None, metadata={"help": "Random horizontal flips."})
    cutout_size: int | None = field(default=None, metadata={"help": "Cutout square size (0: off)."})
    eval_train_split: bool = field(
        default=True, metadata={"help": "Also measure accuracy and loss on the whole training split at the end."}
    )
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Symmetric label noise: replace exactly round(P x N) training labels by a different class drawn "
            "uniformly (test labels stay clean)."
        },
    )
    label_noise_seed: int | None = field(
        default=None, metadata={"help": "Seed choosing the noisy labels (default: --seed)."}
    )


@dataclass
class RecipeArguments:
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "'paper': the paper's settings for the chosen model; explicit flags still win.",
            "choices": ["paper"],
        },
    )

    def __post_init__(self):
        # A JSON config bypasses argparse's choices.
        if self.recipe not in (None, "paper"):
            raise ValueError(f"recipe must be 'paper' or left out, got {self.recipe!r}.")


# Defaults of this script where they differ from the Trainer's; every flag overrides them.
SCRIPT_DEFAULTS = {
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_strategy": "steps",
    "logging_steps": 20,
    "report_to": ["tensorboard"],
    "remove_unused_columns": False,
    "ddp_find_unused_parameters": False,  # every parameter of these CNNs gets a gradient
    "channels_last": True,  # faster convolutions on CPUs (oneDNN) and GPUs (bench/RESULTS.md)
}


def paper_recipe(model: str, world_size: int) -> dict:
    """The paper's training settings (PAPER.md); the global batch is split over the processes."""
    if model == "pyramidnet":
        architecture, batch = {"depth": 272, "alpha": 200, "bottleneck": False}, 64
    elif model == "wide_resnet":
        architecture, batch = {"depth": 28, "widen_factor": 10, "dropout_rate": 0.0}, 256
    else:
        raise ValueError(f"--recipe paper needs --model wide_resnet or pyramidnet, got {model!r}.")
    if batch % world_size:
        raise ValueError(f"--recipe paper uses a global batch of {batch}, which {world_size} processes cannot split.")
    return {
        **architecture,
        "per_device_train_batch_size": batch // world_size,
        "num_train_epochs": 200,
        "learning_rate": 0.1,
        "optim": "sgd",
        "optim_args": "momentum=0.9",
        "weight_decay": 5e-4,
        "weight_decay_all_parameters": True,
        "lr_milestones": [0.3, 0.6, 0.8],
        "lr_gamma": 0.2,
        "warmup_steps": 0,
        "max_grad_norm": 0.0,
        "label_smoothing_factor": 0.0,
        "seed": 42,
        "sam_method": "aace",
    }


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, RecipeArguments, AACETrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, AACETrainingArguments))
    parser.set_defaults(**SCRIPT_DEFAULTS)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as file:
            values = json.load(file)
        if values.get("recipe") == "paper":
            values = {
                **paper_recipe(values.get("model", "wide_resnet"), int(os.environ.get("WORLD_SIZE", 1))),
                **values,
            }
        return parser.parse_dict({**SCRIPT_DEFAULTS, **values})
    # Read --model and --recipe first, without building TrainingArguments (that sets up the distributed state).
    model_args, recipe_args, _ = HfArgumentParser((ModelArguments, RecipeArguments)).parse_args_into_dataclasses(
        argv, return_remaining_strings=True
    )
    if recipe_args.recipe == "paper":
        # Recipe values become defaults, so flags given on the command line still override them.
        parser.set_defaults(**paper_recipe(model_args.model, int(os.environ.get("WORLD_SIZE", 1))))
    return parser.parse_args_into_dataclasses(argv)


def build_model(model_args: ModelArguments, data):
    labels = {"num_labels": data.num_labels, "id2label": data.id2label, "label2id": data.label2id}
    if model_args.model in ARCHITECTURES:
        config_class, model_class, names = ARCHITECTURES[model_args.model]
        options = {name: getattr(model_args, name) for name in names if getattr(model_args, name) is not None}
        return model_class(config_class(num_channels=data.num_channels, **options, **labels))
    return AutoModelForImageClassification.from_pretrained(
        model_args.model, trust_remote_code=model_args.trust_remote_code, ignore_mismatched_sizes=True, **labels
    )


def main(argv: list[str]) -> int:
    model_args, data_args, recipe_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # This script reports its progress on the main process; transformers follows --log_level.
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.info(f"Training arguments: {training_args}")

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    else:
        checkpoint, skipped = find_resumable_checkpoint(training_args.output_dir)
        for path, problem in skipped:
            logger.warning(f"Not resuming from {path}: {problem}. The folder is left as it is.")
        if checkpoint is not None:
            logger.info(f"Resuming from {checkpoint}; pass another --output_dir to start afresh.")
        elif skipped:
            logger.warning(f"No complete checkpoint in {training_args.output_dir}: training starts from scratch.")

    set_seed(training_args.seed)
    with training_args.main_process_first(desc="decoding the dataset"):
        data = load_image_classification_dataset(
            data_args.dataset,
            source=data_args.dataset_source,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            image_size=data_args.image_size,
            pad_to_square=data_args.pad_to_square,
            coarse_labels=data_args.coarse_labels,
            cache_dir=data_args.cache_dir,
        )
    logger.info(
        f"{data.name}: {len(data.train)} train / {len(data.test)} {data.test_split} images, {data.num_labels} classes"
    )
    noise_seed = training_args.seed if data_args.label_noise_seed is None else data_args.label_noise_seed
    noisy_labels, corrupted = symmetric_label_noise(
        data.train.labels, data.num_labels, data_args.label_noise, noise_seed
    )
    # A new split rather than edited labels: the loaded dataset keeps the clean ones.
    data = replace(data, train=ImageClassificationSplit(data.train.images, noisy_labels))
    label_noise = {"rate": len(corrupted) / len(data.train), "corrupted": len(corrupted), "seed": noise_seed}
    if len(corrupted):
        logger.info(f"Label noise: {len(corrupted)} of {len(data.train)} training labels replaced (seed {noise_seed})")

    model = build_model(model_args, data)
    # Batches arrive as uint8; the augmentation also normalises them (with every switch off under --augment false).
    overrides = {"crop_padding": 0, "flip": False, "cutout_size": 0} if not data_args.augment else {}
    for name in ("crop_padding", "flip", "cutout_size"):
        if data_args.augment and getattr(data_args, name) is not None:
            overrides[name] = getattr(data_args, name)
    augmentation = augmentation_for(data, seed=training_args.seed, **overrides)
    logger.info(f"Augmentation: {augmentation}")

    # The push happens once everything is saved, so a failed upload cannot cost the trained model.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub and training_args.process_index == 0:
        warn_if_hub_unreachable(training_args.hub_token)

    trainer = AACETrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.test,
        processing_class=data.image_processor(),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=top_k_predictions,
        augmentation=augmentation,
        callbacks=[LogAtCheckpointsCallback()],
    )
    try:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
    except TrainingDivergedError as error:
        if trainer.is_world_process_zero():
            last, _ = find_resumable_checkpoint(training_args.output_dir)
            kept = f"the last checkpoint, {last}, holds finite weights" if last else "no checkpoint was written"
            print(f"{error}\nNo final model was saved or pushed; {kept}.", file=sys.stderr)
        return 2
    # The Trainer's train_loss covers only the steps of this call (0.0 when resuming the final checkpoint); the log
    # history covers the whole run. The summary entry the Trainer just logged gets the same value.
    train_loss = mean_training_loss(trainer.state.log_history)
    train_result.metrics["train_loss"] = trainer.state.log_history[-1]["train_loss"] = train_loss
    trainer.save_model()
    train_result.metrics["train_label_noise_rate"] = label_noise["rate"]
    train_metrics = finite_or_none(train_result.metrics)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()

    test_metrics = finite_or_none(trainer.evaluate(metric_key_prefix="test"))
    trainer.log_metrics("test", test_metrics)
    trainer.save_metrics("test", test_metrics)
    if data_args.eval_train_split:
        train_eval_metrics = finite_or_none(trainer.evaluate(data.train, metric_key_prefix="train_eval"))
        trainer.log_metrics("train_eval", train_eval_metrics)
        trainer.save_metrics("train_eval", train_eval_metrics)

    run_arguments = {
        "model": asdict(model_args),
        "data": asdict(data_args),
        "recipe": recipe_args.recipe,
        "label_noise": label_noise,
        "training": training_args.to_dict(),
    }
    card_arguments = {**run_arguments, "training": changed_training_arguments(training_args)}
    card_options = {"dataset_id": data.dataset_id, "dataset_name": data.name, "test_split": data.test_split}
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "run_arguments.json"), "w") as file:
            json.dump(run_arguments, file, indent=2, sort_keys=True, default=str)
        plot_training_curves(trainer.state.log_history, os.path.join(training_args.output_dir, "plots"))
        trainer.create_model_card(run_arguments=card_arguments, **card_options)
        print(f"Test accuracy: {test_metrics['test_accuracy']:.4f} ({data.test_split} split, {len(data.test)} images)")
        print(f"Model, image processor, card, metrics and plots are in {training_args.output_dir}")

    if push_to_hub:
        training_args.push_to_hub = True
        try:
            trainer.push_to_hub(commit_message="hf_aace training run", run_arguments=card_arguments, **card_options)
        except Exception as error:  # noqa: BLE001 - any failure must leave the saved run intact and explained
            if trainer.is_world_process_zero():
                repo = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
                print(
                    f"Push to the Hub failed: {type(error).__name__}: {error}\n"
                    f"Nothing is lost: the trained model and its card are in {training_args.output_dir}.\n"
                    f"Check your network and token (`hf auth login`), then upload them with:\n"
                    f"  hf upload {repo} {training_args.output_dir} . --exclude 'checkpoint-*'",
                    file=sys.stderr,
                )
            return 1
        if trainer.is_world_process_zero():
            print(f"Pushed to {trainer.hub_model_id}")
    return 0


def finite_or_none(metrics: dict) -> dict:
    """NaN and infinities become None (JSON null): the metrics files stay valid JSON and show no made-up number."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in metrics.items()
    }


def changed_training_arguments(training_args: AACETrainingArguments) -> dict:
    """The training arguments that differ from their declared defaults, plus every AACE setting (for the card)."""
    # Field defaults, not a second TrainingArguments instance: building one would touch the distributed state.
    defaults = {f.name: f.default for f in fields(AACETrainingArguments) if f.default is not MISSING}
    aace = {"sam_method", "rho", "normalize_perturbation", "aace_threshold", "aace_mode"}
    derived = {"accelerator_config", "debug", "hub_token", "dataloader_pin_memory", "activation_checkpointing"}
    return {
        key: value
        for key, value in training_args.to_dict().items()
        if key in aace
        or (key in defaults and key not in derived and value != getattr(defaults[key], "value", defaults[key]))
    }


def warn_if_hub_unreachable(token: str | None) -> None:
    """Says before training, not after it, when the Hub or the token looks unusable."""
    from huggingface_hub import HfApi

    try:
        HfApi().whoami(token=token)
    except Exception as error:  # noqa: BLE001 - a warning only; the push at the end reports precisely
        logger.warning(
            f"--push_to_hub: the Hub does not accept this token now ({type(error).__name__}: {error}). Training goes "
            "on and the results stay on disk; log in with `hf auth login` or set HF_TOKEN before the run ends."
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
