"""Showing a job while it runs: a tqdm bar (steps, loss) in a terminal or a notebook, and
in Jupyter, when matplotlib is installed, a live chart of the loss. Nothing here is
needed to follow a job; without a terminal or a notebook it stays quiet."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython with a kernel attached)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except AttributeError:
        return False
    return shell is not None and hasattr(shell, "kernel")


class LossChart:
    """A matplotlib chart of train and validation loss, redrawn in place in a notebook.
    ``None`` from ``create`` where there is no notebook or no matplotlib."""

    def __init__(self, display: Any, figure: Any, axes: Any) -> None:
        self.display, self.figure, self.axes = display, figure, axes
        self.handle = display.display(figure, display_id=True)
        self.drawn = 0

    @classmethod
    def create(cls) -> LossChart | None:
        if not in_notebook():
            return None
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
            from IPython import display
        except ImportError:
            return None
        figure, axes = plt.subplots(figsize=(6, 3))
        plt.close(figure)  # shown through the display handle only, not twice
        return cls(display, figure, axes)

    def update(self, history: list[dict[str, Any]]) -> None:
        if len(history) == self.drawn:
            return
        self.drawn = len(history)
        self.axes.clear()
        for key, label in (("train_loss", "train"), ("validation_loss", "validation")):
            points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
            if points:
                self.axes.plot(*zip(*points, strict=True), label=label, marker=".")
        self.axes.set_xlabel("step")
        self.axes.set_ylabel("loss")
        if history:
            self.axes.legend()
        self.handle.update(self.figure)


class JobProgress:
    """A bar for a fine-tune (steps) or another job (percent), updated from its state."""

    def __init__(self, *, label: str, total: float | None, unit: str, show: bool) -> None:
        self.bar = tqdm(total=total, desc=label, unit=unit, disable=not show, leave=True)
        self.chart = LossChart.create() if show else None

    def finetune(self, job: dict[str, Any]) -> None:
        if job.get("max_steps") and self.bar.total != job["max_steps"]:
            self.bar.total = job["max_steps"]
        self.bar.n = job.get("step") or 0
        postfix = {"state": job.get("state")}
        if job.get("train_loss") is not None:
            postfix["loss"] = f"{job['train_loss']:.4f}"
        if job.get("validation_loss") is not None:
            postfix["val_loss"] = f"{job['validation_loss']:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()
        if self.chart is not None:
            self.chart.update(job.get("history") or [])

    def percent(self, job: dict[str, Any]) -> None:
        self.bar.n = job.get("progress") or 0  # percent
        self.bar.set_postfix({"state": job.get("state")}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
