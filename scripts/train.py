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
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any

import transformers
from transformers import AutoModelForImageClassification, HfArgumentParser, set_seed

from hf_aace import AACETrainer, AACETrainingArguments
from hf_aace.checkpoints import (
    LogAtCheckpointsCallback,
    check_checkpoint,
    find_resumable_checkpoint,
    mean_training_loss,
)
from hf_aace.data import (
    DatasetArguments,
    augmentation_for,
    symmetric_label_noise,
)
from hf_aace.divergence import TrainingDivergedError
from hf_aace.metrics import compute_metrics, top_k_predictions
from hf_aace.models.architectures import ARCHITECTURES, PAPER_TRAINING, resolve_model
from hf_aace.plotting import plot_training_curves
from hf_aace.sharding import end_process_group
from hf_aace.training_args import SHARPNESS_AWARE_FIELDS

logger = logging.getLogger(__name__)

_NAMED_SIZES = ", ".join(name for architecture in ARCHITECTURES.values() for name in architecture.variants)


def _size_fields() -> list[tuple[str, Any, Any]]:
    """One optional flag per size keyword of the architecture table, typed as the config's signature types it."""
    helps: dict[str, list[str]] = {}
    types: dict[str, Any] = {}
    for architecture in ARCHITECTURES.values():
        hints = typing.get_type_hints(architecture.config_class.__init__)
        for name, text in architecture.cli_fields.items():
            helps.setdefault(name, []).append(text)
            types[name] = hints[name]
    return [
        (name, types[name] | None, field(default=None, metadata={"help": "; ".join(texts) + "."}))
        for name, texts in helps.items()
    ]


# The size flags come from the architecture table, so that a new architecture needs no edit here.
ModelArguments = make_dataclass(
    "ModelArguments",
    [
        (
            "model",
            str,
            field(
                default="wide_resnet",
                metadata={
                    "help": f"An architecture to train from scratch: {' or '.join(ARCHITECTURES)} (sizes from the "
                    f"flags below), a named size ({_NAMED_SIZES}), wrn-DEPTH-WIDEN or "
                    "pyramidnet-DEPTH-ALPHA[-bottleneck]; or a local path or Hub id of a checkpoint to fine-tune."
                },
            ),
        ),
        *_size_fields(),
        ("trust_remote_code", bool, field(default=False, metadata={"help": "Allow remote code of a Hub checkpoint."})),
    ],
)


@dataclass
class DataArguments(DatasetArguments):
    image_size: int | None = field(default=None, metadata={"help": "Resize images to this size (Food101: 32)."})
    pad_to_square: bool | None = field(
        default=None,
        metadata={"help": "Pad images to a centred square before resizing, keeping their aspect (Food101: true)."},
    )
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

_PAPER_TRAINING_TEXT = ", ".join(f"{key} {value}" for key, value in PAPER_TRAINING.items())
DESCRIPTION = (
    "Train an image classifier with AACE (or SAM, ASAM, SGD) and publish it. Without --recipe, an architecture "
    f"trained from scratch (--model {' / '.join(ARCHITECTURES)} or a short name) defaults to the paper's optimizer "
    f"and schedule: {_PAPER_TRAINING_TEXT}; epochs and batch size are yours. Fine-tuning a checkpoint (--model PATH "
    "or Hub id) keeps the Trainer's defaults. Any flag given wins over both."
)


def paper_recipe(model: str, world_size: int) -> dict:
    """The paper's training settings for `model`; the global batch is split over the processes."""
    resolved = resolve_model(model)
    if resolved is None:
        raise ValueError(
            f"--recipe paper needs --model {' or '.join(ARCHITECTURES)} (or a short name such as wrn-28-10), got "
            f"{model!r}."
        )
    architecture, size = resolved
    batch = architecture.paper_batch_size
    if batch % world_size:
        raise ValueError(f"--recipe paper uses a global batch of {batch}, which {world_size} processes cannot split.")
    return {
        **architecture.paper_config,
        **size,
        **PAPER_TRAINING,
        "per_device_train_batch_size": batch // world_size,
        "num_train_epochs": 200,
        "label_smoothing_factor": 0.0,
        "seed": 42,
        "sam_method": "aace",
    }


def model_defaults(model: str, recipe: str | None, world_size: int) -> dict:
    """Defaults that follow from the model and recipe: the recipe's, else from-scratch training's, else none."""
    if recipe == "paper":
        return paper_recipe(model, world_size)
    resolved = resolve_model(model)
    if resolved is None:
        return {}  # fine-tuning a checkpoint: the Trainer's defaults
    return {**PAPER_TRAINING, **resolved[1]}


def parse_arguments(argv: list[str]) -> tuple[Any, DataArguments, RecipeArguments, AACETrainingArguments]:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, RecipeArguments, AACETrainingArguments), description=DESCRIPTION
    )
    parser.set_defaults(**SCRIPT_DEFAULTS)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as file:
            values = json.load(file)
        defaults = model_defaults(values.get("model", ModelArguments.model), values.get("recipe"), world_size)
        arguments = parser.parse_dict({**SCRIPT_DEFAULTS, **defaults, **values})
    else:
        # Read --model and --recipe first, without building TrainingArguments (that sets up the distributed state);
        # their defaults then yield to every flag given on the command line.
        model_args, recipe_args, _ = HfArgumentParser(
            (ModelArguments, RecipeArguments), add_help=False
        ).parse_args_into_dataclasses(argv, return_remaining_strings=True)
        parser.set_defaults(**model_defaults(model_args.model, recipe_args.recipe, world_size))
        arguments = parser.parse_args_into_dataclasses(argv)
    check_model_size(arguments[0])
    return arguments


def check_model_size(model_args) -> None:
    """Refuses size flags that contradict a short model name (`--model wrn-28-10 --depth 16`)."""
    resolved = resolve_model(model_args.model)
    if resolved is None:
        return
    architecture, size = resolved
    for name, value in size.items():
        if getattr(model_args, name) != value:
            raise ValueError(
                f"--model {model_args.model} means {name} {value}, but --{name} is {getattr(model_args, name)}: drop "
                f"--{name}, or pass --model {architecture.name} with the size flags you want."
            )


def build_model(model_args, data):
    labels = {"num_labels": data.num_labels, "id2label": data.id2label, "label2id": data.label2id}
    resolved = resolve_model(model_args.model)
    if resolved is not None:
        architecture = resolved[0]
        options = {name: getattr(model_args, name) for name in architecture.cli_fields}
        options = {name: value for name, value in options.items() if value is not None}
        return architecture.model_class(architecture.config_class(num_channels=data.num_channels, **options, **labels))
    return AutoModelForImageClassification.from_pretrained(
        model_args.model, trust_remote_code=model_args.trust_remote_code, ignore_mismatched_sizes=True, **labels
    )


def log_training_defaults(model_args, recipe_args: RecipeArguments, training_args) -> None:
    """Says which optimizer and schedule defaults this run took, and which of them flags replaced."""
    if recipe_args.recipe == "paper":
        logger.info("--recipe paper: the paper's settings apply where no flag replaced them.")
    elif resolve_model(model_args.model) is None:
        logger.info(f"Fine-tuning {model_args.model}: the Trainer's optimizer and schedule defaults apply.")
    else:
        replaced = [key for key, value in PAPER_TRAINING.items() if getattr(training_args, key) != value]
        logger.info(
            f"Training {model_args.model} from scratch: the paper's optimizer and schedule are the defaults "
            f"({_PAPER_TRAINING_TEXT})" + (f"; replaced by flags: {', '.join(replaced)}." if replaced else ".")
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

    log_training_defaults(model_args, recipe_args, training_args)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="decoding the dataset"):
        data = data_args.load(
            show_progress=training_args.local_process_index == 0 and not training_args.disable_tqdm,
            image_size=data_args.image_size,
            pad_to_square=data_args.pad_to_square,
            seed=training_args.seed,
        )
    logger.info(
        f"{data.name}: {len(data.train)} train / {len(data.test)} {data.test_split} images, {data.num_labels} classes"
    )
    noise_seed = training_args.seed if data_args.label_noise_seed is None else data_args.label_noise_seed
    noisy_labels, corrupted = symmetric_label_noise(
        data.train.labels, data.num_labels, data_args.label_noise, noise_seed
    )
    # A new split rather than edited labels: the loaded dataset keeps the clean ones.
    data = replace(data, train=data.train.with_labels(noisy_labels))
    label_noise = {"rate": len(corrupted) / len(data.train), "corrupted": len(corrupted), "seed": noise_seed}
    if len(corrupted):
        logger.info(f"Label noise: {len(corrupted)} of {len(data.train)} training labels replaced (seed {noise_seed})")

    model = build_model(model_args, data)
    # Batches arrive as uint8; the augmentation also normalises them (with every switch off under --augment false, and
    # by default under --random_resized_crop, whose crops and flips happen in the DataLoader workers).
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
        # The training items' random crops and flips would make this an evaluation on augmented images.
        train_split = data.train.for_evaluation()
        train_eval_metrics = finite_or_none(trainer.evaluate(train_split, metric_key_prefix="train_eval"))
        trainer.log_metrics("train_eval", train_eval_metrics)
        trainer.save_metrics("train_eval", train_eval_metrics)

    run_arguments = {
        "model": asdict(model_args),
        "data": asdict(data_args),
        "recipe": recipe_args.recipe,
        "label_noise": label_noise,
        "training": {**training_args.to_dict(), **trainer.resolved_sharpness_aware()},
    }
    card_arguments = {
        **run_arguments,
        "training": {**changed_training_arguments(training_args), **trainer.resolved_sharpness_aware()},
    }
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
    aace = set(SHARPNESS_AWARE_FIELDS)
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
    exit_code = main(sys.argv[1:])
    end_process_group()  # only after a run that ended: on an error the launcher stops the other processes
    sys.exit(exit_code)
