"""Bad input everywhere: one table of cases, every CLI entry (train.py, memtl bench / estimate /
report / recon / gradcheck), each run for real (a wrong type of each method option: train.py's
preflight, in-process; test_every_method_option_has_a_wrong_type_row keeps that list complete).

Every row must give exactly one ``error: ...`` line on stderr (library warnings aside) naming
the problem and the fix, the exit code of the row, no traceback, and lose nothing that was
there: each case runs in a folder holding an earlier run (``run/results.json``), an earlier
benchmark (``bench/bench.json``), a file and an empty folder. A case rejected before the run
starts leaves that folder byte for byte as it was; a train.py case found only once the data is
read (the run folder exists by then) keeps the earlier results.json as results.previous-*.json
and records the same error in the new one.

Cases already covered elsewhere are not repeated here: tests/test_cli.py (train.py: unknown
method/task/backbone/key, lr, LoRA rank, batch size, missing data.root, precision, metric,
guard, target modules, an empty train.tsv), tests/test_bench.py, tests/test_estimate.py,
tests/test_report.py, tests/test_meft.py (recon --variants). docs/BAD_INPUT.md lists all of them
with what each prints.

    PYTHONPATH=src python -m pytest tests/test_bad_input.py -q
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

SENTINEL = '{"status": "completed", "sentinel": true}\n'


# -- setups: what a case needs besides the common folder ---------------------------------------

def _rte(d: Path, glue: Path, train: str | None = None, drop: str | None = None) -> None:
    """``d/data``: a copy of the fixture's RTE files, with train.tsv replaced or a file dropped."""
    shutil.copytree(glue / "glue_data" / "RTE", d / "data" / "glue_data" / "RTE")
    if train is not None:
        (d / "data" / "glue_data" / "RTE" / "train.tsv").write_text(train)
    if drop is not None:
        (d / "data" / "glue_data" / "RTE" / drop).unlink()


def header_only(d, glue):
    _rte(d, glue, train="index\tsentence1\tsentence2\tlabel\n")


def wrong_columns(d, glue):
    _rte(d, glue, train="index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")


def bad_label(d, glue):
    _rte(d, glue, train="index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n\n1\ta\tb\tmaybe\n")


def missing_field(d, glue):
    _rte(d, glue, train="index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly one\tentailment\n")


def no_dev(d, glue):
    _rte(d, glue, drop="dev.tsv")


def small_sst2(d, glue):
    shutil.copytree(glue / "glue_data" / "SST-2", d / "data" / "glue_data" / "SST-2")  # 40 training rows


def bad_config_json(d, glue):
    (d / "cfg").mkdir()
    (d / "cfg" / "config.json").write_text("{not json")


def a_run(d, glue):
    (d / "runs" / "a").mkdir(parents=True)
    (d / "runs" / "a" / "results.json").write_text(SENTINEL)


# -- the table: (entry, args, setup, expected substring of the error line, exit code) ----------
# {d}: the case's folder (holds run/results.json, bench/bench.json, file.txt, empty/).
# train.py runs as `python train.py backbone=tiny_bert logger=none hydra.run.dir={d}/run ... <args>`
# (a leading -m goes first); preflight rows run train.py's preflight on the same arguments
# in-process; memtl rows run in-process, bench always with --out {d}/bench.
CASES = [
    # memtl (in-process, fast)
    ("memtl", [], None, "no command given: choose one of bench", 2),
    ("bench", ["--geometry", "nope"], None, "argument --geometry: invalid choice: 'nope'", 2),
    ("bench", ["--steps", "x"], None, "argument --steps: invalid int value: 'x'", 2),
    ("bench", ["--bogus"], None, "unrecognized arguments: --bogus: see memtl bench --help", 2),
    ("bench", ["--methods", ""], None, "unknown method (none) in --methods", 2),
    ("bench", ["--geometry", "tiny-bert", "--layers", "0"], None, "--layers must be >= 1", 2),
    ("bench", ["--geometry", "tiny-bert", "--device", "foo"], None, "--device foo: not a torch device", 2),
    ("bench", ["--geometry", "tiny-bert", "--out", "{d}/file.txt/sub"], None,
     "cannot write --out {d}/file.txt/sub: Not a directory", 2),
    ("estimate", ["--precision", "16"], None, "argument --precision: invalid choice: '16'", 2),
    ("estimate", ["--layers", "0"], None, "--layers must be >= 1", 2),
    ("estimate", ["--seq-len", "0"], None, "--seq-len must be >= 1", 2),
    ("estimate", ["--methods", ""], None, "unknown method (none) in --methods", 2),
    ("estimate", ["--budget", "0"], None, "--budget '0': give a size such as 24GB", 2),
    ("estimate", ["--backbone", "{d}/empty"], None, "--backbone {d}/empty: cannot read a config.json there", 2),
    ("estimate", ["--backbone", "{d}/cfg"], bad_config_json, "--backbone {d}/cfg: cannot read a config.json there", 2),
    ("estimate", ["--validate", "--tolerance", "-1"], None, "--tolerance -1.0: must be >= 0", 2),
    ("report", [], None, "the following arguments are required: folder", 2),
    ("report", ["{d}/file.txt"], None, "{d}/file.txt is not a folder", 2),
    ("report", ["{d}/runs", "--scale", "x"], a_run, "argument --scale: invalid float value: 'x'", 2),
    ("report", ["{d}/runs", "--out", "{d}/file.txt/sub"], a_run,
     "cannot write the report to {d}/file.txt/sub: Not a directory", 2),
    ("report", ["{d}/runs", "{d}/runs"], a_run, "2 folders given and no --out: say where the pooled report goes", 2),
    ("recon", ["--layers", "x"], None, "--layers takes integers or a comma list of them, got 'x'", 2),
    ("recon", ["--layers", "0"], None, "--layers must be >= 1", 2),
    ("recon", ["--variants", ""], None, "unknown variant (none) in --variants", 2),
    ("recon", ["--precisions", "16"], None, "--precisions takes 32 and/or bf16-mixed", 2),
    ("recon", ["--inverses", "fixed"], None, "--inverses takes exact and/or float", 2),
    ("recon", ["--variants", "meft2", "--layers", "2", "--precisions", "32", "--lam", "0"], None,
     "method.lam=0.0: the scale λ of x1 (the inverse divides by it) must be a finite non-zero number", 2),
    ("recon", ["--out", "{d}/file.txt/recon.json"], None,
     "cannot write --out {d}/file.txt/recon.json: {d}/file.txt is not a folder", 2),
    ("recon", ["--out", "{d}/empty"], None, "cannot write --out {d}/empty: is a folder", 2),
    ("gradcheck", ["--bogus"], None, "unrecognized arguments: --bogus: see memtl gradcheck --help", 2),
    ("gradcheck", ["--depth", "0"], None, "--depth 0: must be >= 1", 2),
    ("gradcheck", ["--out", "{d}/file.txt/g.json"], None,
     "cannot write --out {d}/file.txt/g.json: {d}/file.txt is not a folder", 2),
    # train.py, rejected by the preflight (before Hydra makes any folder)
    ("train", ["foo=bar"], None, "unknown key 'foo': the keys under '<root>' are backbone", 2),
    ("train", ["logger=nope"], None, "unknown logger 'nope': choose one of csv, none, wandb", 2),
    ("train", ["callbacks=[nope]"], None, "unknown callbacks 'nope': choose one of default", 2),
    ("train", ["--foo"], None, "unknown option --foo: train.py takes -m (a sweep) and key=value overrides", 2),
    ("train", ["method=lora", "-m", "seed=1,2"], None, "-m in the middle of the overrides: put it first", 2),
    ("train", ["data.batch_size=abc"], None, "data.batch_size='abc' is invalid; set it to an integer >= 1", 2),
    ("train", ["eval_before=maybe"], None, "eval_before=maybe: must be true or false", 2),
    ("train", ["data.test=2"], None, "data.test=2: must be true or false", 2),
    ("train", ["optim.lr=abc"], None, "optim.lr=abc: the learning rate must be > 0", 2),
    ("train", ["seed=abc"], None, "seed=abc: must be an integer", 2),
    ("train", ["data.max_length=4"], None, "data.max_length=4: must be >= 8", 2),
    ("train", ["optim.warmup_ratio=2"], None, "optim.warmup_ratio=2: must be in [0, 1]", 2),
    ("train", ["data.protocol=foo"], None, "data.protocol='foo' is unknown; set data.protocol=dev", 2),
    ("train", ["data.split_seed=x"], None, "data.split_seed='x' is invalid; set it to an integer", 2),
    ("train", ["data.num_workers=-1"], None, "data.num_workers=-1 is invalid; set it to an integer >= 0", 2),
    ("train", ["data.eval_batch_size=0"], None, "data.eval_batch_size=0 is invalid", 2),
    ("train", ["trainer.max_steps=0"], None, "trainer.max_steps=0: must be >= 1, or -1 for no limit", 2),
    ("train", ["trainer.max_epochs=-1"], None, "trainer.max_epochs=-1 with trainer.max_steps=-1: the run would "
     "never end", 2),
    ("train", ["method=meft2", "method.gradient_checkpointing=true"], None,
     "method.gradient_checkpointing=true: MEFT's reversible backward already recomputes activations", 2),
    ("train", ["method=meft1", "method.inverse=fixed"], None,
     "method.inverse='fixed': choose exact (fixed-point streams, bit-exact at any depth) or float", 2),
    ("train", ["method=meft1", "method.lam=0.123456789"], None,
     "method.lam=0.123456789: the exact inverse needs a rational p/q with |p|, q <= 65536", 2),
    ("train", ["resume=maybe"], None, "resume=maybe: choose auto or never", 2),
    ("train", ["method=lora", "method.alpha=abc"], None, "method.alpha='abc': the LoRA alpha must be a number > 0", 2),
    ("train", ["method=lora", "method.r=true"], None, "method.r=True: the LoRA rank must be an integer >= 1", 2),
    ("train", ["method=head", "backbone=tiny_opt", "task=qa/arc_easy"], None,
     "method=head with tiny_opt on arc_easy: this backbone scores the choices with its LM head", 2),
    ("train", ["data.pair_encoding=bi"], None, "data.pair_encoding=bi: choose cross (one sequence per pair) or "
     "siamese", 2),
    ("train", ["data.pair_encoding=siamese", "task=glue/sst2"], None,
     "data.pair_encoding=siamese needs a sentence-pair task; sst2 has one sentence per example", 2),
    ("train", ["data.pair_encoding=siamese", "backbone=tiny_opt"], None,
     "data.pair_encoding=siamese needs an encoder backbone (bert, roberta); tiny_opt is opt", 2),
    ("train", ["data.pair_encoding=siamese", "task=qa/arc_easy"], None,
     "data.pair_encoding=siamese is a GLUE option; arc_easy is a QA task", 2),
    ("train", ["backbone.geometry=nope"], None,
     "backbone.geometry=nope: unknown; choose one of tiny-bert, tiny-roberta, tiny-bart, tiny-opt, tiny-llama, "
     "minilm-random, bert-base", 2),
    ("train", ["backbone.geometry=tiny-opt"], None,
     "backbone.geometry=tiny-opt has model type opt, but backbone.model_type=bert: choose a geometry of model type "
     "bert, or set backbone.model_type=opt", 2),
    ("train", ["hydra.run.dir={d}/file.txt/sub"], None,
     "hydra.run.dir={d}/file.txt/sub: cannot create the run folder ({d}/file.txt is not a folder)", 2),
    ("train", ["-m", "hydra.sweep.dir={d}/file.txt/sub", "method=full,lora"], None,
     "hydra.sweep.dir={d}/file.txt/sub: cannot create the run folder", 2),
    # a wrong type for each method option (meft2/meft3 share meft1's; head has none): train.py's
    # preflight in-process, the same code the two train rows above run in a subprocess
    ("preflight", ["method=full", "method.gradient_checkpointing=abc"], None,
     "method.gradient_checkpointing='abc': gradient checkpointing (recompute activations in backward) must be "
     "true or false", 2),
    ("preflight", ["method=lora", "method.dropout=true"], None,
     "method.dropout=True: dropout on the LoRA input must be a number in [0, 1)", 2),
    ("preflight", ["method=lora", "method.target_modules=query"], None,
     "method.target_modules='query': the modules LoRA adapts must be a non-empty list of names, or null for", 2),
    ("preflight", ["method=lora", "method.gradient_checkpointing=maybe"], None,
     "method.gradient_checkpointing='maybe': gradient checkpointing (recompute activations in backward) must be "
     "true or false", 2),
    ("preflight", ["method=meft1", "method.bottleneck=1.5"], None,
     "method.bottleneck=1.5: the adapter width r must be an integer >= 1", 2),
    ("preflight", ["method=meft1", "method.adapter_layernorm=maybe"], None,
     "method.adapter_layernorm='maybe': a LayerNorm at the input of the stand-alone F/G adapter (meft1/meft2) "
     "must be true or false", 2),
    ("preflight", ["method=meft1", "method.adapter_activation=1"], None,
     "method.adapter_activation=1: choose one of gelu, identity, relu, silu, swish, tanh", 2),
    ("preflight", ["method=meft1", "method.adapter_init=lora"], None,
     "method.adapter_init='lora': choose normal (both layers N(0, 0.02²), the paper's) or zero (the up-projection "
     "at 0, like LoRA's B: the adapters add exactly 0 at init)", 2),
    ("preflight", ["method=meft1", "method.output=3"], None,
     "method.output=3: choose mean (the two streams' average, the paper's) or chain (the stream holding the last "
     "pre-trained layer's output), or null for chain on pre-norm decoders, mean elsewhere", 2),
    ("preflight", ["method=meft1", "method.streams=3"], None,
     "method.streams=3: choose two (MEFT's reversible streams) or one (MEFT3's adapters on the pre-trained "
     "model's own forward, not reversible: an ablation)", 2),
    ("preflight", ["method=meft1", "method.adapter_dropout=abc"], None,
     "method.adapter_dropout='abc': dropout inside the adapters must be a number in [0, 1), or null for the "
     "model's hidden dropout", 2),
    ("preflight", ["method=meft1", "method.num_rev_layers=true"], None,
     "method.num_rev_layers=True: how many bottom layers use the reversible backward (0: plain autograd, same "
     "maths) must be an integer >= 0, or null for all layers", 2),
    ("preflight", ["method=meft1", "method.lam=abc"], None,
     "method.lam='abc': the scale λ of x1 (the inverse divides by it) must be a finite non-zero number, or null "
     "for the variant's default", 2),
    ("preflight", ["method=meft1", "method.beta=[1]"], None,
     "method.beta=[1]: the scale β of x2 (the inverse divides by it) must be a finite non-zero number", 2),
    ("preflight", ["method=meft1", "method.inverse=1"], None,
     "method.inverse=1: choose exact (fixed-point streams, bit-exact at any depth) or float (the paper's "
     "division)", 2),
    ("preflight", ["method=meft1", "method.gradient_checkpointing=maybe"], None,
     "method.gradient_checkpointing='maybe': gradient checkpointing (false only: MEFT's backward recomputes) "
     "must be true or false", 2),
    ("preflight", ["method=sherl", "method.late_layers=abc"], None,
     "method.late_layers='abc': k, the late layers that run with autograd (below the number of layers) must be "
     "an integer >= 1, or null for the backbone family's default", 2),
    ("preflight", ["method=sherl", "method.side_width=2.5"], None,
     "method.side_width=2.5: d', the side module's width must be an integer >= 1, or null for half the hidden "
     "size", 2),
    ("preflight", ["method=sherl", "method.projection=1"], None, "method.projection=1: choose one of linear, gated", 2),
    ("preflight", ["method=sherl", "method.gate_temperature=true"], None,
     "method.gate_temperature=True: T of the skip gate tanh(g/T) (authors: 0.1) must be a number > 0", 2),
    ("preflight", ["method=sherl", "method.gate_init=abc"], None,
     "method.gate_init='abc': the skip gate's opening tanh(g/T) at init (0 = closed, docs/DESIGN.md §2) must be a "
     "number in (-1, 1)", 2),
    ("preflight", ["method=sherl", "method.preserve_start=maybe"], None,
     "method.preserve_start='maybe': keeping the pre-trained starting point (the late layers receive exactly "
     "h_{N-k} at init) must be true or false, or null for the backbone family's default", 2),
    ("preflight", ["method=sherl", "method.start_form=0"], None,
     "method.start_form=0: choose one of out_proj, scale", 2),
    ("preflight", ["method=sherl", "method.late_tuning=true"], None,
     "method.late_tuning=True: choose one of frozen, lora, adapter, or null for the backbone family's default", 2),
    ("preflight", ["method=sherl", "method.late_lora_r=abc"], None,
     "method.late_lora_r='abc': the late layers' LoRA rank (late_tuning=lora) must be an integer >= 1", 2),
    ("preflight", ["method=sherl", "method.late_lora_alpha=abc"], None,
     "method.late_lora_alpha='abc': the late layers' LoRA alpha (late_tuning=lora) must be a number > 0", 2),
    ("preflight", ["method=sherl", "method.late_adapter_bottleneck=false"], None,
     "method.late_adapter_bottleneck=False: the late adapters' width (late_tuning=adapter) must be an integer "
     ">= 1", 2),
    ("preflight", ["method=sherl", "method.dropout=abc"], None,
     "method.dropout='abc': dropout of the side output block and the late LoRA/adapter inputs must be a number "
     "in [0, 1), or null for the model's hidden dropout", 2),
    ("preflight", ["method=sherl", "method.recompute_side=2"], None,
     "method.recompute_side=2: recomputing the side module in backward (the late layers keep theirs) must be "
     "true or false", 2),
    ("preflight", ["method=sherl", "method.gradient_checkpointing=abc"], None,
     "method.gradient_checkpointing='abc': gradient checkpointing (of the side module and the late layers) must "
     "be true or false", 2),
    # train.py, found when the data is read (the run folder exists: its earlier results are kept)
    ("train", ["data.root={d}/data"], header_only, "RTE/train.tsv: empty file (no data rows)", 2),
    ("train", ["data.root={d}/data"], wrong_columns,
     "RTE/train.tsv:1: header ['index', 'premise', 'hypothesis', 'label'] lacks column(s) "
     "['sentence1', 'sentence2']", 2),
    ("train", ["data.root={d}/data"], bad_label,
     "RTE/train.tsv:4: label 'maybe' is not one of ['entailment', 'not_entailment']", 2),
    ("train", ["data.root={d}/data"], missing_field, "RTE/train.tsv:3: expected 4 tab-separated columns, got 3", 2),
    ("train", ["data.root={d}/data"], no_dev,
     "GLUE rte/validation: no local file {d}/data/glue_data/RTE/dev.tsv and the Hugging Face hub is unreachable", 2),
    ("train", ["data.root={d}/data", "task=glue/sst2", "data.protocol=lst"], small_sst2,
     "data.protocol=lst holds out 1000 training examples of sst2 for validation, but its train split has only 40", 2),
]

# library noise that is not ours to fix (deprecations printed by Lightning/transformers on import)
KNOWN_WARNINGS = re.compile(r"site-packages/\S+:\d+: |^\s*warnings\.warn\(")


def _tree(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def _run(entry: str, args: list[str], d: Path, capsys) -> tuple[int, str]:
    if entry == "preflight":  # what train.py's __main__ runs before Hydra starts, in-process
        from memtl.errors import ConfigError
        from memtl.preflight import preflight

        try:
            preflight(["backbone=tiny_bert", "logger=none", f"hydra.run.dir={d}/run", *args], REPO / "conf")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2, capsys.readouterr().err
        return 0, capsys.readouterr().err
    if entry == "train":
        lead = ["-m"] if args[:1] == ["-m"] else []  # a sweep: -m before the overrides
        rest = args[len(lead):]
        proc = run_cli([*lead, "backbone=tiny_bert", "logger=none", f"hydra.run.dir={d}/run",
                        f"hydra.sweep.dir={d}/sweep", *rest])
        return proc.returncode, proc.stderr
    from memtl.cli import main

    argv = ([entry] if entry != "memtl" else []) + args
    if entry == "bench" and "--out" not in args:
        argv += ["--out", str(d / "bench")]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("entry,args,setup,needle,code", CASES,
                         ids=[f"{e} {' '.join(a)}".strip() for e, a, *_ in CASES])
def test_bad_input(entry, args, setup, needle, code, tmp_path, glue_root, capsys):
    d = tmp_path
    (d / "run").mkdir()
    (d / "run" / "results.json").write_text(SENTINEL)
    (d / "bench").mkdir()
    (d / "bench" / "bench.json").write_text('{"rows": "an earlier benchmark"}\n')
    (d / "file.txt").write_text("a file, not a folder\n")
    (d / "empty").mkdir()
    if setup is not None:
        setup(d, glue_root)
    before = _tree(d)
    args = [a.replace("{d}", str(d)) for a in args]
    needle = needle.replace("{d}", str(d))

    rc, stderr = _run(entry, args, d, capsys)

    lines = [ln for ln in stderr.splitlines() if ln.strip() and not KNOWN_WARNINGS.search(ln)]
    assert rc == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr[-3000:]
    after = _tree(d)
    if after.get("run/results.json") == SENTINEL.encode():
        assert after == before, "a rejected command must leave every file and folder as it was"
    else:  # found after the run folder was in use: the earlier results are kept beside the new ones
        kept = [k for k in after if re.fullmatch(r"run/results\.previous-[\d-]+\.json", k)]
        assert len(kept) == 1 and after[kept[0]] == SENTINEL.encode(), sorted(after)
        res = json.loads(after["run/results.json"])
        assert res["status"] == "failed" and res["error"] == lines[0].removeprefix("error: ")
        assert {k: v for k, v in after.items() if not k.startswith("run/")} == \
               {k: v for k, v in before.items() if not k.startswith("run/")}


def test_every_method_option_has_a_wrong_type_row():
    """One wrong-type row per option of every options class (meft2/meft3 share meft1's)."""
    import dataclasses

    from memtl.methods import available_methods, method_options

    rows = {(a[0], a[1].split("=")[0]) for e, a, *_ in CASES if e in ("train", "preflight") and len(a) == 2
            and a[0].startswith("method=") and a[1].startswith("method.")}
    classes = {}
    for name in available_methods():
        classes.setdefault(type(method_options(name)), name)  # the first method using each class
    missing = [f"method={name} method.{f.name}" for cls, name in classes.items() for f in dataclasses.fields(cls)
               if (f"method={name}", f"method.{f.name}") not in rows]
    assert not missing, missing
