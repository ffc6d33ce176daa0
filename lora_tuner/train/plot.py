"""loss.png: train and validation loss against step (validation from step 0, before training)."""
from pathlib import Path


def plot_loss(rows: list[dict], png: Path, title: str) -> None:
    # A Figure of its own, not pyplot: pyplot would switch the process's backend and keep global figure state.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            axes.plot(*zip(*points), marker="." if key == "eval_loss" else None, label=label)
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
