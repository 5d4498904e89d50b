"""The README's main job end to end (marker `slow`: about a minute on 2 CPU cores; `pytest -m slow` runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_reaches_95_percent_on_digits(tmp_path):
    config = json.loads((ROOT / "scripts" / "configs" / "demo_digits.json").read_text())
    config["output_dir"] = str(tmp_path / "demo")
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "demo" / "all_results.json").read_text())
    assert results["test_accuracy"] >= 0.95
