"""Training curves from the trainer's log history, saved as JSON and as a PNG (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path


def metric_series(log_history: list[dict], keep) -> dict[str, list[list[float]]]:
    """{metric: [[step, value], ...]} for the logged numeric metrics `keep(name)` accepts."""
    series: dict[str, list[list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for name, value in entry.items():
            if name != "step" and keep(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(name, []).append([step, float(value)])
    return series


def save_curves(log_history: list[dict], out_dir: str | Path, name: str, keep) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.png`: one line per metric against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = metric_series(log_history, keep)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(series, indent=1))
    figure, axes = plt.subplots(figsize=(7, 4))
    for metric, points in sorted(series.items()):
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=metric)
    axes.set_xlabel("step")
    axes.set_title(name.replace("_", " "))
    if series:
        axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    png_path = out / f"{name}.png"
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return json_path, png_path


def is_reward_metric(name: str) -> bool:
    return (name == "reward" or name.startswith("rewards/")) and not name.endswith("/std")


def is_loss_metric(name: str) -> bool:
    return name in ("loss", "mean_token_accuracy", "learning_rate", "grad_norm")
