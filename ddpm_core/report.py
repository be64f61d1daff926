"""reports/report.md: what was run, what it scored, and with which software."""

from __future__ import annotations

from ddpm_core.data import DATASETS
from ddpm_core.evaluation import CLASS_BALANCE_GATE, autoguidance_sweep_rows, sweep_rows
from ddpm_core.prompts import class_labels


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ci(values: dict, key: str, digits: int = 3) -> str:
    """ " [low, high]" of `key`'s 95 % interval (`key_ci95`), or "" if it has none."""
    interval = values.get(f"{key}_ci95")
    return f" [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]" if interval else ""


def _pair(metrics: dict, name: str, digits: int = 3) -> str:
    """ "uncond [ci] / cond [ci]" of a per-model metric."""
    return " / ".join(
        f"{metrics[f'{name}_{kind}']:.{digits}f}{_ci(metrics, f'{name}_{kind}', digits)}" for kind in ("uncond", "cond")
    )


def _fidelity_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """KID, precision/recall and memorization (issue 17), when the metrics have them."""
    if "kid_cond" not in metrics:
        return []
    return [
        ("KID, unconditional / conditional", _pair(metrics, "kid", 4), f"real images: {metrics['kid_floor']:.4f} (unbiased: ≈ 0)"),
        ("precision, unconditional / conditional", _pair(metrics, "precision"), f"real images: {metrics['precision_floor']:.3f}; share of samples inside the real manifold (k = 3)"),
        ("recall, unconditional / conditional", _pair(metrics, "recall"), f"real images: {metrics['recall_floor']:.3f}; share of real digits inside the samples' manifold"),
        ("second judge: precision / recall, conditional", f"{metrics['precision_alt_cond']:.3f} / {metrics['recall_alt_cond']:.3f}", f"real images: {metrics['precision_alt_floor']:.3f} / {metrics['recall_alt_floor']:.3f}"),
        ("memorized, unconditional / conditional", _pair(metrics, "memorized"), f"nearest training image closer than {metrics['memorization_threshold']:.0f} (pixel L2): 1 % of held-out test digits are"),
        *_cas_rows(metrics),
    ]  # fmt: skip


def _cas_rows(metrics: dict) -> list[tuple[str, str, str]]:
    if "cas_accuracy" not in metrics:
        return []
    real = f"{metrics['cas_accuracy_real']:.4f}{_ci(metrics, 'cas_accuracy_real', 4)}"
    return [
        (
            "CAS: accuracy on real test digits of a classifier trained on generated ones",
            f"{metrics['cas_accuracy']:.4f}{_ci(metrics, 'cas_accuracy', 4)}",
            f"trained on {metrics['cas_samples']} real digits instead: {real}",
        )
    ]


def class_balance_verdict(deviation: float, deviation_alt: float | None = None) -> str:
    """Whether the unconditional model's class spread passes the 3-point gate, by each judge."""
    worst = max(deviation, deviation_alt if deviation_alt is not None else 0.0)
    judged = "both judges" if deviation_alt is not None else "the judge"
    if worst <= CLASS_BALANCE_GATE:
        return f"within the {100 * CLASS_BALANCE_GATE:g}-point gate by {judged}"
    return f"ABOVE the {100 * CLASS_BALANCE_GATE:g}-point gate ({100 * worst:.1f} points)"


def _sweep_section(metrics: dict) -> list[str]:
    sweep = metrics.get("guidance_sweep")
    if not sweep:
        return []
    floor = sweep["fid_floor"]
    rows = [
        (
            f"{r['guidance']:g}", f"{r['cond_accuracy']:.4f}{_ci(r, 'cond_accuracy')}",
            f"{r['fid']:.3f}{_ci(r, 'fid')}", f"{r['fid'] / floor:.2f}×",
        )
        for r in sweep_rows(metrics)
    ]  # fmt: skip
    return [
        "### Guidance sweep",
        f"Conditional samples at each classifier-free guidance weight, {sweep['num_samples']} per weight "
        f"(FID floor for that many real images: {floor:.3f}).",
        _table(("guidance", "conditional accuracy", "FID", "FID / floor"), rows),
    ]


def _autoguidance_section(metrics: dict, params: dict) -> list[str]:
    """FID over the floor in both judges' spaces and the class spread of the unconditional
    model at each autoguidance weight, and the weight its samples above were drawn at
    (`sample.autoguidance_uncond` of the flat `params`, where they hold it)."""
    sweep = metrics.get("autoguidance_sweep")
    if not sweep:
        return []
    floor, floor_alt = sweep["fid_floor"], sweep.get("fid_alt_floor")
    rows = []
    for r in autoguidance_sweep_rows(metrics):
        alt = f"{r['fid_alt']:.3f}{_ci(r, 'fid_alt')}" if "fid_alt" in r else "–"
        alt_ratio = f"{r['fid_alt'] / floor_alt:.2f}×" if "fid_alt" in r and floor_alt else "–"
        spread = f"{100 * r['max_class_deviation']:.1f}"
        if "max_class_deviation_alt" in r:
            spread += f" / {100 * r['max_class_deviation_alt']:.1f}"
        rows.append(
            (
                f"{r['autoguidance']:g}",
                f"{r['fid']:.3f}{_ci(r, 'fid')}",
                f"{r['fid'] / floor:.2f}×",
                alt,
                alt_ratio,
                spread,
            )
        )
    floors = f"{floor:.3f}" + (f", second judge {floor_alt:.3f}" if floor_alt else "")
    text = (
        f"Unconditional samples at each autoguidance weight (guide: an earlier EMA snapshot of the same training; "
        f"1 = the model alone), {sweep['num_samples']} per weight (FID floor for that many real images: {floors}). "
        "Class deviation: the largest distance of a predicted class's share from 10 %, in points (first / second judge)."
    )
    default = params.get("sample.autoguidance_uncond")
    if default is not None:
        text += f" The unconditional samples above were drawn at `sample.autoguidance_uncond` = {float(default):g}."
    header = ("autoguidance", "FID", "FID / floor", "second judge: FID", "FID / its floor", "class deviation (points)")
    return ["### Autoguidance sweep", text, _table(header, rows)]


def render_report(
    params: dict,
    metrics: dict,
    evaluator_accuracy: float,
    training: dict[str, dict],
    figures: dict[str, str],
    environment: dict[str, str],
) -> str:
    """The report as Markdown. `figures` maps captions to paths relative to the report."""
    floor = metrics["fid_floor"]
    n = metrics["num_samples"]
    dataset = params.get("data.dataset", "mnist")
    names = class_labels(dataset)
    results = [
        (
            "FID, unconditional samples",
            f"{metrics['fid_uncond']:.3f}{_ci(metrics, 'fid_uncond')}",
            f"{metrics['fid_uncond_over_floor']:.2f}× floor",
        ),
        (
            "FID, conditional samples",
            f"{metrics['fid_cond']:.3f}{_ci(metrics, 'fid_cond')}",
            f"{metrics['fid_cond_over_floor']:.2f}× floor",
        ),
        (f"FID floor ({n} real training images)", f"{floor:.3f}", "what a perfect model scores at this N"),
        (
            "second judge: FID unconditional / conditional",
            f"{metrics['fid_alt_uncond']:.3f} / {metrics['fid_alt_cond']:.3f}",
            f"{metrics['fid_alt_uncond_over_floor']:.2f}× / {metrics['fid_alt_cond_over_floor']:.2f}× its floor {metrics['fid_alt_floor']:.3f}",
        ),
        ("second judge: conditional accuracy", f"{metrics['cond_accuracy_alt']:.4f}", "another architecture and seed"),
        (
            "conditional accuracy",
            f"{metrics['cond_accuracy']:.4f}{_ci(metrics, 'cond_accuracy', 4)}",
            "evaluator agrees with the requested class",
        ),
        *_fidelity_rows(metrics),
        (
            "unconditional: largest class deviation",
            f"{metrics['uncond_max_class_deviation']:.4f}",
            "largest distance of a class's share from 0.1; "
            + class_balance_verdict(
                metrics["uncond_max_class_deviation"], metrics.get("uncond_max_class_deviation_alt")
            ),
        ),
        (
            "exact-zero pixels, unconditional / conditional",
            f"{metrics['zero_pixels_uncond']:.3f} / {metrics['zero_pixels_cond']:.3f}",
            f"real test images: {metrics['zero_pixels_real']:.3f}",
        ),
        (
            "pixel-histogram TV distance, unconditional / conditional",
            f"{metrics['pixel_hist_tv_uncond']:.3f} / {metrics['pixel_hist_tv_cond']:.3f}",
            "share of pixels whose value would have to change; 0 = the real histogram",
        ),
        (f"evaluator accuracy ({DATASETS[dataset].title} test)", f"{evaluator_accuracy:.4f}", "the judge itself"),
    ]
    per_class = [
        (names[int(c)], f"{metrics['cond_accuracy_per_class'][c]:.3f}", f"{metrics['uncond_class_fractions'][c]:.3f}")
        for c in metrics["cond_accuracy_per_class"]
    ]
    train_rows = [
        (name, f"{t['final_loss']:.4f}", f"{t['images_per_s']:.0f}", f"{t['train_seconds']:.0f}")
        for name, t in training.items()
    ]
    sections = [
        "# ddpm-mnist report",
        _table(("", ""), list(environment.items())),
        "## Results",
        f"FID is computed in the 128-d feature space of the project's {DATASETS[dataset].title} classifier against "
        f"the 10,000 test images, for {n} generated images per model.",
        "Brackets: 95 % bootstrap intervals over the samples (docs/metrics.md).",
        _table(("metric", "value", "note"), results),
        "### Per class",
        _table(("class", "conditional accuracy", "unconditional fraction"), per_class),
        *_sweep_section(metrics),
        *_autoguidance_section(metrics, params),
        "## Training",
        _table(("model", "final loss", "images/s", "seconds"), train_rows),
        "## Figures",
        "\n\n".join(f"**{caption}**\n\n![{caption}]({path})" for caption, path in figures.items()),
        "## Params",
        _table(("key", "value"), sorted(params.items())),
    ]
    return "\n\n".join(sections) + "\n"
