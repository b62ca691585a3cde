"""Learning-rate sweeps: each method at a small grid of learning rates on the same token budget, then
more seeds at its best point, so that methods are compared tuned rather than at their papers' rates.

For each method, the grid is ``preset.lr · 10**offset`` for each of ``offsets``. The default
:data:`DEFAULT_OFFSETS` is 5 points over 1.5 decades, centred on the preset. Each grid point is run with
the first ``grid_seeds`` seeds (default 1). The best learning rate is the lowest mean final eval loss;
it is then run with more seeds, up to ``seeds`` (the model init and the batch order change with the
seed). The result per method is the mean and
sample standard deviation of the final eval loss over those seeds, the tokens per second (mean of the
best point's runs) and the optimizer-state bytes. A best point at the edge of the grid is flagged:
the optimum may lie outside it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write
from ..data import TokenStream
from ..models import LlamaConfig
from .methods import MethodPreset
from .pretrain import TrainSettings, pretrain

__all__ = ["DEFAULT_OFFSETS", "SWEEP_FIELDS", "format_sweep_table", "mean_std", "sweep_learning_rates", "write_sweep_plot"]

#: The rates a sweep can vary (``MethodPreset`` fields).
SWEEP_FIELDS: tuple[str, ...] = ("lr", "other_lr")
#: log10 offsets of the grid around each preset's lr: 5 points over 1.5 decades.
DEFAULT_OFFSETS: tuple[float, ...] = (-0.75, -0.375, 0.0, 0.375, 0.75)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the final losses of a method's seeds."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def sweep_learning_rates(
    model_config: LlamaConfig,
    presets: Mapping[str, MethodPreset],
    stream: TokenStream,
    settings: TrainSettings,
    methods: Sequence[str],
    *,
    offsets: Sequence[float] = DEFAULT_OFFSETS,
    seeds: int = 2,
    grid_seeds: int = 1,
    field: str = "lr",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Sweep every method in ``methods`` (module docstring). ``settings`` gives the budget (steps, batch,
    sequence length) and the first seed; its ``seed + k`` are the further seeds. ``grid_seeds``: seeds
    run at every grid point, the best point being the lowest mean over them (one seed picks the luckiest
    point as often as the best one: on ``tiny`` neighbouring points of one seed differ by up to 0.1);
    the best point then gets ``seeds`` seeds in all (``max(seeds, grid_seeds)``). ``field``: the rate
    swept, ``lr`` or ``other_lr`` (the rate of the parameters outside the target layers, centred on the
    preset's ``other_lr``, or its ``lr`` where unset); the report's ``best_lr`` / ``preset_lr`` are that
    rate's."""
    if field not in SWEEP_FIELDS:
        raise ValueError(f"field ({field!r}) must be one of {', '.join(SWEEP_FIELDS)}")
    if seeds < 1:
        raise ValueError(f"seeds ({seeds}) must be >= 1")
    if grid_seeds < 1:
        raise ValueError(f"grid_seeds ({grid_seeds}) must be >= 1")
    if not offsets or len(set(offsets)) != len(offsets) or not all(math.isfinite(o) for o in offsets):
        raise ValueError(f"offsets ({list(offsets)}) must be distinct finite numbers (log10 factors of the preset lr)")
    unknown = [method for method in methods if method not in presets]
    if unknown:
        raise ValueError(f"methods {unknown} have no preset; presets are given for {sorted(presets)}")
    seeds = max(seeds, grid_seeds)
    runs_total = len(methods) * (len(offsets) * grid_seeds + seeds - grid_seeds)
    done = 0
    report: dict[str, Any] = {"field": field, "offsets": list(offsets), "seeds": [settings.seed + k for k in range(seeds)],
                              "grid_seeds": [settings.seed + k for k in range(grid_seeds)],
                              "settings": dataclasses.asdict(settings), "methods": {}}

    def run(method: str, lr: float, seed: int) -> dict[str, Any]:
        nonlocal done
        done += 1
        log(f"sweep run {done} of {runs_total}: {method} {field} {lr:.3g} seed {seed}")
        changes: dict[str, Any] = {field: lr}
        return pretrain(model_config, dataclasses.replace(presets[method], **changes), stream,
                        dataclasses.replace(settings, seed=seed), log=_quiet(log))

    for method in methods:
        base = presets[method]
        centre = base.lr if field == "lr" or base.other_lr is None else base.other_lr
        grid = []
        for offset in sorted(offsets):
            lr = centre * 10.0**offset
            results = [run(method, lr, settings.seed + k) for k in range(grid_seeds)]
            grid.append({"lr": lr, "final_eval_loss": mean_std([r["final_eval_loss"] for r in results])[0],
                         "seed_losses": [r["final_eval_loss"] for r in results],
                         "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in results),
                         "optimizer_state_bytes": results[0]["optimizer_state_bytes"]})
        best = min(range(len(grid)), key=lambda k: grid[k]["final_eval_loss"])
        best_lr = grid[best]["lr"]
        losses = list(grid[best]["seed_losses"])
        rates = [grid[best]["tokens_per_s"]] * grid_seeds
        for k in range(grid_seeds, seeds):
            result = run(method, best_lr, settings.seed + k)
            losses.append(result["final_eval_loss"])
            rates.append(result["tokens_per_s"])
        mean, std = mean_std(losses)
        report["methods"][method] = {
            "grid": grid,
            "best_lr": best_lr,
            "best_at_edge": best in (0, len(grid) - 1),
            "preset_lr": centre,
            "seed_losses": losses,
            "mean_loss": mean,
            "std_loss": std,
            "tokens_per_s": statistics.fmean(rates),
            "optimizer_state_bytes": grid[best]["optimizer_state_bytes"],
        }
    return report


def _quiet(log: Callable[[str], None]) -> Callable[[str], None]:
    """Only each run's final line: a sweep is many runs."""
    return lambda line: log(line) if "final eval loss" in line else None


def format_sweep_table(report: Mapping[str, Any]) -> str:
    """One row per method, best first: best lr (and the preset's), mean ± std of the final eval loss over
    the seeds, tokens/s, state MiB."""
    rows = sorted(report["methods"].items(), key=lambda item: item[1]["mean_loss"])
    field = report.get("field", "lr")
    header = (f"{'method':10s} {'best ' + field:>12s} {'preset':>9s}  {'final eval loss (mean ± std, n)':>32s} "
              f"{'tokens/s':>9s} {'state MiB':>9s}")
    lines = [header, "-" * len(header)]
    for method, entry in rows:
        edge = " (grid edge)" if entry["best_at_edge"] else ""
        loss = f"{entry['mean_loss']:.4f} ± {entry['std_loss']:.4f}, {len(entry['seed_losses'])}"
        lines.append(f"{method:10s} {entry['best_lr']:12.3g} {entry['preset_lr']:9.3g}  {loss:>32s} "
                     f"{entry['tokens_per_s']:9,.0f} {entry['optimizer_state_bytes'] / 2**20:9.2f}{edge}")
    return "\n".join(lines)


def write_sweep_plot(report: Mapping[str, Any], path: Path) -> Path:
    """Final eval loss against lr (log scale), one line per method, the best point's seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for method, entry in report["methods"].items():
        lrs = [point["lr"] for point in entry["grid"]]
        losses = [point["final_eval_loss"] for point in entry["grid"]]
        line = axis.plot(lrs, losses, "o-", label=method)[0]
        axis.errorbar([entry["best_lr"]], [entry["mean_loss"]], yerr=[entry["std_loss"]], fmt="s",
                      color=line.get_color(), capsize=4)
    axis.set_xscale("log")
    axis.set_xlabel("peak learning rate" if report.get("field", "lr") == "lr" else "peak lr of the non-target parameters")
    axis.set_ylabel("final eval loss (nats)")
    axis.set_title("Learning-rate sweep (square: best lr, mean ± std over seeds)")
    axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    return path
