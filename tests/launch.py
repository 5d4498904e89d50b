"""`accelerate launch` command lines for the tests' multi-process runs, each on a port of its own: test files that
run in parallel (pytest -n 2) would otherwise both take accelerate's default 29500."""

import sys

from local_hub import free_port


def accelerate_launch(*options: str) -> list[str]:
    """`python -m accelerate.commands.launch --main_process_port PORT *options` with a port free right now."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *options]
