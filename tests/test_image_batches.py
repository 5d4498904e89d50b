"""Tests of hf_aace.image_batches: uint8 image batches in any Trainer (evaluation, plain training, checkpoints)."""

import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from hf_aace import AACETrainer, AACETrainingArguments
from hf_aace.data import BatchAugmentation, ImageClassificationSplit
from hf_aace.image_batches import AUGMENTATION_STATE_NAME, ImageBatchTrainer

from test_trainer import assert_state_close, tiny_wrn

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def uint8_split(n: int = 12, seed: int = 0) -> ImageClassificationSplit:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return ImageClassificationSplit(images, torch.randint(0, 3, (n,), generator=generator))


def plain_args(tmp_path, arguments_class=TrainingArguments, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), per_device_eval_batch_size=5, per_device_train_batch_size=4, use_cpu=True,
        report_to="none", disable_tqdm=True, remove_unused_columns=False, save_strategy="no", seed=3,
    )  # fmt: skip
    return arguments_class(**{**settings, **overrides})


class CountingAugmentation(BatchAugmentation):
    """A BatchAugmentation that records the batches it augments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images.clone())
        return super().__call__(images)


def test_evaluation_normalises_uint8_batches_and_leaves_float_batches_alone(tmp_path):
    model, split = tiny_wrn().eval(), uint8_split()
    trainer = ImageBatchTrainer(model=model, args=plain_args(tmp_path), augmentation=BatchAugmentation(MEAN, STD))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    normalised = (split.images.float() / 255 - mean) / std
    with torch.no_grad():
        expected = F.cross_entropy(model(normalised).logits, split.labels).item()
    assert trainer.evaluate(split)["eval_loss"] == pytest.approx(expected, rel=1e-5)

    # Batches that are already floats (a processor's output) reach the model unchanged.
    floats = torch.utils.data.StackDataset(pixel_values=normalised, labels=split.labels)
    assert trainer.evaluate(floats)["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("trainer_class", [ImageBatchTrainer, AACETrainer])
def test_training_augments_each_micro_batch_once_from_the_seeded_stream(tmp_path, trainer_class):
    augmentation = CountingAugmentation(MEAN, STD, crop_padding=1, flip=True, cutout_size=2, seed=99)
    # AACETrainer's two passes per micro-batch see one augmentation.
    arguments_class = AACETrainingArguments if trainer_class is AACETrainer else TrainingArguments
    args = plain_args(
        tmp_path, arguments_class, max_steps=2, gradient_accumulation_steps=2, learning_rate=0.01, optim="sgd"
    )
    # Model and arguments given by position, as Trainer(model, args, ...) takes them.
    trainer = trainer_class(tiny_wrn(), args, train_dataset=uint8_split(16), augmentation=augmentation)
    assert augmentation.seed == args.seed + args.process_index  # seeded by the trainer, not by its constructor
    trainer.train()
    assert len(augmentation.batches) == 4 and all(batch.dtype == torch.uint8 for batch in augmentation.batches)

    # The same batches through a fresh augmentation seeded alike give the same draws: one call per micro-batch.
    replay = BatchAugmentation(MEAN, STD, crop_padding=1, flip=True, cutout_size=2, seed=args.seed)
    for batch in augmentation.batches:
        replay(batch)
    states, replayed = augmentation.state_dict()["generator_states"], replay.state_dict()["generator_states"]
    assert states.keys() == replayed.keys() and all(torch.equal(states[key], replayed[key]) for key in states)


def test_channels_last_follows_the_arguments(tmp_path):
    plain = ImageBatchTrainer(model=tiny_wrn(), args=plain_args(tmp_path / "a"))
    assert not plain.channels_last
    assert plain.model.wide_resnet.embedder.weight.is_contiguous()

    args = AACETrainingArguments(output_dir=str(tmp_path / "b"), use_cpu=True, report_to="none", channels_last=True)
    trainer = ImageBatchTrainer(model=tiny_wrn(), args=args, augmentation=BatchAugmentation(MEAN, STD))
    assert trainer.channels_last
    assert trainer.model.wide_resnet.embedder.weight.is_contiguous(memory_format=torch.channels_last)
    batch = trainer.prepare_image_batch({"pixel_values": uint8_split(4).images, "labels": torch.zeros(4).long()})
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)


class Tampered:
    """An arbitrary object: loading it would run code from the checkpoint."""


def test_prediction_step_passes_the_trainers_options_on(tmp_path):
    model = tiny_wrn()
    model.config.output_hidden_states = True  # outputs beside the logits, for ignore_keys to drop
    trainer = ImageBatchTrainer(model=model, args=plain_args(tmp_path), augmentation=BatchAugmentation(MEAN, STD))
    inputs = {"pixel_values": uint8_split(4).images, "labels": torch.zeros(4).long()}
    loss, logits, labels = trainer.prediction_step(trainer.model, dict(inputs), prediction_loss_only=True)
    assert loss is not None and logits is None and labels is None
    _, logits, _ = trainer.prediction_step(trainer.model, dict(inputs), False, ignore_keys=["hidden_states"])
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 3)
    _, outputs, _ = trainer.prediction_step(trainer.model, dict(inputs), False)
    assert isinstance(outputs, tuple) and torch.equal(outputs[0], logits)


def test_augmentation_stream_is_saved_and_restored_with_checkpoints(tmp_path, caplog):
    def trainer_with(seed: int) -> ImageBatchTrainer:
        augmentation = BatchAugmentation(MEAN, STD, crop_padding=1, flip=True, cutout_size=2)
        return ImageBatchTrainer(model=tiny_wrn(), args=plain_args(tmp_path, seed=seed), augmentation=augmentation)

    saved = trainer_with(seed=1)
    saved.augmentation(uint8_split(4).images)  # advance the stream past its seed
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    saved._save_rng_state(str(checkpoint))
    assert (checkpoint / AUGMENTATION_STATE_NAME.format(0)).is_file()

    after_saving = torch.rand(3)  # the Trainer's own random state is saved beside the augmentation's

    restored = trainer_with(seed=2)
    restored._load_rng_state(str(checkpoint))
    assert torch.equal(torch.rand(3), after_saving)
    batch = uint8_split(4, seed=5).images
    assert torch.equal(restored.augmentation(batch), saved.augmentation(batch))

    # A trainer without augmentation resumes from the same checkpoint and ignores the augmentation's state.
    ImageBatchTrainer(model=tiny_wrn(), args=plain_args(tmp_path))._load_rng_state(str(checkpoint))
    # The state is loaded as tensors only: a file that holds other objects is refused, not unpickled.
    state = saved.augmentation.state_dict()
    torch.save({**state, "extra": Tampered()}, checkpoint / AUGMENTATION_STATE_NAME.format(0))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer_with(seed=2)._load_rng_state(str(checkpoint))

    (checkpoint / AUGMENTATION_STATE_NAME.format(0)).unlink()
    with caplog.at_level(logging.WARNING, logger="hf_aace"):
        trainer_with(seed=2)._load_rng_state(str(checkpoint))
    assert "the augmentation stream restarts from its seed" in caplog.text


def test_plain_training_step_is_the_trainers_with_uneven_accumulated_batches(tmp_path):
    # ViT normalises its loss by the items of the whole accumulated step; micro-batches of 4 and 2 tell that apart
    # from a mean per micro-batch.
    from transformers import Trainer

    from test_tasks import build

    models = []
    for cls in (Trainer, ImageBatchTrainer):
        model, dataset = build("vit", n=6)
        args = plain_args(
            tmp_path / cls.__name__, max_steps=1, gradient_accumulation_steps=2, learning_rate=0.1, optim="sgd"
        )
        cls(model=model, args=args, train_dataset=dataset).train()
        models.append(model)
    assert_state_close(models[1], models[0], tolerance=0)
