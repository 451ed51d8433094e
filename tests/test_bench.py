"""The benchmark's table contract: every method present, ratios computed against full."""
import json

import pytest

from memtl.tools.bench import main
from memtl.cli import main as cli_main


def test_bench_table_contract(tmp_path, capsys):
    rc = main(["--geometry", "tiny-bert", "--layers", "2,4", "--methods", "lora,full+ckpt,meft2", "--batch-size", "2",
               "--seq-len", "16", "--steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["method"], r["layers"]) for r in rows] == [
        (m, d) for d in (2, 4) for m in ("full", "lora", "full+ckpt", "lora+ckpt", "meft2")]  # the peers come first
    for r in rows:
        full = next(f for f in rows if f["method"] == "full" and f["layers"] == r["layers"])
        assert r["peak_step_mib"] > 0 and r["step_time_s"] > 0
        assert r["peak_step_ratio"] == pytest.approx(r["peak_step_mib"] / full["peak_step_mib"])
        assert r["step_time_ratio"] == pytest.approx(r["step_time_s"] / full["step_time_s"])
    assert all(r["peak_step_ratio"] == 1.0 for r in rows if r["method"] == "full")
    # trainable counts differ as the methods promise
    by = {(r["method"], r["layers"]): r for r in rows}
    assert by[("lora", 2)]["trainable_params"] < by[("full", 2)]["trainable_params"]
    assert by[("full+ckpt", 2)]["trainable_params"] == by[("full", 2)]["trainable_params"]
    table = capsys.readouterr().out
    assert "peak/full" in table and "meft2" in table
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "memory_vs_layers.png").stat().st_size > 0 and (tmp_path / "step_time.png").exists()
    assert not (tmp_path / "memory_vs_seq_len.png").exists()  # only varied axes are plotted


def test_bench_grid_of_lengths_and_batches(tmp_path):
    rc = main(["--geometry", "tiny-bert", "--methods", "meft3", "--batch-size", "1,2", "--seq-len", "8,32", "--steps", "1",
               "--out", str(tmp_path), "--no-peers"])
    assert rc == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {(r["method"], r["batch_size"], r["seq_len"]) for r in rows} == {
        (m, b, t) for m in ("full", "meft3") for b in (1, 2) for t in (8, 32)}
    peak = {(r["method"], r["batch_size"], r["seq_len"]): r["peak_step_mib"] for r in rows}
    assert peak[("full", 2, 32)] > peak[("full", 1, 8)]  # activations grow with the batch
    assert all(r["cpu_time_s"] > 0 and r["cpu_time_ratio"] is not None for r in rows)
    assert (tmp_path / "memory_vs_seq_len.png").exists() and (tmp_path / "memory_vs_batch_size.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["--methods", "full,nope"], "unknown method nope"),
    (["--geometry", "minilm", "--layers", "6,12"], "--layers needs a random geometry"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--seq-len", "64,x"], "--seq-len takes integers"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seq-len", "1024"], "MiniLM has 512 positions"),
])
def test_bench_bad_input(args, needle, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_cli_dispatch(capsys):
    assert cli_main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert cli_main(["--help"]) == 0 and "memtl bench" in capsys.readouterr().out


@pytest.mark.parametrize("geometry", ["tiny-bart", "tiny-opt", "tiny-llama"])
def test_bench_other_architectures(tmp_path, geometry):
    """BART, OPT and LLaMA geometries: every method of the issue's rows side by side, the
    depth axis sets every stack."""
    methods = ["meft1", "meft2", "meft3", "sherl"]
    rc = main(["--geometry", geometry, "--layers", "2,3", "--methods", ",".join(methods), "--batch-size", "2",
               "--seq-len", "16", "--steps", "1", "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    peers = ("full", "lora", "full+ckpt", "lora+ckpt")  # always measured beside the methods asked for
    assert [(r["method"], r["layers"]) for r in rows] == [(m, d) for d in (2, 3) for m in (*peers, *methods)]
    by = {(r["method"], r["layers"]): r for r in rows}
    for r in rows:
        assert r["peak_step_mib"] > 0 and r["peak_step_ratio"] == pytest.approx(
            r["peak_step_mib"] / by[("full", r["layers"])]["peak_step_mib"])
        assert r["trainable_params"] <= by[("full", r["layers"])]["trainable_params"]
    # deeper stacks hold more activations under full fine-tuning
    assert by[("full", 3)]["saved_tensor_mib"] > by[("full", 2)]["saved_tensor_mib"]


def test_bench_head_only_reference_keeps_no_backbone_activations(tmp_path):
    """The linear-probe row: a frozen backbone leaves autograd nothing of its own to keep."""
    rc = main(["--geometry", "tiny-bert", "--layers", "2,4", "--methods", "head", "--batch-size", "2", "--seq-len", "16",
               "--steps", "1", "--out", str(tmp_path), "--no-peers", "--no-plots"])
    assert rc == 0
    by = {(r["method"], r["layers"]): r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    for d in (2, 4):
        assert by[("head", d)]["trainable_params"] < by[("full", d)]["trainable_params"]
        assert by[("head", d)]["saved_tensor_mib"] < 0.05 * by[("full", d)]["saved_tensor_mib"]
    # depth adds nothing to what the head keeps
    assert by[("head", 4)]["saved_tensor_mib"] == pytest.approx(by[("head", 2)]["saved_tensor_mib"], abs=1e-3)
