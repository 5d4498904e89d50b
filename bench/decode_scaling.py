"""First decode of a JPEG image-classification dataset: in this process, in memory, against worker processes writing
straight into the cache file; images/s and peak memory, for growing dataset sizes.

Writes a synthetic dataset in the Hub's layout (parquet shards of `{"image": {"bytes", "path"}, "label"}` and a README
declaring the features): smooth random colour fields with mild noise, `--stored-size` pixels square, saved as JPEG
quality 90, `--num-labels` classes, plus a test split of `--test-images`. Each size is the first rows of the same
shards. For each size and contender, a fresh process calls `load_image_classification_dataset(folder,
image_size=--image-size, decode_workers=W)` with an empty cache folder (datasets' own arrow files prepared beforehand,
in another process) and reports:

- images/s: train + test images over the call's wall time (worker start-up included); on a machine shared with other
  work also the CPU seconds of the process and its workers (user + system, sampled every 0.1 s) and images per CPU
  second, which the load of other processes does not change;
- peak memory of the process and its workers together, sampled every 0.1 s as PSS (resident pages, those shared
  between processes, such as the modules the workers inherit, counted once overall): all pages, and the anonymous
  ones only (file pages, such as the memory-mapped arrow files, can be dropped by the kernel; anonymous ones must fit
  in RAM); `ru_maxrss` (peak RSS) of the calling process alone;
- the same PSS right after the call returned (the tensors of the worker path map the cache file).

The in-process path (`decode_workers=1`) needs about twice the decoded dataset in RAM; sizes whose decoded train split
exceeds `--in-process-limit-gb` skip it. Everything written (the dataset, datasets' arrow files, the caches) is
deleted at the end.

Usage:
    nice python bench/decode_scaling.py [--sizes 20000 100000] [--workers 2] [--workdir DIR] [--output_md FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from common import machine_header

SHARD_ROWS = 5000


def synthetic_jpegs(seed: int, count: int, size: int) -> list[bytes]:
    """`count` JPEGs (quality 90) of smooth colour fields: 8x8 random colours upsampled, plus mild pixel noise."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(count):
        field = PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), 3)
        noisy = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        buffer = io.BytesIO()
        PIL.Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def write_shard(path: Path, seed: int, count: int, size: int, num_labels: int) -> None:
    images = synthetic_jpegs(seed, count, size)
    labels = np.random.default_rng(seed + 1).integers(0, num_labels, count)
    table = pa.table(
        {
            "image": pa.array([{"bytes": data, "path": None} for data in images]),
            "label": pa.array(labels, pa.int64()),
        }
    )
    pq.write_table(table, path)


def write_datasets(root: Path, sizes: list[int], test_images: int, stored: int, num_labels: int, jobs: int) -> None:
    """The shards once, and one dataset folder per size whose README lists the first shards."""
    shards = root / "shards"
    shards.mkdir(parents=True)
    count = math.ceil(max(sizes) / SHARD_ROWS)
    with ProcessPoolExecutor(jobs) as pool:
        jobs_done = [
            pool.submit(write_shard, shards / f"train-{i:05d}.parquet", i, SHARD_ROWS, stored, num_labels)
            for i in range(count)
        ]
        jobs_done.append(
            pool.submit(write_shard, shards / "test-00000.parquet", 10**6, test_images, stored, num_labels)
        )
        for job in jobs_done:
            job.result()
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_labels)])}
    )
    for size in sizes:
        if size % SHARD_ROWS:
            raise ValueError(f"--sizes must be multiples of {SHARD_ROWS}, got {size}.")
        folder = root / f"n{size}"
        (folder / "data").mkdir(parents=True)
        for name in [f"train-{i:05d}.parquet" for i in range(size // SHARD_ROWS)] + ["test-00000.parquet"]:
            os.link(shards / name, folder / "data" / name)
        card = {
            "dataset_info": {"features": features._to_yaml_list()},
            "configs": [
                {
                    "config_name": "default",
                    "data_files": [
                        {"split": "train", "path": "data/train-*"},
                        {"split": "test", "path": "data/test-*"},
                    ],
                }
            ],
        }
        (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")


def tree_cpu_seconds(process: psutil.Process, seconds: dict[int, float]) -> None:
    """Records the user + system CPU seconds of the process and each descendant alive now, by pid."""
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            seconds[member.pid] = times.user + times.system


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """Proportional resident bytes (PSS: pages shared between processes counted once overall) of the process and its
    descendants: all of them, and the anonymous ones only."""
    pss = anonymous = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            with open(f"/proc/{member.pid}/smaps_rollup") as rollup:
                fields = dict(line.split(":", 1) for line in rollup if line.startswith(("Pss:", "Pss_Anon:")))
        except OSError:
            continue
        pss += int(fields.get("Pss", "0 kB").split()[0]) * 1024
        anonymous += int(fields.get("Pss_Anon", "0 kB").split()[0]) * 1024
    return pss, anonymous


def measure(folder: str, cache_dir: str, image_size: int, workers: int) -> dict:
    """One first decode in this process (run as a child of the benchmark); prints its figures as JSON."""
    from hf_aace.data import load_image_classification_dataset

    process = psutil.Process()
    peaks = [0, 0]
    cpu_before, cpu = {}, {}
    tree_cpu_seconds(process, cpu_before)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            pss, anonymous = tree_memory(process)
            peaks[0], peaks[1] = max(peaks[0], pss), max(peaks[1], anonymous)
            tree_cpu_seconds(process, cpu)

    sampler = threading.Thread(target=sample, daemon=True)
    before = tree_memory(process)
    sampler.start()
    start = time.perf_counter()
    data = load_image_classification_dataset(
        folder, image_size=image_size, cache_dir=cache_dir, decode_workers=workers, show_progress=False
    )
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    tree_cpu_seconds(process, cpu)
    cpu_seconds = sum(cpu.values()) - sum(cpu_before.values())
    after = tree_memory(process)
    images = len(data.train) + len(data.test)
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "cpu_seconds": cpu_seconds,
        "images_per_cpu_s": images / cpu_seconds,
        "pss_before": before[0],
        "peak_pss": peaks[0],
        "peak_anonymous": peaks[1],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "pss_after": after[0],
        "anonymous_after": after[1],
        "decoded_bytes": data.train.images.numel() + data.test.images.numel(),
    }


def child(arguments: list[str], environment: dict[str, str]) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, *arguments], env=environment, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000], help="train images")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--stored-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="side the decode resizes to")
    parser.add_argument("--num-labels", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="decode_workers of the parallel runs")
    parser.add_argument(
        "--in-process-limit-gb", type=float, default=8.0, help="largest decoded train split run in-process"
    )
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temporary folder)")
    parser.add_argument("--output_md", default=None)
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--measure", nargs=4, metavar=("FOLDER", "CACHE", "SIZE", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", metavar="FOLDER", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.measure:
        folder, cache, size, workers = cli.measure
        print(json.dumps(measure(folder, cache, int(size), int(workers))))
        return
    if cli.prepare:
        datasets.load_dataset(cli.prepare)
        print("{}")
        return

    header = machine_header("cpu")
    command = " ".join(["python", *sys.argv])
    print("\n".join(header))
    root = Path(tempfile.mkdtemp(prefix="decode_scaling-", dir=cli.workdir))
    environment = {**os.environ, "HF_DATASETS_CACHE": str(root / "arrow"), "HF_DATASETS_OFFLINE": "1"}
    results = []
    try:
        start = time.perf_counter()
        write_datasets(root, cli.sizes, cli.test_images, cli.stored_size, cli.num_labels, os.cpu_count() or 1)
        print(f"wrote the synthetic JPEGs in {time.perf_counter() - start:.0f} s", flush=True)
        decoded_image = 3 * cli.image_size**2
        for size in cli.sizes:
            folder = str(root / f"n{size}")
            child(["--prepare", folder], environment)
            contenders = list(cli.workers)
            if size * decoded_image <= cli.in_process_limit_gb * 2**30:
                contenders.insert(0, 1)
            for workers in contenders:
                cache = root / f"cache-{size}-{workers}"
                result = child(["--measure", folder, str(cache), str(cli.image_size), str(workers)], environment)
                shutil.rmtree(cache)
                result.update(train_images=size, workers=workers, load=os.getloadavg()[0])
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    jpeg_note = f"{cli.stored_size}x{cli.stored_size} JPEG q90 resized to {cli.image_size}x{cli.image_size}"
    lines = [
        *header,
        f"- command: `{command}`",
        f"- data: synthetic {jpeg_note}, {cli.test_images} test images beside each train size",
        "",
        "| train images | decode_workers | path | seconds | images/s | CPU seconds | images per CPU second | decoded "
        "(GiB) | peak PSS (GiB) | peak anonymous PSS (GiB) | caller's peak RSS (GiB) | PSS after (GiB) | anonymous "
        "PSS after (GiB) | load (1 min) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gib = 2**30
    for r in results:
        path = "in-process, in memory" if r["workers"] == 1 else "workers into the cache file"
        lines.append(
            f"| {r['train_images']:,} | {r['workers']} | {path} | {r['seconds']:.1f} | {r['images_per_s']:,.0f} | "
            f"{r['cpu_seconds']:.0f} | {r['images_per_cpu_s']:,.0f} | "
            f"{r['decoded_bytes'] / gib:.2f} | {r['peak_pss'] / gib:.2f} | {r['peak_anonymous'] / gib:.2f} | "
            f"{r['ru_maxrss'] / gib:.2f} | {r['pss_after'] / gib:.2f} | {r['anonymous_after'] / gib:.2f} | "
            f"{r['load']:.2f} |"
        )
    lines.append(f"- load average at end (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    table = "\n".join(lines)
    print()
    print(table)
    if cli.output_md:
        Path(cli.output_md).write_text(table + "\n")
    if cli.output_json:
        Path(cli.output_json).write_text(json.dumps({"command": command, "machine": header, "results": results}))


if __name__ == "__main__":
    main()
