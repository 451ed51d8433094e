"""memtl report on a real tiny sweep: paper table (best config per method, mean ± std over
seeds), memory table, Pareto plot, runs that did not complete, W&B offline, bad input."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import run_cli

from memtl.data.glue import read_glue_split
from memtl.tools.report import build_tables, label_offsets, load_runs, main, pareto_front


@pytest.fixture(scope="module")
def sweep(glue_root, tmp_path_factory):
    """2 methods × 2 learning rates × 2 seeds of tiny BERT on RTE (8 real runs)."""
    out = tmp_path_factory.mktemp("report") / "sweep"
    proc = run_cli(["-m", "method=full,lora", "optim.lr=1e-3,1e-5", "seed=1,2", "backbone=tiny_bert",
                    "task=glue/rte", f"data.root={glue_root}", "trainer.limit_train_batches=3",
                    "trainer.max_epochs=1", "data.max_eval_samples=24", "logger=none",
                    "callbacks.memory.measure_batches=[1]", "callbacks.memory.timing_warmup=1",
                    "trainer.enable_progress_bar=false", f"hydra.sweep.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("*/results.json"))) == 8
    return out


def test_table_picks_the_best_config_per_method_and_pools_seeds(sweep):
    runs, unreadable = load_runs(sweep)
    assert len(runs) == 8 and not unreadable and (runs["status"] == "completed").all()
    chosen = build_tables(runs)["chosen"].set_index("label")
    for label in ("full", "lora"):
        mine = runs[runs["label"] == label]
        means = mine.groupby("lr")["best"].mean()
        row = chosen.loc[label]
        assert row["n"] == 2 and row["configs_tried"] == 2
        assert row["mean"] == pytest.approx(means.max()) and means[row["lr"]] == pytest.approx(means.max())
        assert row["std"] == pytest.approx(mine[mine["lr"] == row["lr"]]["best"].std(ddof=1))
        assert row["seeds"] == [1, 2]


def test_min_seeds_reports_the_re_run_winner_not_a_lucky_single_seed(sweep):
    runs, _ = load_runs(sweep)
    runs = runs.copy()
    single, pooled = sorted(runs["lr"].unique())
    full = runs["label"] == "full"
    # full: lr `single` ran on seed 1 only and scored high; lr `pooled` ran on both seeds
    runs = runs[~(full & (runs["lr"] == single) & (runs["seed"] == 2))].copy()
    full = runs["label"] == "full"
    runs.loc[full & (runs["lr"] == single), "best"] = 0.9
    runs.loc[full & (runs["lr"] == pooled), "best"] = [0.6, 0.7]
    assert build_tables(runs)["chosen"].set_index("label").loc["full"]["lr"] == single
    row = build_tables(runs, min_seeds=2)["chosen"].set_index("label").loc["full"]
    assert row["lr"] == pooled and row["n"] == 2 and row["mean"] == pytest.approx(0.65)
    # a method without any config at min_seeds still gets its row
    lora_one = runs[(runs["label"] != "lora") | (runs["seed"] == 1)]
    assert "lora" in set(build_tables(lora_one, min_seeds=2)["chosen"]["label"])
    assert main([str(sweep), "--min-seeds", "0"]) == 2


def test_a_tie_goes_to_fewer_trainable_parameters_whatever_the_order(sweep):
    runs, _ = load_runs(sweep)
    lora = runs[runs["label"] == "lora"].copy()
    small, large = sorted(lora["lr"].unique())
    lora["best"] = 0.5  # both learning rates tie on mean and seed count
    lora.loc[lora["lr"] == large, "trainable"] = lora["trainable"] * 2
    for order in (lora, lora.iloc[::-1]):
        row = build_tables(order)["chosen"].set_index("label").loc["lora"]
        assert row["lr"] == small and row["trainable"] == lora[lora["lr"] == small]["trainable"].iloc[0]


def test_an_option_left_null_pools_with_runs_from_before_it_existed(sweep, tmp_path):
    old = tmp_path / "runs"
    shutil.copytree(sweep, old)
    edited = 0
    for path in old.glob("*/results.json"):
        res = json.loads(path.read_text())
        if res["config"]["method"]["name"] == "lora" and res["config"]["seed"] == 2:
            assert res["config"]["method"]["target_modules"] is None
            del res["config"]["method"]["target_modules"]  # as written before the option existed,
            del res["method"]  # and before runs recorded their resolved options
            path.write_text(json.dumps(res))
            edited += 1
    assert edited == 2
    chosen = build_tables(load_runs(old)[0])["chosen"].set_index("label")
    assert chosen.loc["lora", "n"] == 2 and chosen.loc["lora", "configs_tried"] == 2


@pytest.mark.parametrize("seed2_r, pooled", [(None, True), (8, True), (16, False)])
def test_an_option_at_its_default_pools_with_runs_from_before_it_existed(sweep, tmp_path, seed2_r, pooled):
    """Seed 1's LoRA runs written before ``r`` existed (key absent); seed 2's with r absent,
    at its default 8, or at 16: only a value other than the default is another configuration."""
    runs_dir = tmp_path / "runs"
    shutil.copytree(sweep, runs_dir)
    for path in runs_dir.glob("*/results.json"):
        res = json.loads(path.read_text())
        if res["config"]["method"]["name"] == "lora":
            assert res["config"]["method"]["r"] == 8
            if res["config"]["seed"] == 1 or seed2_r is None:
                del res["config"]["method"]["r"]  # as written before the option existed,
                del res["method"]  # and before runs recorded their resolved options
            else:
                res["config"]["method"]["r"] = res["method"]["options"]["r"] = seed2_r
            path.write_text(json.dumps(res))
    chosen = build_tables(load_runs(runs_dir)[0])["chosen"].set_index("label")
    assert (chosen.loc["lora", "n"], chosen.loc["lora", "configs_tried"]) == ((2, 2) if pooled else (1, 4))


def test_an_explicit_option_equal_to_the_backbone_family_default_is_the_default(glue_root, tmp_path):
    """SHERL's late_tuning defaults to null, which a decoder resolves to lora: a run that sets lora
    pools with one that leaves it null; another value is its own setup."""
    out = tmp_path / "sherl"
    proc = run_cli(["-m", "method=sherl", "method.late_tuning=null,lora,frozen", "backbone=tiny_llama", "task=glue/rte",
                    f"data.root={glue_root}", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
                    "data.max_eval_samples=8", "logger=none", "callbacks.memory.measure_batches=[1]",
                    "callbacks.memory.timing_warmup=1", "trainer.enable_progress_bar=false",
                    f"hydra.sweep.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = load_runs(out)[0]
    runs = runs.set_index(runs["run"].astype(int)).sort_index()
    assert [json.loads((out / str(i) / "results.json").read_text())["method"]["options"]["late_tuning"]
            for i in range(3)] == ["lora", "lora", "frozen"]
    assert runs.loc[0, "setup"] == runs.loc[1, "setup"] != runs.loc[2, "setup"]
    assert '"late_tuning": "frozen"' in runs.loc[2, "method_options"] and "late_tuning" not in runs.loc[0, "method_options"]
    chosen = build_tables(runs)["chosen"].set_index("label")
    assert chosen.loc["sherl", "n"] == 2 and chosen.loc["sherl", "configs_tried"] == 2


def test_siamese_runs_are_their_own_configuration(sweep, tmp_path):
    """Runs with data.pair_encoding=siamese never pool with cross-encoded ones; runs written
    before the option existed count as cross."""
    mixed = tmp_path / "runs"
    shutil.copytree(sweep, mixed)
    for path in mixed.glob("*/results.json"):
        res = json.loads(path.read_text())
        if res["config"]["method"]["name"] == "lora" and res["config"]["seed"] == 2:
            res["config"]["data"]["pair_encoding"] = "siamese"
        else:
            res["config"]["data"].pop("pair_encoding")  # as written before the option existed
        path.write_text(json.dumps(res))
    runs = load_runs(mixed)[0]
    siamese = runs["setup"].str.endswith(", pair_encoding=siamese")
    assert siamese.sum() == 2 and set(runs[siamese]["label"]) == {"lora"}
    assert not runs[~siamese]["setup"].str.contains("pair_encoding").any()
    chosen = build_tables(runs)["chosen"].set_index("label")
    assert chosen.loc["lora", "n"] == 1 and chosen.loc["lora", "configs_tried"] == 4
    assert chosen.loc["full", "n"] == 2 and chosen.loc["full", "configs_tried"] == 2


def test_several_folders_pool_into_one_report(sweep, tmp_path, capsys):
    """Two sweeps whose run folders share names (0, 1, ...) give the report of the union:
    every run kept, named after its folder, the same choices as one folder holding all."""
    parts = {name: tmp_path / name for name in ("sweep_a", "sweep_b")}
    for i, run in enumerate(sorted(sweep.glob("*/results.json"))):
        dest = parts["sweep_a" if i % 2 else "sweep_b"] / str(i // 2)
        shutil.copytree(run.parent, dest)
    runs, unreadable = load_runs(list(parts.values()))
    assert len(runs) == 8 and not unreadable and runs["run"].is_unique
    assert set(runs["run"].str.split("/").str[0]) == {"sweep_a", "sweep_b"}
    pooled = build_tables(runs)["chosen"].set_index("label")[["lr", "n", "mean"]]
    whole = build_tables(load_runs(sweep)[0])["chosen"].set_index("label")[["lr", "n", "mean"]]
    pd.testing.assert_frame_equal(pooled.sort_index(), whole.sort_index())
    assert main([*map(str, parts.values()), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith(f"# Report: {parts['sweep_a']}, {parts['sweep_b']}") and "| full |" in md
    assert len(pd.read_csv(tmp_path / "rep" / "runs.csv")) == 8


def test_cli_writes_markdown_csv_json_and_pareto(sweep, tmp_path, capsys):
    # a run that broke is listed apart, never pooled
    broken = tmp_path / "runs"
    shutil.copytree(sweep, broken)
    res = json.loads((broken / "0" / "results.json").read_text())
    res.update(status="failed", error="RuntimeError: planned failure\nmore")
    (broken / "0" / "results.json").write_text(json.dumps(res))
    (broken / "junk").mkdir()
    (broken / "junk" / "results.json").write_text("{not json")

    assert main([str(broken), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Dev score per method" in md and "## Dev score per method" in capsys.readouterr().out
    assert "| full |" in md and "| lora |" in md and "± " in md
    assert "planned failure" in md and "unreadable results.json" in md
    assert (tmp_path / "rep" / "pareto.png").stat().st_size > 0
    runs = pd.read_csv(tmp_path / "rep" / "runs.csv")
    assert len(runs) == 8 and set(runs["status"]) == {"completed", "failed"}
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {r["method"] for r in data["tables"]["scores"]} == {"full", "lora", "majority class"}
    # the memory table's ratio is against full fine-tuning's peak
    mem = {r["method"]: r for r in data["tables"]["memory"]}
    col = next(k for k in mem["lora"] if k.endswith("/ full"))
    peak = next(k for k in mem["lora"] if k.endswith("peak MiB"))
    assert float(mem["full"][col]) == 1.0
    # the table prints whole MiB; the ratio comes from the unrounded figures
    assert float(mem["lora"][col]) == pytest.approx(float(mem["lora"][peak]) / float(mem["full"][peak]), rel=0.05)


def test_wandb_offline_logs_the_tables(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(sweep), "--out", str(tmp_path / "rep"), "--wandb"]) == 0
    runs = list((tmp_path / "rep" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_majority_class_row_from_the_runs_baseline(sweep, glue_root):
    runs, _ = load_runs(sweep)
    scores = build_tables(runs)["scores"].set_index("method")
    # RTE's first 24 dev rows, scored as always predicting train's majority label
    train = [r["label"] for r in read_glue_split("rte", "train", glue_root)]
    dev = [r["label"] for r in read_glue_split("rte", "validation", glue_root)][:24]
    majority = max(set(train), key=train.count)
    assert scores.loc["majority class", "rte accuracy"] == f"{100 * dev.count(majority) / 24:.1f}"
    assert list(scores.index[:2]) == ["full", "lora"]  # methods first, the floor last
    # runs scored on different dev rows disagree on the floor: no row rather than a wrong one
    garbled = sweep.parent / "garbled"
    shutil.copytree(sweep, garbled)
    first = sorted(garbled.glob("*/results.json"))[0]
    data = json.loads(first.read_text())
    data["baseline"] = {"metrics": {"accuracy": "n/a"}}
    first.write_text(json.dumps(data))
    assert build_tables(load_runs(garbled)[0])["scores"].set_index("method").loc["majority class", "rte accuracy"] \
        == scores.loc["majority class", "rte accuracy"]  # the garbled value is ignored, not a crash
    mixed = runs.copy()
    mixed.loc[mixed.index[0], "baseline"] = 0.9
    assert "majority class" not in set(build_tables(mixed)["scores"]["method"])


def test_pareto_front():
    pts = [(100, 80, "a"), (50, 70, "b"), (60, 65, "c"), (200, 80, "d"), (300, 90, "e")]
    assert [p[2] for p in pareto_front(pts)] == ["b", "a", "e"]


def test_label_offsets_separate_close_markers_and_leave_lone_ones():
    # two markers at the same spot (as meft1 and sherl on RTE), one far away
    offsets = label_offsets([(0.2, 0.5), (0.2, 0.5), (0.9, 0.1)])
    assert offsets[0] == offsets[2] == (5.0, 4.0)
    assert offsets[1] == (-5.0, 4.0)  # the twin's label on the other side
    # a crowd of five at one spot: every label on its own rung
    assert len(set(label_offsets([(0.5, 0.5)] * 5))) == 5
    # no label box (0.14 × 0.045 axes fraction, right of and above its anchor) covers another
    # marker: meft2 / meft3 / meft1 packed as on the MRPC panel of the session-5 report
    xy = [(0.17, 0.76), (0.12, 0.70), (0.20, 0.67)]
    for i, ((x, y), (dx, dy)) in enumerate(zip(xy, label_offsets(xy))):
        left, low = (x if dx > 0 else x - 0.14), y + dy / 250
        assert not any(j != i and left <= mx <= left + 0.14 and low <= my <= low + 0.045
                       for j, (mx, my) in enumerate(xy))
        assert abs(dy) <= 4 + 11  # and it stays next to its own marker


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: p, "no results.json under"),
])
def test_bad_input(make, needle, tmp_path, capsys):
    assert main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
