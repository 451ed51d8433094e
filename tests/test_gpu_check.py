"""``memtl gpu-check``: the script the GPU machine runs, checked here in its CPU mode.

The bundle is built from this environment into a temporary folder and the check reads its
data, tokenizer and (where missing) packages from there, as on the GPU machine."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from memtl.tools import gpu_check
from memtl.tools.gpu_check import PARTS, TRAIN_RUNS, judge_bench, judge_estimate, judge_gradcheck, judge_train, main


def _gpu_check(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "memtl.tools.gpu_check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "gpu-bundle"
    gpu_check.make_bundle(path)
    return path


@pytest.fixture(scope="module")
def cpu_run(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = _gpu_check(["--device", "cpu", "--bundle", str(bundle), "--out", str(out)])
    return proc, out


def test_the_bundle_holds_what_the_gpu_machine_lacks_and_is_small(bundle):
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert manifest["packages"] == {k: pins[k] for k in ("hydra-core", "omegaconf", "antlr4-python3-runtime")}
    assert manifest["total_bytes"] < 8 * 2**20  # far under the 64 MiB that may travel
    files = set(manifest["files"])
    assert {"data/glue_data/RTE/train.tsv", "data/glue_data/RTE/dev.tsv", "tokenizer/tokenizer.json",
            "tokenizer/vocab.txt", "site/hydra/__init__.py", "site/omegaconf/__init__.py"} <= files
    assert not any(f.endswith((".so", ".pyc", ".safetensors", ".bin")) for f in files)  # pure Python, no weights
    rte = (REPO.parent / "shared" / "data" / "glue_data" / "RTE" / "dev.tsv").read_bytes()
    assert (bundle / "data" / "glue_data" / "RTE" / "dev.tsv").read_bytes() == rte


def test_cpu_mode_runs_every_part_and_reports_every_figure(cpu_run, bundle):
    proc, out = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert md in proc.stdout  # printed as written
    assert report["passed"] and report["failed"] == [] and report["mode"] == "cpu"
    assert list(report["parts"]) == list(PARTS) and all(p["status"] == "pass" for p in report["parts"].values())
    m = report["machine"]
    assert m["accelerator"] == "cpu" and m["device"] and m["versions"]["torch"] and m["versions"]["transformers"]
    assert report["bundle"]["path"] == str(bundle) and report["bundle"]["packages"]["hydra-core"]
    parts = report["parts"]
    for p in parts.values():  # nothing the GPU machine lacks was imported; hydra only by the training part
        assert p["data"]["imported_optional"] == [] and ("hydra" in p["data"]["loaded_from"]) == (p is parts["train"])
    assert len(parts["gradcheck"]["data"]["rows"]) == 18
    bench = parts["bench"]["data"]["rows"]
    assert {r["method"] for r in bench} == {"full", "lora", "full+ckpt", "lora+ckpt", "meft1", "meft2", "meft3",
                                            "sherl"}
    assert {r["seq_len"] for r in bench if r["label"] == "length sweep"} == {32, 64, 128}
    assert {r["geometry"] for r in bench} == {"tiny-bert", "tiny-opt"}
    estimates = parts["estimate"]["data"]["rows"]
    assert {r["geometry"] for r in estimates} == {"tiny-bert", "tiny-opt"}  # the plan's estimate labels
    assert {r["method"] for r in estimates} == {r["method"] for r in bench} and len(estimates) == 16
    runs = parts["train"]["data"]["runs"]
    assert [r["method"] for r in runs] == [m for m, _ in TRAIN_RUNS]
    for r in runs:
        res = json.loads(Path(r["results"]).read_text())
        assert res["status"] == "completed" and res["environment"]["accelerator"] == "cpu"
        assert res["config"]["trainer"]["precision"] == "bf16-mixed"
        assert res["config"]["data"]["root"] == str((bundle / "data").resolve())  # the bundle's RTE, not ../shared
        assert res["config"]["backbone"]["tokenizer"]["path"] == str((bundle / "tokenizer").resolve())
        assert res["config"]["trainer"]["accelerator"] == ("auto" if r["method"] == "full" else "cpu")
    for heading in ("# memtl gpu-check: PASS", "## Checks", "## Gradients", "## Benchmark", "against sequence length",
                    "## Estimator against the benchmark", "## Training on GLUE RTE"):
        assert heading in md, heading
    assert md.count("| pass | ") == len(report["checks"])  # one row per check


def _parts(cpu_run) -> dict:
    return json.loads((cpu_run[1] / "gpu_check.json").read_text())["parts"]


def _failed(checks: list[dict]) -> list[str]:
    return [c["check"] for c in checks if not c["pass"]]


def test_each_judge_fails_on_bad_figures(cpu_run):
    """Every kind of check can fail: the passing run's figures, spoiled one at a time."""
    parts = _parts(cpu_run)
    grad = copy.deepcopy(parts["gradcheck"]["data"])
    grad["rows"][0]["pass"] = False
    del grad["rows"][-1]
    assert _failed(judge_gradcheck(grad, "cpu")) == ["gradcheck: every variant on every architecture",
                                                     "gradcheck: meft1 bert"]
    bench = copy.deepcopy(parts["bench"]["data"])
    meft2 = next(r for r in bench["rows"] if r["method"] == "meft2" and r["label"] == "tiny OPT")
    meft2["peak_step_mib"] = 1e9
    bench["rows"] = [r for r in bench["rows"] if not (r["method"] == "sherl" and r["label"] == "tiny BERT")]
    assert _failed(judge_bench(bench, "cpu")) == [
        "bench: tiny BERT 8x64: every method measured",
        "bench: tiny OPT 8x64: MEFT and SHERL below full fine-tuning's memory"]
    assert "bench: timed steps per method" in _failed(judge_bench(parts["bench"]["data"], "cuda"))  # GPU: >= 10
    est = copy.deepcopy(parts["estimate"]["data"])
    est["rows"][0]["error"] = 0.5
    assert _failed(judge_estimate(est, "cpu")) == ["estimate: tiny-bert 8x64 fp32"]
    train = copy.deepcopy(parts["train"]["data"])
    train["runs"][1]["peak_step_bytes"] = 10 * train["runs"][0]["peak_step_bytes"]
    assert _failed(judge_train(train, "cpu")) == ["train: meft2 below full fine-tuning's step memory"]
    assert len(_failed(judge_train(parts["train"]["data"], "cuda"))) == 3  # ran on the CPU, not the GPU


def test_a_part_that_fails_is_named_and_the_others_still_run(bundle, tmp_path):
    proc = _gpu_check(["--device", "cpu", "--bundle", str(bundle), "--out", str(tmp_path),
                       "--parts", "gradcheck,estimate", "--inject-failure", "gradcheck"])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gpu-check failed") and "gradcheck: part ran to the end" in last, last
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    grad = report["parts"]["gradcheck"]
    assert grad["status"] == "fail" and "failure injected into part gradcheck" in grad["error"]
    # the next part ran and judged on its own: with no benchmark before it, nothing to compare
    assert "no benchmark rows" in report["parts"]["estimate"]["error"]
    assert "# memtl gpu-check: FAIL" in (tmp_path / "gpu_check.md").read_text()


def test_a_part_over_its_time_is_stopped_and_failed(bundle, tmp_path):
    proc = _gpu_check(["--device", "cpu", "--bundle", str(bundle), "--out", str(tmp_path),
                       "--parts", "gradcheck", "--timeout", "gradcheck=1"])
    assert proc.returncode == 1
    part = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["gradcheck"]
    assert part["timed_out"] and part["wall_s"] < 30 and "timed out after 1 s" in part["error"]


@pytest.mark.parametrize("args,needle", [
    (["--parts", "gradcheck,nope"], "--parts: unknown nope"),
    (["--device", "cuda"], "--device cuda: no CUDA device here"),
    (["--device", "tpu"], "--device tpu: use cuda"),
    (["--timeout", "bench=soon"], "--timeout bench=soon: give PART=SECONDS"),
    (["--inject-failure", "nope"], "--inject-failure nope: choose a part"),
    (["--bundle", "/no/such/bundle", "--device", "cpu"], "--bundle /no/such/bundle: no bundle: run `make gpu-bundle`"),
    (["--make-bundle", "--bundle", "{tmp}/b", "--data-root", "{tmp}"], "no GLUE RTE files under"),
    (["--nope"], "unrecognized arguments: --nope"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        rc = main([*args, "--out", str(tmp_path / "out")])
    except SystemExit as e:  # argparse's own errors (memtl.cli.ArgumentParser: one line, exit 2)
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written
