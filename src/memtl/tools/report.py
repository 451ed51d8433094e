"""``memtl report``: the paper-style results of a sweep, from its ``results.json`` files.

    memtl report multirun/minilm_accuracy            # -> multirun/minilm_accuracy/report/
    memtl report multirun/2026-11-23_12-00-00 --out report --wandb
    memtl report multirun/minilm_accuracy multirun/minilm_siamese --out report   # sweeps pooled

Collects every ``results.json`` under the folders (recursively) and writes into ``--out``
(default ``<folder>/report``; required with several folders):

* ``report.md``  - the table as papers show it: one row per method, one column per task,
  the best dev value of the task's main metric as mean ± std over seeds, for the best
  configuration of each method (hyper-parameters other than the seed, chosen by the mean
  dev metric, as model selection on dev does); then peak step memory per method and task
  with its ratio to full fine-tuning, the chosen configurations, and every run that did
  not complete;
* ``pareto.png`` - best dev metric against peak step memory, one panel per task, the
  Pareto front (more accuracy for less memory) drawn through the methods on it;
* ``runs.csv``   - one row per run, everything the tables are built from;
* ``report.json``- the tables as data.

With ``--wandb`` the same tables and figure go to a W&B run (job type ``report``, grouped
by the folder's name); ``WANDB_MODE`` decides online or offline as for training.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

from memtl.cli import ArgumentParser
from memtl.errors import ConfigError
from memtl.methods import method_defaults

METHOD_ORDER = ["full", "full+ckpt", "lora", "lora+ckpt", "meft1", "meft2", "meft3", "sherl", "sherl+keep", "sherl+ckpt", "sherl+paper", "head"]
# keys that make two runs "the same configuration" apart from the seed
SETUP_KEYS = ["backbone", "method_options", "lr", "batch_size", "epochs", "max_length", "precision", "protocol"]


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


def _run_name(path: Path, root: Path, several: bool) -> str:
    rel = str(path.parent.relative_to(root))
    # pooled sweeps reuse run names (0, 1, ...): prefix each with its folder's name
    return f"{root.name}/{rel}" if several else (rel or ".")


def load_runs(roots: Path | list[Path]) -> tuple[pd.DataFrame, list[dict]]:
    """One row per ``results.json`` under ``roots`` (one folder or several, pooled);
    files that cannot be read come back separately (path, error) so that nothing is
    dropped silently."""
    roots = [roots] if isinstance(roots, Path) else list(roots)
    several = len(roots) > 1
    rows, unreadable = [], []
    paths = [(path, root) for root in roots for path in sorted(root.rglob("results.json"))]
    for path, root in paths:
        try:
            r = json.loads(path.read_text())
            cfg = r.get("config") or {}
            method_cfg = dict(cfg.get("method") or {})
        except (OSError, ValueError, AttributeError) as e:
            unreadable.append({"run": _run_name(path, root, several), "error": str(e).splitlines()[0]})
            continue
        method = _get(r, "run", "method", default=method_cfg.get("name"))
        label = f"{method}+ckpt" if method_cfg.get("gradient_checkpointing") else method
        # options at the method's defaults are left out, so that a run from before an option
        # existed (key absent) pools with later runs that leave it at its default. Runs record
        # their options resolved for the backbone with the defaults there (an explicit value
        # equal to the family's default is the default); older runs only have the config
        recorded = r.get("method") or {}
        if recorded.get("options") is not None and recorded.get("defaults") is not None:
            options = {k: v for k, v in recorded["options"].items() if recorded["defaults"].get(k, v) != v}
        else:
            defaults = method_defaults(str(method_cfg.get("name")))
            options = {k: v for k, v in method_cfg.items()
                       if k not in ("name", "lr") and v is not None and not (k in defaults and defaults[k] == v)}
        trainable, total = _get(r, "params", "trainable"), _get(r, "params", "total")
        rows.append({
            "run": _run_name(path, root, several),
            "status": r.get("status"),
            "label": label,
            "backbone": _get(r, "run", "backbone", default=_get(cfg, "backbone", "name")),
            "task": _get(r, "run", "task", default=_get(cfg, "task", "name")),
            "seed": _get(r, "run", "seed", default=cfg.get("seed")),
            "metric": _get(r, "best", "metric", default=_get(cfg, "task", "main_metric")),
            "best": _get(r, "best", "value"),
            "best_epoch": _get(r, "best", "epoch"),
            # what always predicting the majority class scores on the same dev split
            "baseline": _get(r, "baseline", "metrics", _get(r, "best", "metric", default="") or ""),
            "lr": _get(cfg, "optim", "lr"),
            "batch_size": _get(cfg, "data", "batch_size"),
            "epochs": _get(cfg, "trainer", "max_epochs"),
            "max_length": _get(cfg, "data", "max_length"),
            "precision": str(_get(cfg, "trainer", "precision", default="")),
            "protocol": _get(cfg, "data", "protocol", default="dev"),
            "pair_encoding": _get(cfg, "data", "pair_encoding", default="cross"),
            "method_options": json.dumps(options, sort_keys=True),
            "trainable": trainable,
            "total": total,
            "trainable_%": 100 * trainable / total if trainable and total else None,
            "peak_step_mib": _get(r, "memory", "peak_step_mib"),
            "saved_mib": _get(r, "memory", "saved_tensor_mib"),
            "step_time_s": _get(r, "throughput", "step_time_s"),
            "wall_time_s": r.get("wall_time_s"),
            "error": (str(r.get("error") or "").splitlines() or [""])[0],
        })
    runs = pd.DataFrame(rows)
    if not runs.empty:  # a hand-edited or foreign results.json: a non-number is no baseline
        runs["baseline"] = pd.to_numeric(runs["baseline"], errors="coerce")
        # pair_encoding named only where it is not the default, so older setups keep their names
        runs["setup"] = [", ".join(f"{k}={row[k]}" for k in SETUP_KEYS)
                         + ("" if row["pair_encoding"] == "cross" else f", pair_encoding={row['pair_encoding']}")
                         for _, row in runs.iterrows()]
    return runs, unreadable


def _order(labels) -> list[str]:
    return sorted(labels, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def select_configs(done: pd.DataFrame, min_seeds: int = 1) -> pd.DataFrame:
    """Per backbone × task × method: the configuration with the best mean dev metric over
    its seeds (ties: more seeds, then fewer trainable parameters, then the setup's name). One row per choice with mean, std, n.
    ``min_seeds``: only configurations run with at least that many seeds compete (a grid
    searched on one seed, the winner re-run on more: the re-run is what is reported);
    where a method has none, all of its configurations do."""
    per_setup = (done.dropna(subset=["best"])
                 .groupby(["backbone", "task", "metric", "label", "setup"], sort=False)
                 .agg(mean=("best", "mean"), std=("best", "std"), n=("best", "size"),
                      seeds=("seed", lambda s: sorted(s.tolist())), peak_step_mib=("peak_step_mib", "mean"),
                      step_time_s=("step_time_s", "mean"), trainable=("trainable", "first"),
                      trainable_pct=("trainable_%", "first"), lr=("lr", "first"))
                 .reset_index())
    per_setup["configs_tried"] = per_setup.groupby(["backbone", "task", "label"])["setup"].transform("size")
    enough = per_setup["n"] >= min_seeds
    any_enough = enough.groupby([per_setup["backbone"], per_setup["task"], per_setup["label"]]).transform("any")
    per_setup = per_setup[enough | ~any_enough]
    # ties (equal mean and seed count): fewer trainable parameters, then the setup's name -
    # the same choice whatever order the folders were read in
    per_setup = per_setup.sort_values(["mean", "n", "trainable", "setup"], ascending=[False, False, True, True],
                                      kind="mergesort")
    return per_setup.groupby(["backbone", "task", "label"], sort=False).head(1).reset_index(drop=True)


def _cell(mean, std, n, scale):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    if n > 1:
        return f"{scale * mean:.1f} ± {scale * std:.1f}"
    return f"{scale * mean:.1f}"


def _markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    align = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(df.columns))) + "|"
    body = ["| " + " | ".join("" if (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "/")
                              for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([header, align, *body])


def build_tables(runs: pd.DataFrame, scale: float = 100.0, min_seeds: int = 1) -> dict:
    done = runs[runs["status"] == "completed"] if not runs.empty else runs
    if done.empty:
        return {"chosen": pd.DataFrame(), "scores": pd.DataFrame(), "memory": pd.DataFrame()}
    chosen = select_configs(done, min_seeds)
    chosen["column"] = chosen["task"] + (" (" + chosen["backbone"] + ")" if chosen["backbone"].nunique() > 1 else "")
    columns = list(dict.fromkeys(chosen.sort_values(["backbone", "task"])["column"]))
    methods = _order(chosen["label"].unique())

    scores = pd.DataFrame({"method": methods})
    for col in columns:
        sub = chosen[chosen["column"] == col].set_index("label")
        metric = sub["metric"].iloc[0]
        scores[f"{col} {metric}"] = [_cell(sub.at[m, "mean"], sub.at[m, "std"], sub.at[m, "n"], scale)
                                     if m in sub.index else "" for m in methods]
    means = chosen.pivot_table(index="label", columns="column", values="mean")
    scores["avg"] = [f"{scale * means.loc[m].mean():.1f}" if m in means.index and means.loc[m].notna().all()
                     and len(means.columns) == len(columns) else "" for m in methods]
    scores["trainable %"] = [f"{chosen[chosen['label'] == m]['trainable_pct'].iloc[0]:.2f}" for m in methods]
    floor = majority_scores(done, chosen)
    if floor:  # the floor every method has to clear, in the same units
        scores.loc[len(scores)] = ["majority class", *[f"{scale * floor[c]:.1f}" if c in floor else ""
                                                       for c in columns], "", ""]

    memory = pd.DataFrame({"method": methods})
    for col in columns:
        sub = chosen[chosen["column"] == col].set_index("label")
        full = sub.at["full", "peak_step_mib"] if "full" in sub.index else None
        memory[f"{col} peak MiB"] = [f"{sub.at[m, 'peak_step_mib']:.0f}" if m in sub.index and
                                     pd.notna(sub.at[m, "peak_step_mib"]) else "" for m in methods]
        memory[f"{col} / full"] = [f"{sub.at[m, 'peak_step_mib'] / full:.3f}" if full and m in sub.index and
                                   pd.notna(sub.at[m, "peak_step_mib"]) else "" for m in methods]
    return {"chosen": chosen, "scores": scores, "memory": memory, "floor": floor}


def majority_scores(done: pd.DataFrame, chosen: pd.DataFrame) -> dict[str, float]:
    """Per table column: the majority-class score of its dev split, read from its runs'
    ``results.json`` (``baseline``); columns whose runs predate it are left out, and so are
    columns whose runs disagree (different dev rows: ``max_eval_samples``, protocol)."""
    if "baseline" not in done or chosen.empty:
        return {}
    column_of = chosen.drop_duplicates(["backbone", "task"]).set_index(["backbone", "task"])["column"]
    out = {}
    for (backbone, task), g in done.dropna(subset=["baseline"]).groupby(["backbone", "task"]):
        if (backbone, task) in column_of.index and g["baseline"].round(6).nunique() == 1:
            out[column_of[(backbone, task)]] = float(g["baseline"].iloc[0])
    return out


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (memory, score, label) not beaten by another with less-or-equal memory and
    a higher-or-equal score; sorted by memory."""
    front, best = [], -math.inf
    for mem, score, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((mem, score, label))
            best = score
    return front


def label_offsets(xy: list[tuple[float, float]], width: float = 0.14, height: float = 0.045,
                  step: float = 11.0) -> list[tuple[float, float]]:
    """Text offsets (points) for the labels of markers at axes-fraction positions ``xy``: each
    label (a box ``width`` × ``height`` above its marker, to the right, else to the left:
    negative x offset, right-aligned text) goes on the first rung, ``step`` points apart
    (0, +1, −1, +2, …), where it overlaps no label already placed and covers no other marker."""
    marker = 0.012  # marker radius, axes fraction

    def clear(i, x0, y0):
        if any(x0 < px + width and px < x0 + width and y0 < py + height and py < y0 + height for px, py in placed):
            return False
        return not any(j != i and x0 - marker <= mx <= x0 + width + marker and y0 - marker <= my <= y0 + height + marker
                       for j, (mx, my) in enumerate(xy))

    placed: list[tuple[float, float]] = []  # lower-left corners of the label boxes
    offsets = []
    for i, (x, y) in enumerate(xy):
        choice = None
        for k in range(0, 2 * len(xy) + 3):
            shift = (k + 1) // 2 * (1 if k % 2 else -1)  # 0, +1, -1, +2, -2, ...
            dy = 4 + step * shift
            y0 = y + dy / 250  # ~250 points per axes height in these figures
            for dx, x0 in ((5.0, x), (-5.0, x - width)):
                if clear(i, x0, y0):
                    choice = (dx, dy, x0, y0)
                    break
            if choice:
                break
        dx, dy, x0, y0 = choice or (5.0, 4.0, x, y + 4 / 250)
        placed.append((x0, y0))
        offsets.append((dx, dy))
    return offsets


def plot_pareto(chosen: pd.DataFrame, path: Path, scale: float = 100.0,
                floor: dict[str, float] | None = None) -> Path | None:
    from matplotlib.figure import Figure

    pts = chosen.dropna(subset=["peak_step_mib", "mean"])
    if pts.empty:
        return None
    panels = list(pts.groupby("column", sort=True))
    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    for i, (column, g) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        rows = list(g.itertuples())
        points = [(r.peak_step_mib, scale * r.mean, r.label) for r in rows]
        for r, (mem, score, label) in zip(rows, points):  # one colour per method, the same in every panel
            color = f"C{METHOD_ORDER.index(label) % 10}" if label in METHOD_ORDER else "gray"
            err = scale * r.std if r.n > 1 else None  # ± std over seeds
            ax.errorbar(mem, score, yerr=err, fmt="o", markersize=7, color=color, markeredgecolor="black",
                        markeredgewidth=0.5, ecolor=color, elinewidth=1, capsize=3, zorder=3)
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", linestyle="--", linewidth=1,
                label="Pareto front", zorder=2)
        if floor and column in floor:
            ax.axhline(scale * floor[column], color="gray", linestyle=":", linewidth=1, label="majority class")
        ax.set_xlim(0, max(p[0] for p in points) * 1.2)
        lo, hi = ax.get_ylim()
        xy = [(mem / ax.get_xlim()[1], (score - lo) / (hi - lo)) for mem, score, _ in points]
        for r, (mem, score, label), off in zip(rows, points, label_offsets(xy)):
            text = f"{label} ({r.n} seeds)" if r.n > 1 else label
            ax.annotate(text, (mem, score), textcoords="offset points", xytext=off, fontsize=8,
                        ha="left" if off[0] > 0 else "right")
        ax.set_xlabel("peak step memory (MiB)")
        ax.set_ylabel(f"best dev {g['metric'].iloc[0]} (×{scale:g}); bars: ± std over seeds")
        ax.set_title(column)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Accuracy vs memory (best configuration per method)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def write_report(roots: Path | list[Path], out: Path, scale: float = 100.0, min_seeds: int = 1) -> dict:
    roots = [roots] if isinstance(roots, Path) else list(roots)
    root = ", ".join(map(str, roots))
    runs, unreadable = load_runs(roots)
    if runs.empty and not unreadable:
        raise ConfigError(f"no results.json under {root}: point memtl report at a folder of runs "
                          "(e.g. multirun/<time> or outputs/)")
    tables = build_tables(runs, scale, min_seeds)
    out.mkdir(parents=True, exist_ok=True)
    figure = (plot_pareto(tables["chosen"], out / "pareto.png", scale, tables.get("floor"))
              if not tables["chosen"].empty else None)

    lines = [f"# Report: {root}", "",
             f"{len(runs)} runs ({int((runs['status'] == 'completed').sum()) if not runs.empty else 0} completed). "
             f"Scores: best dev value of each task's main metric (×{scale:g}), mean ± std over seeds, for the "
             "configuration of each method with the best mean (seed aside)"
             + (f" among those run with at least {min_seeds} seeds where a method has such" if min_seeds > 1 else "")
             + ".", ""]
    if not tables["scores"].empty:
        lines += ["## Dev score per method", "", _markdown(tables["scores"]), "",
                  "## Peak step memory (MiB) and ratio to full fine-tuning", "", _markdown(tables["memory"]), ""]
        if figure is not None:
            lines += [f"![accuracy vs memory]({figure.name})", ""]
        chosen = tables["chosen"][["column", "label", "lr", "n", "seeds", "configs_tried", "setup"]].copy()
        chosen["seeds"] = chosen["seeds"].map(lambda s: ",".join(map(str, s)))
        lines += ["## Chosen configurations", "", _markdown(chosen.sort_values(["column", "label"])), ""]
    not_done = runs[runs["status"] != "completed"] if not runs.empty else runs
    if not not_done.empty or unreadable:
        lines += ["## Runs that did not complete (left out above)", ""]
        if not not_done.empty:
            lines += [_markdown(not_done[["run", "status", "label", "task", "seed", "error"]]), ""]
        for u in unreadable:
            lines.append(f"- `{u['run']}`: unreadable results.json ({u['error']})")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    runs.to_csv(out / "runs.csv", index=False)
    data = {k: v.to_dict(orient="records") if isinstance(v, pd.DataFrame) else v for k, v in tables.items()}
    (out / "report.json").write_text(json.dumps({"root": root, "tables": data, "unreadable": unreadable},
                                                indent=2, default=str))
    return {"runs": runs, "tables": tables, "figure": figure, "out": out, "unreadable": unreadable}


def log_to_wandb(report: dict, roots: list[Path], project: str) -> None:
    import wandb

    name = "+".join(r.resolve().name for r in roots)
    run = wandb.init(project=project, job_type="report", group=name, name=f"report-{name}",
                     dir=str(report["out"]), reinit="finish_previous")
    try:
        for key in ("scores", "memory"):
            df = report["tables"][key]
            if not df.empty:
                run.log({f"report/{key}": wandb.Table(dataframe=df.astype(str))})
        run.log({"report/runs": wandb.Table(dataframe=report["runs"].astype(str))})
        if report["figure"] is not None:
            run.log({"report/pareto": wandb.Image(str(report["figure"]))})
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="memtl report", description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="+", help="folder(s) of runs (searched recursively for results.json); "
                                              "several are pooled into one report")
    p.add_argument("--out", default=None, help="output folder (default: <folder>/report; required with several)")
    p.add_argument("--scale", type=float, default=100.0, help="multiply metrics by this (100: percent)")
    p.add_argument("--min-seeds", type=int, default=1,
                   help="only configurations run with at least this many seeds compete for a method's row "
                        "(where it has any): a grid on one seed, its winner re-run on more")
    p.add_argument("--wandb", action="store_true", help="also log the tables and figure to a W&B run")
    p.add_argument("--project", default="memtl", help="W&B project for --wandb")
    args = p.parse_args(argv)
    roots = [Path(f) for f in args.folder]
    for root in roots:
        if not root.is_dir():
            print(f"error: {root} is not a folder: give the multirun/outputs folder holding the runs", file=sys.stderr)
            return 2
    if len(roots) > 1 and not args.out:
        print(f"error: {len(roots)} folders given and no --out: say where the pooled report goes, e.g. --out report",
              file=sys.stderr)
        return 2
    if args.min_seeds < 1:
        print(f"error: --min-seeds {args.min_seeds}: must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else roots[0] / "report"
    try:
        report = write_report(roots, out, args.scale, args.min_seeds)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the report to {out}: {e.strerror or e}; give --out a folder you can write",
              file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    if args.wandb:
        log_to_wandb(report, roots, args.project)
    print(f"wrote {out / 'report.md'}, {out / 'runs.csv'}, {out / 'report.json'}"
          + (f", {report['figure']}" if report["figure"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
