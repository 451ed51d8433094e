"""The command line as a user meets it: --help, and bad input -> one clear line, exit 2, nothing lost."""
import pytest
from conftest import run_cli


def test_help_lists_groups_and_options():
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    for line in ("backbone: bart_base, bart_large, bert_base, minilm, opt_125m, opt_1_3b, opt_350m, roberta_base, "
                 "roberta_large, smollm2_135m, tiny_bart, tiny_bert, tiny_llama, tiny_opt, tiny_roberta",
                 "method: full", "trainer: auto, cpu, ddp, gpu", "logger: csv, none, wandb",
                 "task/glue: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb",
                 "task/qa: arc_challenge, arc_easy, openbookqa, piqa, sciq"):
        assert line in proc.stdout, line
    assert "gradient_checkpointing" in proc.stdout and "max_train_samples" in proc.stdout
    assert "memtl options [method]" in proc.stdout


def test_memtl_options_lists_every_option_from_its_declaration(capsys):
    """``memtl options``: each option of each method as name=default, what it is, what it allows."""
    import dataclasses

    from memtl.cli import main
    from memtl.methods import available_methods, method_options

    assert main(["options", "lora", "meft1"]) == 0
    out = capsys.readouterr().out
    for line in ("method=lora", "  r=8 ", "the LoRA rank: an integer >= 1", "alpha=16 ", "dropout=0.1 ",
                 "a number in [0, 1)", "target_modules=null ", "a non-empty list of names, or null for the query/value",
                 "gradient_checkpointing=false ", "method=meft1", "adapter_activation=relu ",
                 "one of gelu, identity, relu, silu, swish, tanh", "lam=null ", "a finite non-zero number, or null for the "
                 "variant's default", "inverse=exact ", "exact (fixed-point streams, bit-exact at any depth) or float"):
        assert line in out, line
    assert main(["options"]) == 0
    out = capsys.readouterr().out
    for name in available_methods():
        assert f"method={name}" in out
        for f in dataclasses.fields(method_options(name)):
            assert f"  {f.name}=" in out, (name, f.name)
    assert "method=head (no options)" in out
    assert main(["options", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown method 'nope': choose one of full, head, lora, meft1, meft2, meft3, sherl"]


BAD = [
    (["method=nope"], "unknown method 'nope': choose one of full, head, lora"),
    (["-m", "method=full,nope"], "unknown method 'nope'"),
    (["task=glue/foo"], "unknown task 'glue/foo': choose one of glue/cola"),
    (["backbone=gpt9"], "unknown backbone 'gpt9': choose one of bart_base"),
    (["method.foo=1"], "unknown key 'method.foo': the keys under 'method' are gradient_checkpointing, lr, name"),
    (["+method.foo=1"], "method 'full' has no option 'foo'"),
    (["method=full,"], "cannot parse the command line"),
    (["optim.lr=-1"], "optim.lr=-1: the learning rate must be > 0"),
    (["method=lora", "method.r=0"], "method.r=0: the LoRA rank must be an integer >= 1"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.root=/nonexistent/folder"], "data.root=/nonexistent/folder is not a folder"),
    (["trainer.precision=8"], "trainer.precision=8: choose one of"),
    (["task.main_metric=f1"], "task.main_metric='f1' is not computed for rte"),
    (["guard.nonfinite=maybe"], "guard.nonfinite=maybe: choose stop or skip"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(args, needle, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["backbone=tiny_bert", "logger=none", *args, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "a rejected command must not create its run folder"


def test_bad_input_found_once_the_model_is_loaded(tmp_path):
    """Target modules can only be checked against the loaded model: the run folder then
    records the failure in results.json."""
    import json

    out = tmp_path / "run"
    proc = run_cli(["backbone=tiny_bert", "logger=none", "method=lora", "method.target_modules=[foo]",
                    f"hydra.run.dir={out}"])
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "method.target_modules: no module named 'foo'" in errors[0], proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and "no module named 'foo'" in res["error"]


def test_bad_input_found_late_keeps_earlier_results(tmp_path, glue_root):
    """Data and backbone problems surface after Hydra made the folder: earlier results survive."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"status": "completed", "sentinel": true}\n')
    empty = tmp_path / "empty_root"
    (empty / "glue_data" / "RTE").mkdir(parents=True)
    (empty / "glue_data" / "RTE" / "train.tsv").write_text("")
    proc = run_cli(["backbone=tiny_bert", "logger=none", f"data.root={empty}", f"hydra.run.dir={out}"])
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "train.tsv" in errors[0] and "empty" in errors[0], proc.stderr[-2000:]
    kept = list(out.glob("results.previous-*.json"))
    assert len(kept) == 1 and '"sentinel": true' in kept[0].read_text()
