"""PNG plots of a run's training curves, read from the Trainer's `log_history`."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

# Each figure: file name, title, y label, and the logged series it draws (key, legend label).
FIGURES = (
    (
        "losses.png",
        "Losses",
        "loss",
        (
            ("clean_loss", "cross-entropy at w"),
            ("loss", "cross-entropy at w + e (update loss)"),
            ("perturbation_loss", "perturbation loss"),
            ("eval_loss", "test cross-entropy"),
        ),
    ),
    (
        "perturbation.png",
        "Perturbation",
        "L2 norm",
        (
            ("perturbation_grad_norm", "perturbation gradient norm ||g||"),
            ("perturbation_norm", "perturbation norm ||e||"),
        ),
    ),
    (
        "accuracy.png",
        "Accuracy",
        "accuracy",
        (("clean_accuracy", "train (augmented batches, at w)"), ("eval_accuracy", "test")),
    ),
)


def plot_training_curves(log_history: list[dict[str, Any]], output_dir: str | Path) -> list[Path]:
    """Draws the losses, perturbation norms and accuracies logged during a run.

    Args:
        log_history: `trainer.state.log_history`.
        output_dir: folder the PNG files go to (created if needed).

    Returns:
        The paths of the figures written; a figure none of whose series was logged is skipped.
    """
    output_dir = Path(output_dir)
    written = []
    for file_name, title, y_label, series in FIGURES:
        curves = []
        for key, label in series:
            points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
            if points:
                curves.append((label, points))
        if not curves:
            continue
        figure, axes = plt.subplots(figsize=(6.4, 4.0))
        for label, points in curves:
            steps, values = zip(*points)
            axes.plot(steps, values, label=label, marker="o" if len(points) < 30 else None, markersize=3)
        axes.set(title=title, xlabel="optimizer step", ylabel=y_label)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / file_name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written
