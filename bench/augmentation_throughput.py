"""Throughput of the batched augmentation against the paper's per-image PIL transform chain, side by side.

(a) `hf_aace.data.BatchAugmentation` (crop with padding 4, flip, normalise, Cutout 16) on a uint8 batch already in
    memory (or on the GPU), producing the normalised float32 batch.
(b) The reference chain per image, as torchvision's CIFAR dataset and transforms run it in a DataLoader worker
    (`common.paper_transform`, written with PIL and torch because torchvision does not import beside the CPU torch):
    `Image.fromarray` of the stored HWC array, zero padding by 4 and a random 32x32 crop, horizontal flip with p=0.5,
    to-tensor (/255), normalise, Cutout 16 with p=0.5 (davda54/sam's), then the collation `torch.stack` into a batch.

Both run on the same machine in one process, repetitions interleaved; the script prints the machine, versions, date,
each repetition's images/s, the medians and their ratio.

Usage:
    python bench/augmentation_throughput.py [--batch-size 256] [--iterations 50] [--reference-iterations 4]
        [--repeats 5] [--device cpu] [--threads N]
"""

import argparse
import os
import statistics
import time

import numpy as np
import PIL.Image
import torch

from hf_aace.data import BatchAugmentation

from common import machine_header, paper_transform

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PADDING = 4
CUTOUT = 16


def time_batched(augmentation: BatchAugmentation, batches: list[torch.Tensor], iterations: int) -> float:
    device = batches[0].device
    start = time.perf_counter()
    for i in range(iterations):
        augmentation(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return iterations * batches[0].shape[0] / (time.perf_counter() - start)


def time_reference(arrays: list[np.ndarray], batch_size: int, iterations: int) -> float:
    """Images/s of (b): `Image.fromarray` of each stored HWC array (as torchvision's CIFAR10.__getitem__), the
    per-image chain, and the collation `torch.stack`."""
    transform = paper_transform(32, PADDING, CUTOUT, torch.tensor(MEAN), torch.tensor(STD))
    start = time.perf_counter()
    for i in range(iterations):
        offset = (i * batch_size) % len(arrays)
        torch.stack([transform(PIL.Image.fromarray(array)) for array in arrays[offset : offset + batch_size]])
    return iterations * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=50, help="batches per repetition of (a)")
    parser.add_argument("--reference-iterations", type=int, default=4, help="batches per repetition of (b)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (4 * args.batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    batches = [chunk.to(device) for chunk in pool.split(args.batch_size)]
    arrays = list(pool.permute(0, 2, 3, 1).contiguous().numpy())
    augmentation = BatchAugmentation(MEAN, STD, crop_padding=PADDING, flip=True, cutout_size=CUTOUT, seed=0)
    torch.manual_seed(0)

    print("\n".join(machine_header(device.type)))
    print(
        f"batch {args.batch_size} of 3x32x32 uint8 on {device}; (a) {args.iterations} batches, "
        f"(b) {args.reference_iterations} batches per repetition; {args.repeats} interleaved repetitions"
    )

    time_batched(augmentation, batches, 3)  # warm-up: generator creation, allocator, CUDA context
    time_reference(arrays, args.batch_size, 1)
    batched, reference = [], []
    for repeat in range(args.repeats):
        batched.append(time_batched(augmentation, batches, args.iterations))
        reference.append(time_reference(arrays, args.batch_size, args.reference_iterations))
        print(f"repetition {repeat}: (a) batched {batched[-1]:,.0f}, (b) per-image {reference[-1]:,.0f} images/s")
    a, b = statistics.median(batched), statistics.median(reference)
    print(f"median: (a) batched {a:,.0f} images/s, (b) per-image PIL {b:,.0f} images/s, ratio a/b = {a / b:.1f}x")
    print(f"load average (1, 5, 15 min) at end: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    main()
