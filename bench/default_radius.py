"""Which default perturbation radius lets `--sam_method aace` train a ViT and a BERT as well as SAM does, and what
the paper's setting (rho 0.2, unnormalised: e = -rho g) does to hf_aace's own BatchNorm CNN, side by side in one run.

Every configuration trains a fresh random-init model through `AACETrainer.train()` on the same data, in the same
order, from the same initial weights (one seed per repeat, shared by every configuration), on the CPU and offline.

Models (tasks small enough to learn in `--steps` steps):

- `vit`: ViTForImageClassification (32x32 images, patch 8 (`--vit_patch`), hidden 64, 2 layers, 2 heads, MLP 128, no
  dropout) on scikit-learn's bundled digits (the split of hf_aace's `digits` preset: stratified 80/20, random_state 0)
  upscaled bilinearly to 32x32, grey replicated to 3 channels, normalised with the training split's mean and std;
  classes 0,1,2 by default (`--vit_classes`). AdamW as transformers' image-classification example trains (the
  Trainer's defaults: linear decay, no warmup, weight decay 0, clipping at 1.0) at `--vit_lr`.
- `bert`: BertForSequenceClassification (vocabulary 64, 16 tokens, hidden 64, 2 layers, 2 heads, MLP 128, no dropout)
  on a synthetic 3-class task: filler tokens plus 1..6 copies each of tokens A, B and C with a unique largest count;
  the label is the most frequent of the three. AdamW at `--bert_lr`, otherwise as for ViT.
- `wrn`: hf_aace's WideResNetForImageClassification WRN-10-1 (BatchNorm) on the same digits at 8x8x1 as hf_aace's
  `digits` preset prepares them (what `make demo` trains on), all 10 classes,
  with the paper's optimizer (SGD 0.1, momentum 0.9, weight decay 5e-4 on every parameter, no clipping, constant
  rate over these few steps, no augmentation): the control, where rho 0.2 unnormalised is the paper's setting.

Configurations (`--configs`):

- `sgd`: plain step; `sam`: SAM with its defaults (rho 0.05, normalised);
- `aace-default`: aace with no radius given (hf_aace's default for the model: rho 0.05 normalised, and the paper's
  0.2 unnormalised on hf_aace's own architectures);
- `aace-0.2`: the paper's setting (rho 0.2, unnormalised), hf_aace's default before it depended on the model;
  `aace-0.02`: rho 0.02, unnormalised;
- `aace-n0.05`, `aace-n0.1`: aace normalised (e = -rho g / ||g||) with rho 0.05 and 0.1;
- `aace-rel0.01`, `aace-rel0.003`: a radius relative to the weights, normalised: e = -r ||w|| g / ||g|| (so
  ||e|| / ||w|| = r at every step, whatever the model's parameterisation);
- `aace-cap0.005`: the paper's e = -0.2 g, its norm capped at 0.005 ||w|| (equal to the paper's step wherever that is
  already smaller than 0.5% of the weights).

The `rel` and `cap` rules are not options of hf_aace: this script installs them for its own runs by wrapping
`hf_aace.perturbation.perturbation_from_gradients_` (which receives the parameters the perturbation is added to) in
every hf_aace module that imported it, and restores it afterwards. ||w|| is the global L2 norm of the parameters that
receive a gradient.

Recorded per configuration (mean and min-max over the seeds): training `clean_loss` and `clean_accuracy` as
AACETrainer logs them (the loss and accuracy at w in the first pass; `sgd` has no first pass, so its values are the
loss and accuracy of the same forward pass, recorded by this script), averaged over the last `--tail` steps; held-out
accuracy at the end (eval mode); ||e|| / ||w|| at the first step and averaged over all steps, with `perturbation_norm`
as the trainer logs it every step and ||w|| measured by a callback at the start of the step.

Usage:
    HF_HUB_OFFLINE=1 python bench/default_radius.py --threads 1 [--models vit bert wrn] [--seeds 0 1 2]
        [--steps 100] [--batch_size 32] [--configs sgd sam aace-0.2 ...] [--vit_lr 1e-3] [--bert_lr 1e-3]
        [--output_json PATH] [--output_md PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.trainer_callback import PrinterCallback

import hf_aace.perturbation
from hf_aace import AACETrainer, AACETrainingArguments, WideResNetConfig, WideResNetForImageClassification
from hf_aace.perturbation import global_norm

from common import run_and_report

# ---- Configurations ----

# name -> (sam_method, rho, normalize_perturbation, rule); rule: None, ("rel", r) or ("cap", c)
CONFIGS: dict[str, tuple[str, float | None, bool | None, tuple[str, float] | None]] = {
    "sgd": ("sgd", None, None, None),
    "sam": ("sam", None, None, None),
    "aace-default": ("aace", None, None, None),
    "aace-0.2": ("aace", 0.2, False, None),
    "aace-0.02": ("aace", 0.02, False, None),
    "aace-n0.05": ("aace", 0.05, True, None),
    "aace-n0.1": ("aace", 0.1, True, None),
    "aace-rel0.01": ("aace", 1.0, True, ("rel", 0.01)),
    "aace-rel0.003": ("aace", 1.0, True, ("rel", 0.003)),
    "aace-cap0.005": ("aace", 0.2, False, ("cap", 0.005)),
}
DEFAULT_CONFIGS = list(CONFIGS)


def describe(name: str) -> str:
    method, rho, normalize, rule = CONFIGS[name]
    if method == "sgd":
        return "plain step"
    if rule is not None and rule[0] == "rel":
        return f"e = -{rule[1]} ||w|| g/||g||"
    if rule is not None and rule[0] == "cap":
        return f"e = -{rho} g, ||e|| <= {rule[1]} ||w||"
    if rho is None:
        return "the default for the model"
    sign = "+" if method == "sam" else "-"
    return f"e = {sign}{rho} g{' / ||g||' if normalize else ''}"


PERTURBATION = "perturbation_from_gradients_"


@contextlib.contextmanager
def perturbation_rule(rule: tuple[str, float] | None):
    """Wraps the trainer's perturbation maths with a bench-only radius rule for the duration of a run."""
    if rule is None:
        yield
        return
    original = hf_aace.perturbation.perturbation_from_gradients_
    kind, value = rule

    @torch.no_grad()
    def wrapped(grads, params, method, rho, normalize):
        weight_norm = global_norm(list(params))
        if kind == "rel":  # normalised with rho = value * ||w||
            return original(grads, params, method, float(value * weight_norm), True)
        grad_norm, norm = original(grads, params, method, rho, normalize)
        limit = value * weight_norm
        if norm > limit:  # cap ||e|| at value * ||w||
            torch._foreach_mul_(grads, (limit / norm).to(grads[0].dtype))
            norm = global_norm(grads)
        return grad_norm, norm

    # Every hf_aace module that imported the function by name (the trainer's step) gets the wrapper.
    holders = [
        module
        for name, module in list(sys.modules.items())
        if (name == "hf_aace" or name.startswith("hf_aace.")) and getattr(module, PERTURBATION, None) is original
    ]
    for module in holders:
        setattr(module, PERTURBATION, wrapped)
    try:
        yield
    finally:
        for module in holders:
            setattr(module, PERTURBATION, original)


# ---- Data ----


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, inputs: dict[str, torch.Tensor]):
        self.inputs = inputs

    def __len__(self) -> int:
        return self.inputs["labels"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: values[index] for name, values in self.inputs.items()}


def digits_tensors(classes: int, size: int, channels: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits in the `digits` preset's split, classes 0..classes-1, at size x size (bilinear) with
    `channels` copies of the grey channel, normalised with the training split's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.repeat(1, channels, 1, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    train_index, test_index = torch.tensor(np.sort(train_index)), torch.tensor(np.sort(test_index))
    mean, std = images[train_index].mean(), images[train_index].std()
    images = (images - mean) / std

    def split(index: torch.Tensor) -> TensorDataset:
        index = index[labels[index] < classes]
        return TensorDataset({"pixel_values": images[index].contiguous(), "labels": labels[index]})

    return split(train_index), split(test_index)


TEXT_VOCAB, TEXT_LENGTH, TEXT_SPECIAL = 64, 16, (5, 6, 7)  # tokens A, B, C


def majority_tokens(count: int, seed: int) -> TensorDataset:
    """Filler tokens (8..63) plus 1..6 copies each of A, B, C with a unique largest count; label: the most frequent."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, TEXT_VOCAB, (count, TEXT_LENGTH), generator=generator)
    labels = torch.empty(count, dtype=torch.long)
    for row in range(count):
        while True:
            counts = torch.randint(1, 6, (3,), generator=generator)
            if (counts == counts.max()).sum() == 1:
                break
        positions = torch.randperm(TEXT_LENGTH, generator=generator)
        start = 0
        for token, number in zip(TEXT_SPECIAL, counts.tolist()):
            input_ids[row, positions[start : start + number]] = token
            start += number
        labels[row] = int(counts.argmax())
    return TensorDataset({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})


# ---- Models ----


def build(model: str, cli: argparse.Namespace) -> torch.nn.Module:
    if model == "vit":
        return ViTForImageClassification(
            ViTConfig(
                image_size=32,
                patch_size=cli.vit_patch,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                num_labels=cli.vit_classes,
            )
        )
    if model == "bert":
        return BertForSequenceClassification(
            BertConfig(
                vocab_size=TEXT_VOCAB,
                max_position_embeddings=TEXT_LENGTH,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                num_labels=3,
            )
        )
    return WideResNetForImageClassification(WideResNetConfig(depth=10, widen_factor=1, num_channels=1, num_labels=10))


def recipe(model: str, cli: argparse.Namespace) -> dict:
    if model == "wrn":  # the paper's optimizer
        return {
            "learning_rate": 0.1,
            "optim": "sgd",
            "optim_args": "momentum=0.9",
            "weight_decay": 5e-4,
            "weight_decay_all_parameters": True,
            "max_grad_norm": 0.0,
            "lr_scheduler_type": "constant",
        }
    # transformers' image-classification example: the Trainer's defaults (AdamW, linear decay, clipping 1.0)
    return {"learning_rate": cli.vit_lr if model == "vit" else cli.bert_lr}


# ---- Training ----


class Recorder(TrainerCallback):
    """||w|| at the start of every step, and every step's logged metrics."""

    def __init__(self):
        self.weight_norms: list[float] = []
        self.logs: list[dict] = []
        self.model = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        params = [p.detach() for p in model.parameters() if p.requires_grad]
        self.weight_norms.append(float(global_norm(params)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self.logs.append(dict(logs))


class SGDTrainer(AACETrainer):
    """For `sgd` (one pass, so AACETrainer logs no clean metrics): records the loss and accuracy of that pass."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and "labels" in inputs:
            accuracy = (outputs.logits.detach().argmax(-1) == inputs["labels"]).float().mean()
            self.sgd_records.append((float(loss.detach()), float(accuracy)))
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def accuracy_on(model: torch.nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    inputs = {name: values for name, values in dataset.inputs.items() if name != "labels"}
    logits = model(**inputs).logits
    return float((logits.argmax(-1) == dataset.inputs["labels"]).float().mean())


def train_one(model_name: str, config: str, seed: int, data, cli: argparse.Namespace, output_dir: str) -> dict:
    train, test = data
    method, rho, normalize, rule = CONFIGS[config]
    torch.manual_seed(seed)
    model = build(model_name, cli)
    args = AACETrainingArguments(
        output_dir=output_dir,
        sam_method=method,
        rho=rho,
        normalize_perturbation=normalize,
        per_device_train_batch_size=cli.batch_size,
        max_steps=cli.steps,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        **recipe(model_name, cli),
    )
    recorder = Recorder()
    trainer = SGDTrainer(model=model, args=args, train_dataset=train, callbacks=[recorder])
    trainer.sgd_records = []
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    diverged = None
    with perturbation_rule(rule):
        try:
            trainer.train()
        except Exception as error:  # noqa: BLE001 (a diverged run is a result: hf_aace raises TrainingDivergedError)
            diverged = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    seconds = time.perf_counter() - start
    if method == "sgd":
        losses = [loss for loss, _ in trainer.sgd_records]
        accuracies = [accuracy for _, accuracy in trainer.sgd_records]
        ratios = []
    else:
        losses = [log["clean_loss"] for log in recorder.logs]
        accuracies = [log["clean_accuracy"] for log in recorder.logs]
        ratios = [
            log["perturbation_norm"] / norm for log, norm in zip(recorder.logs, recorder.weight_norms) if norm > 0
        ]
    tail = cli.tail
    finite = diverged is None and all(math.isfinite(v) for v in losses)
    return {
        "clean_loss": statistics.fmean(losses[-tail:]) if losses and finite else float("nan"),
        "clean_accuracy": statistics.fmean(accuracies[-tail:]) if accuracies and finite else float("nan"),
        "test_accuracy": accuracy_on(model, test) if finite else float("nan"),
        "ratio_first": ratios[0] if ratios else None,
        "ratio_mean": statistics.fmean(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "weight_norm_first": recorder.weight_norms[0] if recorder.weight_norms else None,
        "weight_norm_last": recorder.weight_norms[-1] if recorder.weight_norms else None,
        "clean_loss_curve": losses,
        "ratio_curve": ratios,
        "diverged": diverged,
        "seconds": seconds,
    }


def run(cli: argparse.Namespace) -> dict:
    results: dict = {"models": {}}
    with tempfile.TemporaryDirectory() as output_dir:
        for model_name in cli.models:
            if model_name == "vit":
                data = digits_tensors(cli.vit_classes, size=32, channels=3)
            elif model_name == "wrn":
                data = digits_tensors(10, size=8, channels=1)  # as hf_aace's digits preset prepares them
            else:
                data = (majority_tokens(cli.bert_train, seed=1000), majority_tokens(512, seed=2000))
            runs: dict = {config: [] for config in cli.configs}
            for seed in cli.seeds:
                for config in cli.configs:
                    row = train_one(model_name, config, seed, data, cli, output_dir)
                    runs[config].append(row)
                    ratio = "" if row["ratio_mean"] is None else f" ||e||/||w|| mean {row['ratio_mean']:.2e}"
                    print(
                        f"{model_name} seed {seed} {config}: clean loss {row['clean_loss']:.3f} acc "
                        f"{row['clean_accuracy']:.3f} test {row['test_accuracy']:.3f}{ratio} ({row['seconds']:.1f} s)"
                        + (f" {row['diverged']}" if row["diverged"] else ""),
                        flush=True,
                    )
            results["models"][model_name] = {
                "train_examples": len(data[0]),
                "test_examples": len(data[1]),
                "parameters": sum(p.numel() for p in build(model_name, cli).parameters()),
                "runs": runs,
            }
    return results


# ---- Report ----


def spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if any(not math.isfinite(v) for v in values):
        return (
            "diverged"
            if all(not math.isfinite(v) for v in values)
            else "diverged in " + str(sum(not math.isfinite(v) for v in values))
        )
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


MODEL_NAMES = {
    "vit": "ViT (32px, patch {patch}, hidden 64, 2 layers), digits {classes} classes, AdamW {lr}",
    "bert": "BERT (hidden 64, 2 layers), majority token of 3, AdamW {lr}",
    "wrn": "WRN-10-1 (BatchNorm), digits 8x8x1 10 classes, SGD 0.1 momentum 0.9 wd 5e-4",
}


def markdown(cli: argparse.Namespace, results: dict, header: list[str], command: str) -> str:
    lines = ["## Default perturbation radius for aace", ""]
    lines += header
    lines += [
        f"- command: `{command}`",
        f"- settings: CPU, {cli.steps} steps, batch {cli.batch_size}, seeds {' '.join(map(str, cli.seeds))} (each "
        f"seed: same initial weights and batch order for every configuration); train loss/accuracy: mean of the last "
        f"{cli.tail} steps' logged `clean_loss`/`clean_accuracy`; test: held-out accuracy at the end; ||e||/||w||: "
        "logged `perturbation_norm` over ||w|| at the start of the step; cells: mean (min-max) over seeds; s/run: "
        "wall time of one train() call on this shared machine",
    ]
    for model_name, model in results["models"].items():
        title = MODEL_NAMES[model_name].format(
            classes=cli.vit_classes, patch=cli.vit_patch, lr=cli.vit_lr if model_name == "vit" else cli.bert_lr
        )
        lines += [
            "",
            f"### {model_name}: {title}",
            "",
            f"{model['parameters']:,} parameters, {model['train_examples']} training and {model['test_examples']} "
            "held-out examples",
            "",
            "| config | perturbation | train clean_loss | train clean_accuracy | test accuracy | ‖e‖/‖w‖ step 1 "
            "| ‖e‖/‖w‖ mean | s/run |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for config, rows in model["runs"].items():
            lines.append(
                f"| {config} | {describe(config).replace('||', '‖')} | "
                f"{spread([r['clean_loss'] for r in rows], '.3f')} | "
                f"{spread([r['clean_accuracy'] for r in rows], '.3f')} | "
                f"{spread([r['test_accuracy'] for r in rows], '.3f')} | "
                f"{spread([r['ratio_first'] for r in rows], '.1e')} | "
                f"{spread([r['ratio_mean'] for r in rows], '.1e')} | "
                f"{statistics.fmean(r['seconds'] for r in rows):.1f} |"
            )
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["vit", "bert", "wrn"], choices=["vit", "bert", "wrn"])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--tail", type=int, default=10, help="steps averaged for the final training metrics")
    parser.add_argument("--vit_classes", type=int, default=3, help="digit classes 0..N-1 for the ViT (default 3)")
    parser.add_argument("--vit_patch", type=int, default=8, help="ViT patch size (default 8: 16 patches)")
    parser.add_argument("--vit_lr", type=float, default=1e-3)
    parser.add_argument("--bert_lr", type=float, default=1e-3)
    parser.add_argument("--bert_train", type=int, default=2048, help="synthetic training sequences for BERT")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output_json", default=None, help="also write the raw results (curves included) here")
    parser.add_argument("--output_md", default=None, help="also write the Markdown table here")
    cli = parser.parse_args(argv)
    cli.device, cli.bf16, cli.compile = "cpu", False, False  # what common.run_and_report reads
    if cli.steps < 1 or cli.batch_size < 1 or not 1 <= cli.tail <= cli.steps:
        parser.error("--steps and --batch_size must be >= 1 and --tail in [1, --steps].")
    if not 2 <= cli.vit_classes <= 10:
        parser.error("--vit_classes must lie in [2, 10].")
    return cli


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_arguments(argv), run, markdown)


if __name__ == "__main__":
    main()
