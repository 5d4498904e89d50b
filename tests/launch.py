"""`accelerate launch` command lines for the tests' multi-process runs: two CPU processes, each launch on a port of its
own (test files that run in parallel, pytest -n 2, would otherwise both take accelerate's default 29500)."""

import sys

from local_hub import free_port


def two_process_launch(*options: str) -> list[str]:
    """`python -m accelerate.commands.launch` on two processes of one machine, without mixed precision or dynamo, on a
    port free right now, followed by `options` (further launch options, then the script and its arguments)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, *options]
