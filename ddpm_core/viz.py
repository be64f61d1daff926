"""Pictures: sample grids as uint8 arrays (for PNG files and MLflow), and the report's
matplotlib figures (loss curves, per-class bars, grids side by side)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torchvision.utils import make_grid

from ddpm_core.data import to_uint8
from ddpm_core.evaluation import CLASS_BALANCE_GATE

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """(N, 1, H, W) images in [−1, 1] → one (rows·H, nrow·W) uint8 array, white on black."""
    grid = make_grid(images.float().cpu(), nrow=nrow, padding=padding, pad_value=-1.0)
    return to_uint8(grid[0]).numpy()


def class_rows_grid(images: torch.Tensor, labels: torch.Tensor, per_row: int, num_classes: int = 10) -> np.ndarray:
    """One row per class with the first `per_row` images of that class."""
    rows = [images[labels == c][:per_row] for c in range(num_classes)]
    if any(len(r) < per_row for r in rows):
        raise ValueError(f"class_rows_grid needs {per_row} images of each class")
    return image_grid(torch.cat(rows), nrow=per_row)


def _figure(width: float, height: float) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height), dpi=100, layout="constrained")


def loss_curves(curves: dict[str, pd.DataFrame]) -> Figure:
    """The training loss against the optimizer step, one line per model (frames with
    columns step, epoch, loss: reports/loss_<kind>.csv); dotted lines at epoch ends."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    for name, frame in curves.items():
        ax.plot(frame["step"], frame["loss"], lw=1, label=name, marker="o" if len(frame) < 3 else None)
    ends = list(next(iter(curves.values())).groupby("epoch")["step"].max()) if curves else []
    for step in ends[:-1]:
        ax.axvline(step, color="grey", lw=0.8, ls=":")
    ax.set(
        xlabel="optimizer step", ylabel="training loss (the objective, per sample)", title="Training loss", yscale="log"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def per_class_bars(per_class: dict[str, float], title: str, ylabel: str, reference: float | None = None) -> Figure:
    fig = _figure(6, 3)
    ax = fig.add_subplot()
    classes = list(per_class)
    values = [per_class[c] for c in classes]
    bars = ax.bar(classes, values, color="tab:blue")
    if max(len(c) for c in classes) > 2:  # class names rather than digits
        ax.tick_params(axis="x", labelrotation=40)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="tab:red", lw=1, ls="--")
    ax.set(xlabel="class", ylabel=ylabel, title=title, ylim=(0, max(1.0, max(values) * 1.15)))
    return fig


def grid_figure(
    panels: dict[str, np.ndarray], row_labels: dict[str, Sequence[str]] | None = None, padding: int = 2
) -> Figure:
    """Grids (uint8 arrays) side by side, each under its title; a panel named in
    `row_labels` gets one label per row of images on its left (its grid's `padding`)."""
    row_labels = row_labels or {}
    fig = _figure(4 * len(panels) + (1.2 if row_labels else 0), 4.3)
    for i, (title, grid) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, len(panels), i)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_frame_on(False)
        labels = row_labels.get(title)
        if labels:
            step = (grid.shape[0] - padding) / len(labels)
            ax.set_yticks([padding / 2 + step * (r + 0.5) for r in range(len(labels))], labels)
            ax.tick_params(axis="y", length=0)
        else:
            ax.set_yticks([])
    return fig


def guidance_sweep_figure(rows: list[dict], fid_floor: float, num_samples: int) -> Figure:
    """Conditional accuracy and FID against the guidance weight, side by side."""
    fig = _figure(9, 3.3)
    weights = [r["guidance"] for r in rows]
    acc, fid = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    acc.plot(weights, [r["cond_accuracy"] for r in rows], marker="o")
    if all("cond_accuracy_ci95" in r for r in rows):  # 95 % bootstrap intervals
        low, high = [r["cond_accuracy_ci95"]["low"] for r in rows], [r["cond_accuracy_ci95"]["high"] for r in rows]
        acc.fill_between(weights, low, high, alpha=0.25, lw=0)
    acc.set(
        xlabel="guidance weight w", ylabel="conditional accuracy", ylim=(0, 1.02), title="Accuracy (evaluator agrees)"
    )
    fid.plot(weights, [r["fid"] for r in rows], marker="o", color="tab:orange")
    if all("fid_ci95" in r for r in rows):
        low, high = [r["fid_ci95"]["low"] for r in rows], [r["fid_ci95"]["high"] for r in rows]
        fid.fill_between(weights, low, high, color="tab:orange", alpha=0.25, lw=0, label="95 % bootstrap interval")
    fid.axhline(fid_floor, color="tab:red", lw=1, ls="--", label=f"real-data floor ({fid_floor:.2f})")
    fid.set(
        xlabel="guidance weight w", ylabel="FID (classifier features)", title=f"FID, {num_samples} samples per weight"
    )
    fid.legend()
    for ax in (acc, fid):
        ax.grid(alpha=0.3)
    return fig


def autoguidance_sweep_figure(
    rows: list[dict], fid_floor: float, num_samples: int, fid_alt_floor: float | None = None
) -> Figure:
    """Unconditional samples against the autoguidance weight, side by side: FID over its
    real-data floor in each judge's space (rows' `fid`, and `fid_alt` with `fid_alt_floor`),
    and the largest class deviation in points (`max_class_deviation`, and
    `max_class_deviation_alt` where the rows have it) under a dashed line at the
    class-balance gate, CLASS_BALANCE_GATE."""
    fig = _figure(9, 3.3)
    weights = [r["autoguidance"] for r in rows]
    fid, spread = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    judges = [("", fid_floor, "first judge", "tab:orange")]
    if fid_alt_floor is not None and all("fid_alt" in r for r in rows):
        judges.append(("_alt", fid_alt_floor, "second judge", "tab:purple"))
    for s, floor, name, color in judges:
        fid.plot(
            weights, [r[f"fid{s}"] / floor for r in rows], marker="o", color=color, label=f"{name} (floor {floor:.2f})"
        )
        if all(f"fid{s}_ci95" in r for r in rows):  # 95 % bootstrap intervals
            low, high = (
                [r[f"fid{s}_ci95"]["low"] / floor for r in rows],
                [r[f"fid{s}_ci95"]["high"] / floor for r in rows],
            )
            fid.fill_between(weights, low, high, color=color, alpha=0.2, lw=0)
    fid.axhline(1.0, color="tab:red", lw=1, ls="--", label="real-data floor")
    fid.set(
        xlabel="autoguidance weight", ylabel="FID / real-data floor", title=f"FID, {num_samples} samples per weight"
    )
    fid.legend(fontsize=8)
    spread.plot(weights, [100 * r["max_class_deviation"] for r in rows], marker="o", label="first judge")
    if all("max_class_deviation_alt" in r for r in rows):
        spread.plot(
            weights, [100 * r["max_class_deviation_alt"] for r in rows], marker="s", ls=":", label="second judge"
        )
    gate = 100 * CLASS_BALANCE_GATE
    spread.axhline(gate, color="tab:red", lw=1, ls="--", label=f"class-balance gate ({gate:g} points)")
    top = max([gate, *(100 * r.get(k, 0.0) for r in rows for k in ("max_class_deviation", "max_class_deviation_alt"))])
    spread.set(
        xlabel="autoguidance weight",
        ylabel="largest |class share − 10 %| (points)",
        title="Class balance of the predicted digits",
        ylim=(0, 1.15 * top),
    )
    spread.legend(fontsize=8)
    for ax in (fid, spread):
        ax.grid(alpha=0.3)
    return fig


def nearest_pairs_figure(pairs: list[tuple[np.ndarray, np.ndarray, str]]) -> Figure:
    """Each generated image (uint8, H×W) above its nearest training image, one column per
    pair, captioned (e.g. with the model and the pixel distance)."""
    fig = _figure(1.2 * max(len(pairs), 1), 3.0)
    for column, (sample, nearest, caption) in enumerate(pairs):
        for row, (image, name) in enumerate(((sample, "sample"), (nearest, "nearest\ntraining image"))):
            ax = fig.add_subplot(2, len(pairs), row * len(pairs) + column + 1)
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(name, fontsize=8)
            if row == 1:
                ax.set_xlabel(caption, fontsize=7)
    return fig
