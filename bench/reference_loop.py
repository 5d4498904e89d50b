"""End-to-end training throughput: the paper's own training loop against scripts/train.py's AACETrainer path.

Both contenders train the same architecture on the same uint8 images with the same batch size, step count and AACE
settings (rho 0.2, unnormalised, threshold 0, adaptive), data pipeline included:

reference
    A stand-alone re-implementation of the loop of the paper's repository (T-Ratchatorn/AACE, train.py and sam.py).
    A `torch.utils.data.DataLoader` (shuffle, `--num_workers` worker processes, no pinned memory, workers restarted
    every epoch) over a dataset that turns each stored HWC uint8 array into a PIL image and runs the per-image chain
    RandomCrop(32, padding=4, zero fill), RandomHorizontalFlip, ToTensor, Normalize, Cutout(16, p=0.5, after
    normalising): `common.paper_transform`, torchvision's code paths written with PIL and torch, because torchvision
    does not import beside the CPU torch (see there). Each step: BatchNorm momentum restored; forward; cross-entropy
    summed for the log (`.item()`); mean AACE loss (`hf_aace.aace_loss`), backward; `first_step` (gradient norm, a
    fresh copy of every weight, e = rho * g, w <- w - e, the norm of e read back with `.item()`, zero_grad); BatchNorm
    momentum 0; forward; cross-entropy; backward; `second_step` (weights reassigned from the copies, base SGD step,
    zero_grad); accuracy and loss to the host for the log; learning-rate schedule call.
trainer, trainer_bf16
    scripts/train.py's path: `AACETrainer` over `hf_aace.data.ImageClassificationSplit` (uint8 items, the Trainer's
    default loader: no workers) with `hf_aace.data.BatchAugmentation` (crop padding 4, flip, Cutout 16) on the
    training device, the paper recipe's optimizer (SGD momentum 0.9, weight decay 5e-4 on all parameters, lr
    milestones, no clipping) and train.py's logging every 20 steps; `trainer_bf16` adds `--bf16`;
    `trainer_captured` and `trainer_bf16_captured` add `--step_capture cuda_graph` and `--dataloader_drop_last`
    (CUDA only).

Each contender runs `--warmup` untimed steps and then `--steps` timed steps, and they alternate `--repeats` times
(order reversed every other repeat). A step's time is the gap between two consecutive step ends (after
`torch.cuda.synchronize()` on CUDA), so data loading is inside it. Reported: median step time, images/s at the median,
and each contender's speed relative to the reference (reference median / contender median; > 1 is faster).

Usage:
    python bench/reference_loop.py [--model wrn-16-4] [--batch_size 128] [--num_images 5000] [--steps 4]
        [--warmup 1] [--repeats 3] [--num_workers 2] [--variants reference trainer] [--device cpu|cuda]
        [--output_md PATH] [--output_json PATH]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from transformers.trainer_callback import PrinterCallback

from hf_aace import AACETrainer, aace_loss
from hf_aace.data import BatchAugmentation, ImageClassificationSplit

from common import (
    StepTimer,
    build_hf_aace_model,
    paper_transform,
    resolve_hf_aace_model,
    run_and_report,
    synchronize,
    training_arguments,
)

VARIANTS = ("reference", "trainer", "trainer_bf16", "trainer_captured", "trainer_bf16_captured")
RHO = 0.2
PADDING = 4
CUTOUT_SIZE = 16
MILESTONES = (0.3, 0.6, 0.8)
PAPER_EPOCHS = 200


class PILImageDataset(torch.utils.data.Dataset):
    """Stored like torchvision's CIFAR datasets: an NHWC uint8 array and a list of int labels; PIL image per item."""

    def __init__(self, data: np.ndarray, targets: list[int], transform):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = PIL.Image.fromarray(self.data[index])
        return self.transform(image), self.targets[index]


# ---- The SAM optimizer wrapper and the BatchNorm trick of the paper's repository ----


class ReferenceSAM(torch.optim.Optimizer):
    """The repository's SAM wrapper in its AACE form: first_step descends by e = rho * g, second_step restores w."""

    def __init__(self, params, base_optimizer, rho: float, adaptive: bool = False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = [
            ((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return torch.stack(norms).norm(p=2)

    @torch.no_grad()
    def first_step(self, use_grad_norm: bool = False, zero_grad: bool = False) -> tuple[float, float]:
        grad_norm = self._grad_norm()  # computed (and read back) even when it does not scale e, as the repository does
        e_norm_squared = 0.0
        for group in self.param_groups:
            if use_grad_norm:
                scale = group["rho"] / (grad_norm + 1e-12)
            else:
                scale = torch.tensor(group["rho"]).to(self.param_groups[0]["params"][0].device)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e = (p.pow(2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.sub_(e)  # AACE descends its loss: w - e
                e_norm_squared += e.norm(p=2).pow(2)
        if zero_grad:
            self.zero_grad()
        return grad_norm.item(), (e_norm_squared**0.5).item()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def restore_batchnorm_momentum(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and hasattr(module, "saved_momentum"):
            module.momentum = module.saved_momentum


def zero_batchnorm_momentum(model: nn.Module) -> None:
    """Momentum 0: the second pass normalises with batch statistics but leaves the running statistics unchanged."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.saved_momentum = module.momentum
            module.momentum = 0


def paper_learning_rate(optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """The step schedule, called every step as the repository does: 0.1 x 0.2 per milestone passed."""
    lr = 0.1 * 0.2 ** sum(epoch >= m * PAPER_EPOCHS for m in MILESTONES)
    for group in optimizer.param_groups:
        group["lr"] = lr


class ReferenceLoop:
    """The paper's training loop, resumable: each `run` starts a new epoch iterator (as every epoch does)."""

    def __init__(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: str):
        self.model, self.loader, self.device = model, loader, torch.device(device)
        self.optimizer = ReferenceSAM(
            model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, weight_decay=5e-4
        )
        self.log = {"ce_loss": 0.0, "aace_loss": 0.0, "loss": 0.0, "correct": 0, "samples": 0}

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        model, optimizer = self.model, self.optimizer
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        restore_batchnorm_momentum(model)
        predictions = model(inputs).logits
        ce_loss = F.cross_entropy(predictions, targets, reduction="none")  # for the log only
        self.log["ce_loss"] += ce_loss.sum().item()
        perturbation_loss = aace_loss(predictions, targets, reduction="none")
        perturbation_loss.mean().backward()
        self.log["aace_loss"] += perturbation_loss.sum().item()
        optimizer.first_step(use_grad_norm=False, zero_grad=True)
        zero_batchnorm_momentum(model)
        loss = F.cross_entropy(model(inputs).logits, targets, reduction="none")
        loss.mean().backward()
        optimizer.second_step(zero_grad=True)
        with torch.no_grad():
            correct = torch.argmax(predictions.data, 1) == targets
            loss, correct = loss.cpu(), correct.cpu()
            self.log["loss"] += loss.sum().item()
            self.log["correct"] += correct.sum().item()
            self.log["samples"] += loss.size(0)
            paper_learning_rate(optimizer, epoch=0)

    def run(self, num_steps: int) -> list[float]:
        """Runs `num_steps` steps of a new epoch; returns the clock at the end of each step."""
        self.model.train()
        stamps = []
        batches = iter(self.loader)
        for _ in range(num_steps):
            try:
                inputs, targets = next(batches)
            except StopIteration:
                batches = iter(self.loader)
                inputs, targets = next(batches)
            self.step(inputs, targets)
            synchronize(self.device.type)
            stamps.append(time.perf_counter())
        return stamps


def make_images(num_images: int, size: int, num_labels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random CIFAR-shaped uint8 images (N, 3, size, size) and int64 labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_labels, (num_images,), generator=generator)
    return images, labels


def run(cli: argparse.Namespace) -> dict:
    images, labels = make_images(cli.num_images, cli.image_size, 10, seed=0)
    scaled = images.double().div(255)
    mean = scaled.mean(dim=(0, 2, 3)).float()
    std = scaled.std(dim=(0, 2, 3)).float()
    del scaled

    contenders = {}
    if "reference" in cli.variants:
        transform = paper_transform(cli.image_size, PADDING, CUTOUT_SIZE, mean, std)
        dataset = PILImageDataset(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.tolist(), transform)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cli.batch_size, shuffle=True, num_workers=cli.num_workers
        )
        torch.manual_seed(0)
        loop = ReferenceLoop(build_hf_aace_model(cli.model).to(cli.device), loader, cli.device)
        contenders["reference"] = lambda: loop.run(cli.warmup + cli.steps)

    output_dir = tempfile.mkdtemp(prefix="hf_aace_bench_")
    trainer_variants = [v for v in cli.variants if v != "reference"]
    if trainer_variants:
        torch.manual_seed(0)
        model = build_hf_aace_model(cli.model)
        train_split = ImageClassificationSplit(images, labels)
        timer = StepTimer(cli.device)
        for variant in trainer_variants:
            args = training_arguments(
                "aace",
                output_dir,
                cli,
                cli.warmup + cli.steps,
                bf16="bf16" in variant,
                step_capture="cuda_graph" if variant.endswith("_captured") else "none",
                dataloader_drop_last=variant.endswith("_captured"),  # one batch shape: one graph
                torch_compile=False,
                lr_milestones=list(MILESTONES),
                lr_gamma=0.2,
                logging_strategy="steps",
                logging_steps=20,
                channels_last=cli.trainer_channels_last,
            )
            augmentation = BatchAugmentation(
                mean.tolist(), std.tolist(), crop_padding=PADDING, flip=True, cutout_size=CUTOUT_SIZE, seed=42
            )
            trainer = AACETrainer(
                model=model, args=args, train_dataset=train_split, augmentation=augmentation, callbacks=[timer]
            )
            trainer.remove_callback(PrinterCallback)

            def run_trainer(trainer=trainer):
                trainer.train()
                return timer.stamps

            contenders[variant] = run_trainer

    times = {name: [] for name in contenders}
    for repeat in range(cli.repeats):
        order = list(contenders) if repeat % 2 == 0 else list(contenders)[::-1]
        for name in order:
            stamps = contenders[name]()
            steps = [later - earlier for earlier, later in zip(stamps[cli.warmup - 1 :], stamps[cli.warmup :])]
            times[name].extend(steps)
            print(
                f"repeat {repeat + 1}/{cli.repeats} {name}: " + " ".join(f"{1000 * t:.0f}" for t in steps) + " ms",
                flush=True,
            )

    reference_median = statistics.median(times["reference"]) if "reference" in times else None
    rows = {}
    for name, values in times.items():
        median = statistics.median(values)
        rows[name] = {
            "step_times_s": values,
            "median_step_s": median,
            "images_per_s": cli.batch_size / median,
            "speedup_vs_reference": reference_median / median if reference_median else None,
        }
    return rows


def markdown(cli: argparse.Namespace, rows: dict, header: list[str], command: str) -> str:
    layout = ", channels_last" if cli.trainer_channels_last else ""
    labels = {
        "reference": f"paper's loop (DataLoader, {cli.num_workers} workers, per-image PIL, fp32)",
        "trainer": f"AACETrainer + BatchAugmentation on the device (fp32{layout})",
        "trainer_bf16": f"AACETrainer + BatchAugmentation on the device (bf16{layout})",
        "trainer_captured": f"AACETrainer + BatchAugmentation, step captured as a CUDA graph (fp32{layout})",
        "trainer_bf16_captured": f"AACETrainer + BatchAugmentation, step captured as a CUDA graph (bf16{layout})",
    }
    lines = ["## End-to-end AACE training: paper's loop vs AACETrainer", ""]
    lines += header
    lines += [
        f"- command: `{command}`",
        f"- settings: device {cli.device}, model {cli.model}, batch {cli.batch_size}, {cli.num_images} random uint8 "
        f"{cli.image_size}x{cli.image_size}x3 images (10 labels), AACE rho {RHO}; {cli.repeats} repeats x "
        f"{cli.steps} timed steps per contender (after {cli.warmup} warmup steps per repeat), alternated",
        "",
        "| contender | median step (ms) | images/s | speed vs paper's loop | min-max step (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        speed = "n/a" if row["speedup_vs_reference"] is None else f"{row['speedup_vs_reference']:.3f}x"
        spread = f"{1000 * min(row['step_times_s']):.0f}-{1000 * max(row['step_times_s']):.0f}"
        lines.append(
            f"| {labels[name]} | {1000 * row['median_step_s']:.0f} | {row['images_per_s']:.1f} | {speed} | {spread} |"
        )
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="wrn-16-4",
        help="an hf_aace model: wrn-DEPTH-WIDEN, pyramidnet-DEPTH-ALPHA[-bottleneck], ...",
    )
    parser.add_argument("--variants", nargs="+", default=["reference", "trainer"], choices=VARIANTS)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_images", type=int, default=5000)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default: cpu 4, cuda 40)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per repeat, >= 1 (cpu 1, cuda 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--num_workers", type=int, default=None, help="DataLoader workers of the paper's loop (default: cpu 2, cuda 8)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the main process")
    parser.add_argument(
        "--trainer_channels_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last weights and batches on the trainer path, as scripts/train.py uses by default",
    )
    parser.add_argument("--output_json", default=None, help="also write the raw step times and results here")
    parser.add_argument("--output_md", default=None, help="also write the Markdown table here")
    cli = parser.parse_args(argv)
    on_cuda = cli.device == "cuda"
    cli.steps = cli.steps if cli.steps is not None else (40 if on_cuda else 4)
    cli.warmup = cli.warmup if cli.warmup is not None else (10 if on_cuda else 1)
    cli.num_workers = cli.num_workers if cli.num_workers is not None else (8 if on_cuda else 2)
    # common.training_arguments() reads these
    cli.bf16, cli.compile = False, False
    if cli.warmup < 1 or cli.steps < 1 or cli.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (the first step is never timed).")
    if math.ceil(cli.num_images / cli.batch_size) < 1:
        parser.error("--num_images must hold at least one batch.")
    try:
        resolve_hf_aace_model(cli.model)
    except ValueError as error:
        parser.error(str(error))
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device.")
    return cli


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_arguments(argv), run, markdown)


if __name__ == "__main__":
    main()
