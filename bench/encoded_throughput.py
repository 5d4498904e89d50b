"""Images/s of the encoded-image path (decode + RandomResizedCrop + flip in DataLoader workers) against reading the
decoded uint8 cache, through the DataLoader and collator the Trainer uses.

Builds `--images` synthetic JPEGs (quality 90, smooth colour fields with mild noise, `--stored-size` pixels square;
`decode_scaling.synthetic_jpegs`) as an in-memory `datasets` split with an `Image` column, and times full passes of
`torch.utils.data.DataLoader(split, batch_size, num_workers=W, collate_fn=default_data_collator)`, shuffled, for:

- `encoded train`: [`EncodedImageSplit`] training items (RandomResizedCrop to `--crop`, flip), W in `--workers`;
- `encoded eval`: the same split's evaluation items (resize shorter side, centre crop), W in `--workers`;
- `cached`: [`ImageClassificationSplit`] over the same images decoded once at `--crop` x `--crop` (what the cache
  file maps), W = 0 (the Trainer's default), i.e. the collator's copy only.

A pass includes starting the workers (the Trainer's default, non-persistent workers start every epoch). Contenders
are interleaved, the order reversed every other repeat; medians over `--repeats`. Images/s per core divides by the
number of workers (by 1 for W = 0).

Usage:
    python bench/encoded_throughput.py [--images 512] [--stored-size 256] [--crop 224] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import datasets
import torch
from decode_scaling import synthetic_jpegs
from transformers import default_data_collator

from hf_aace.data import EncodedImageSplit, ImageClassificationSplit

from common import machine_header


def timed_pass(split: torch.utils.data.Dataset, batch_size: int, workers: int, epoch: int) -> float:
    """Seconds of one shuffled pass over `split` through a fresh DataLoader."""
    if hasattr(split, "set_epoch"):
        split.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(
        split,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=default_data_collator,
        generator=torch.Generator().manual_seed(epoch),
    )
    start = time.perf_counter()
    for batch in loader:
        assert batch["pixel_values"].dtype == torch.uint8
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--stored-size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_md", default=None)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    header = machine_header("cpu")

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    jpegs = synthetic_jpegs(0, cli.images, cli.stored_size)
    split = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data in jpegs], "label": [0] * cli.images}, features=features
    )
    labels = torch.zeros(cli.images, dtype=torch.int64)
    train = EncodedImageSplit(split, "image", labels, 3, cli.crop, train=True)
    evaluation = EncodedImageSplit(split, "image", labels, 3, cli.crop, train=False)
    # The cache holds every image decoded once at the crop size; reading it is a view per item.
    cached = ImageClassificationSplit(torch.stack([evaluation[i]["pixel_values"] for i in range(cli.images)]), labels)
    contenders = [(f"encoded train (RandomResizedCrop {cli.crop} + flip)", train, w) for w in cli.workers]
    contenders += [(f"encoded eval (resize {round(cli.crop / 0.875)}, centre crop {cli.crop})", evaluation, w)
                   for w in cli.workers]  # fmt: skip
    contenders.append((f"cached uint8 {cli.crop}x{cli.crop}", cached, 0))

    times: dict[int, list[float]] = {index: [] for index in range(len(contenders))}
    for repeat in range(cli.repeats + 1):  # repeat 0 warms up
        order = range(len(contenders)) if repeat % 2 == 0 else reversed(range(len(contenders)))
        for index in order:
            _, dataset, workers = contenders[index]
            seconds = timed_pass(dataset, cli.batch_size, workers, repeat)
            if repeat:
                times[index].append(seconds)

    rows = [
        "| path | DataLoader workers | images/s | images/s per core | pass (s) |",
        "|---|---|---|---|---|",
    ]
    for index, (name, _, workers) in enumerate(contenders):
        seconds = statistics.median(times[index])
        rate = cli.images / seconds
        rows.append(f"| {name} | {workers} | {rate:,.0f} | {rate / max(workers, 1):,.0f} | {seconds:.3f} |")
    command = " ".join(["python", *sys.argv])
    table = "\n".join(
        [
            *header,
            f"- command: `{command}`",
            f"- {cli.images} JPEGs (quality 90) of {cli.stored_size}x{cli.stored_size}, batch {cli.batch_size}, "
            f"medians of {cli.repeats} passes after one warm-up",
            "",
            *rows,
        ]
    )
    print(table)
    if cli.output_md:
        with open(cli.output_md, "w") as file:
            file.write(table + "\n")


if __name__ == "__main__":
    main()
