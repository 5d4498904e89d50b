"""What the benchmarks share: the machine description, step timing, hf_aace models by short name, the paper's
optimizer settings, the report, and the paper's per-image transform chain.

The scripts run as `python bench/NAME.py`, which puts bench/ on `sys.path`: they import this module as `common`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import transformers
from transformers import TrainerCallback

import hf_aace
from hf_aace import AACETrainingArguments
from hf_aace.models.architectures import ARCHITECTURES, Architecture, resolve_model

# ---- Machine and report ----


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform reports)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header(device: str) -> list[str]:
    """Markdown lines recording date, machine, load and versions, as every benchmark result must."""
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}",
    ]
    try:
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
        lines.append(f"- load average at start (1, 5, 15 min): {load}")
    except OSError:
        pass
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    lines.append(
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, hf_aace {hf_aace.__version__}, numpy {np.__version__}, PIL {PIL.__version__}"
    )
    return lines


def run_and_report(
    cli: argparse.Namespace,
    run_fn: Callable[[argparse.Namespace], dict],
    markdown_fn: Callable[[argparse.Namespace, dict, list[str], str], str],
) -> None:
    """Runs a benchmark quietly, then prints its Markdown table and writes it to `--output_md`, the raw results to
    `--output_json`."""
    if cli.threads:
        torch.set_num_threads(cli.threads)
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    header = machine_header(cli.device)
    results = run_fn(cli)
    command = " ".join(["python", *sys.argv])
    table = markdown_fn(cli, results, header, command)
    print()
    print(table)
    if cli.output_md:
        with open(cli.output_md, "w") as file:
            file.write(table)
    if cli.output_json:
        with open(cli.output_json, "w") as file:
            json.dump({"command": command, "machine": header, "results": results}, file, indent=1)


# ---- Timing ----


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Stamps the clock at the end of every optimizer step of a `train()` call."""

    def __init__(self, device: str):
        self.device = device
        self.stamps: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        """Durations of the steps after the first `warmup` (warmup >= 1: the first step has no start stamp)."""
        return [later - earlier for earlier, later in zip(self.stamps[warmup - 1 :], self.stamps[warmup:])]


# ---- Models and training arguments ----


def resolve_hf_aace_model(spec: str) -> tuple[Architecture, dict[str, Any]]:
    """The architecture and config keywords of an hf_aace model name (`wrn-16-4`, `pyramidnet-20-48`, `wide_resnet`,
    `pyramidnet-272-bottleneck`, ...), read by `hf_aace.models.architectures.resolve_model`.

    Raises:
        ValueError: For an invalid size (`wrn-27-10`) or a name that is no hf_aace model.
    """
    resolved = resolve_model(spec)
    if resolved is None:
        forms = ", ".join(architecture.short_name_form for architecture in ARCHITECTURES.values())
        raise ValueError(f"Unknown model {spec!r}: use an hf_aace model name ({forms} or {', '.join(ARCHITECTURES)}).")
    return resolved


def build_hf_aace_model(spec: str, num_labels: int = 10) -> torch.nn.Module:
    """A freshly initialised hf_aace image classifier from a model name (see `resolve_hf_aace_model`)."""
    architecture, size = resolve_hf_aace_model(spec)
    return architecture.model_class(architecture.config_class(**size, num_labels=num_labels))


def training_arguments(method: str, output_dir: str, cli: argparse.Namespace, max_steps: int, **overrides):
    """The paper's optimizer settings (SGD momentum 0.9, lr 0.1, weight decay 5e-4 on all parameters, no clipping)."""
    values = {
        "output_dir": output_dir,
        "sam_method": method,
        "per_device_train_batch_size": cli.batch_size,
        "max_steps": max_steps,
        "learning_rate": 0.1,
        "optim": "sgd",
        "optim_args": "momentum=0.9",
        "weight_decay": 5e-4,
        "weight_decay_all_parameters": True,
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "use_cpu": cli.device == "cpu",
        "bf16": cli.bf16,
        "torch_compile": cli.compile,
        "step_capture": getattr(cli, "step_capture", "none"),
        "seed": 42,
    }
    values.update(overrides)
    return AACETrainingArguments(**values)


# ---- The paper's per-image transform chain ----
#
# RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std) as torchvision's PIL code paths
# run them, and davda54/sam's Cutout(16, p=0.5) after normalising. Written with PIL and torch because torchvision does
# not import beside this project's CPU torch: the only torchvision for torch 2.13.0 on PyPI (0.28.0) is the CUDA
# build, whose `torchvision/_C.so` needs `libc10_cuda.so`, absent from the `+cpu` torch wheel, so `import torchvision`
# fails with "operator torchvision::nms does not exist" (the CPU builds are published on PyTorch's own index only).
# Tensor libraries that do install (kornia 0.9.0 imports beside torch 2.13.0+cpu) transform batched tensors, not PIL
# images one at a time in DataLoader workers, whose cost is what the benchmarks measure.


class RandomCrop:
    """Zero-pad the PIL image by `padding` on every side, then crop `size` x `size` at a uniformly random corner."""

    def __init__(self, size: int, padding: int):
        self.size, self.padding = size, padding

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        image = PIL.ImageOps.expand(image, border=self.padding, fill=0)
        width, height = image.size
        top = int(torch.randint(0, height - self.size + 1, size=(1,)).item())
        left = int(torch.randint(0, width - self.size + 1, size=(1,)).item())
        return image.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    """Mirror the PIL image with probability 0.5."""

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        if torch.rand(1) < 0.5:
            return image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return image


class ToTensor:
    """PIL image to a CHW float tensor in [0, 1]."""

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        array = torch.from_numpy(np.array(image, np.uint8, copy=True))
        array = array.view(image.size[1], image.size[0], len(image.getbands())).permute(2, 0, 1).contiguous()
        return array.to(torch.float32).div(255)


class Normalize:
    """(x - mean) / std per channel, on a copy."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone().sub_(self.mean).div_(self.std)


class Cutout:
    """With probability p, zero a size x size square whose centre is uniform over the image (clipped at borders)."""

    def __init__(self, size: int = 16, p: float = 0.5):
        self.size, self.p = size, p

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.rand([1]).item() > self.p:
            return tensor
        half = self.size // 2
        top = int(torch.randint(-half, tensor.size(1) - half, [1]).item())
        left = int(torch.randint(-half, tensor.size(2) - half, [1]).item())
        tensor[
            :, max(0, top) : min(tensor.size(1), top + self.size), max(0, left) : min(tensor.size(2), left + self.size)
        ] = 0
        return tensor


class Compose:
    """Applies the transforms in order."""

    def __init__(self, transforms: list[Callable]):
        self.transforms = transforms

    def __call__(self, value):
        for transform in self.transforms:
            value = transform(value)
        return value


def paper_transform(size: int, padding: int, cutout_size: int, mean: torch.Tensor, std: torch.Tensor) -> Compose:
    """The paper's training chain for one PIL image: crop with zero padding, flip, to tensor, normalise, Cutout."""
    return Compose(
        [
            RandomCrop(size, padding=padding),
            RandomHorizontalFlip(),
            ToTensor(),
            Normalize(mean, std),
            Cutout(cutout_size, p=0.5),
        ]
    )
