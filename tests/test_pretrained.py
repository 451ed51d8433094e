"""Trained models people can use: memtl.save_pretrained / from_pretrained, the <run>/model
folder every training run writes, and eval.py.

Each model is trained a few steps, saved, then loaded in a fresh Python process, where its
eval-mode logits must equal the trained model's bit for bit.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose, run_cli
from omegaconf import OmegaConf

import memtl
from memtl.backbones import load_model, load_tokenizer
from memtl.data.glue import get_task
from memtl.errors import ConfigError
from memtl.run import run

METHODS = [m for m in memtl.available_methods() if m != "head"]  # every method but the linear probe
TINY = ["tiny_bert", "tiny_bart", "tiny_opt", "tiny_llama"]
SMOKE = ["trainer.limit_train_batches=3", "trainer.max_epochs=1", "data.max_eval_samples=24", "logger=none",
         "callbacks.memory.measure_batches=[1]", "callbacks.memory.timing_warmup=1", "trainer.enable_progress_bar=false"]
SENTENCES = ["a tiny test sentence", "another, somewhat longer sentence to pad the first one"]


def entry(name):
    return OmegaConf.load(REPO / "conf" / "backbone" / f"{name}.yaml")


def train_a_few_steps(backbone: str, method: str, folder: Path) -> None:
    """Train ``method`` on ``backbone`` for 3 steps (dropout on), save it to ``folder`` with
    the batch and the trained model's eval-mode logits beside it."""
    tok = load_tokenizer(entry(backbone))
    torch.manual_seed(0)
    model = memtl.apply_method(load_model(entry(backbone), 3, tok), method)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch, labels=torch.tensor([0, 2])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    memtl.save_pretrained(model, folder, tokenizer=tok)
    torch.save({"batch": batch, "logits": logits}, folder.parent / f"{folder.name}.reference.pt")


# every method on a tiny model of each family (random backbones: every weight is saved) and
# on the real MiniLM (trainable weights only; LoRA in peft's format)
CASES = [(b, m) for b in TINY for m in METHODS] + [("minilm", m) for m in METHODS]

LOAD_ALL = """
import json, sys, torch, memtl
out = {}
for folder in sys.argv[1:]:
    ref = torch.load(folder + ".reference.pt")
    model = memtl.from_pretrained(folder)
    assert not model.training
    with torch.no_grad():
        logits = model(**ref["batch"]).logits
    out[folder] = {"equal": torch.equal(logits, ref["logits"]), "max_diff": (logits - ref["logits"]).abs().max().item()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every case trained and saved here, then loaded in ONE fresh process."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for backbone, method in CASES:
        folders[backbone, method] = root / f"{backbone}-{method}"
        train_a_few_steps(backbone, method, folders[backbone, method])
    proc = subprocess.run([sys.executable, "-c", LOAD_ALL, *map(str, folders.values())], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case: result[str(folder)] | {"folder": folder} for case, folder in folders.items()}


@pytest.mark.parametrize("backbone, method", CASES)
def test_loaded_in_a_fresh_process_the_logits_are_bit_equal(reloaded, backbone, method):
    r = reloaded[backbone, method]
    assert r["equal"], f"max |diff| {r['max_diff']}"
    manifest = json.loads((r["folder"] / "memtl.json").read_text())
    assert manifest["method"] == method and manifest["backbone"]["name"] == backbone
    assert manifest["weights_cover"] == ("all" if backbone.startswith("tiny") else "trainable")
    assert (r["folder"] / "tokenizer_config.json").is_file() and (r["folder"] / "config.json").is_file()
    card = (r["folder"] / "README.md").read_text()
    assert f"fine-tuned with {method}" in card and "memtl.from_pretrained" in card


def test_trainable_only_folders_are_small(reloaded):
    """On a real backbone the folder holds the trainable weights, not the frozen backbone."""
    sizes = {m: sum(f.stat().st_size for f in reloaded["minilm", m]["folder"].glob("*.safetensors"))
             for m in METHODS}
    assert sizes["full"] > 80e6  # every MiniLM weight (22.7 M float32)
    assert all(sizes[m] < 0.1 * sizes["full"] for m in METHODS if m != "full"), sizes


def test_lora_folder_loads_with_peft_alone(reloaded):
    from peft import PeftModel

    folder = reloaded["minilm", "lora"]["folder"]
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    ref = torch.load(folder.parent / f"{folder.name}.reference.pt")
    base = load_model(entry("minilm"), 3)
    model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        assert torch.equal(model(**ref["batch"]).logits, ref["logits"])


def test_siamese_pair_model_round_trip(tmp_path):
    from memtl.siamese import SiameseModel, siamese_head

    tok = load_tokenizer(entry("minilm"))
    torch.manual_seed(0)
    model = SiameseModel(memtl.apply_method(siamese_head(load_model(entry("minilm"), 2, tok)), "sherl",
                                            preserve_start=True))
    a, b = (tok(SENTENCES[i::-1] if i else SENTENCES, padding=True, return_tensors="pt") for i in (0, 1))
    batch = {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"], "b_input_ids": b["input_ids"],
             "b_attention_mask": b["attention_mask"]}
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad.sign())
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    memtl.save_pretrained(model, tmp_path / "pair", tokenizer=tok)
    loaded = memtl.from_pretrained(tmp_path / "pair")
    assert isinstance(loaded, SiameseModel)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref)


# --- a training run writes <run>/model; eval.py reproduces its dev metrics ----------------


@pytest.mark.parametrize("backbone, method, task", [(b, m, "glue/rte") for b in TINY for m in METHODS] + [
    ("tiny_opt", "lora", "glue/mrpc"), ("tiny_llama", "sherl", "qa/arc_easy"), ("tiny_llama", "meft2", "qa/arc_easy"),
    ("minilm", "meft3", "glue/rte"),
])
def test_run_saves_its_best_model_and_eval_reproduces_the_dev_metrics(glue_root, tmp_path, backbone, method, task):
    from memtl.evaluate import evaluate

    data = [f"data.root={glue_root}"] if task.startswith("glue") else ["data.max_train_samples=24", "data.test=false"]
    res = run(compose([f"backbone={backbone}", f"method={method}", f"task={task}", *data, *SMOKE,
                       "data.batch_size=8", "trainer.max_epochs=2"], tmp_path))
    assert res["status"] == "completed" and res["model_dir"] == str(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "memtl.json").read_text())
    assert manifest["method"] == method and manifest["training"]["task"]["name"] == task.split("/")[1]
    report = evaluate(run_dir=str(tmp_path))
    assert report["metrics"] == res["best"]["metrics"]
    assert json.loads((tmp_path / "eval" / "dev.json").read_text())["metrics"] == res["best"]["metrics"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert "dev metrics (best)" in card and "peak step memory" in card


def test_eval_cli_on_a_run_and_on_a_model_dir(glue_root, tmp_path):
    res = run(compose(["backbone=tiny_roberta", "method=sherl", "task=glue/rte", f"data.root={glue_root}", *SMOKE],
                      tmp_path / "run"))
    proc = run_cli([f"run_dir={tmp_path / 'run'}"], script="eval.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval" / "dev.json").read_text())["metrics"] == res["best"]["metrics"]
    proc = run_cli([f"model_dir={tmp_path / 'run' / 'model'}", f"out={tmp_path / 'elsewhere'}"], script="eval.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "elsewhere" / "dev.json").read_text())["metrics"] == res["best"]["metrics"]


# --- bad input: one line, exit 2, nothing written -----------------------------------------


def _saved(tmp_path) -> Path:
    tok = load_tokenizer(entry("minilm"))
    model = memtl.apply_method(load_model(entry("minilm"), 3, tok), "meft1")
    return memtl.save_pretrained(model, tmp_path / "saved", tokenizer=tok)


def test_bad_folders_give_one_clear_error(tmp_path):
    folder = _saved(tmp_path)
    with pytest.raises(ConfigError, match="no such folder"):
        memtl.from_pretrained(tmp_path / "nope")
    tiny = memtl.save_pretrained(memtl.apply_method(load_model(entry("tiny_bert"), 3), "meft1"), tmp_path / "tiny")
    with pytest.raises(ConfigError, match="weights do not fit the backbone.*of another shape.*backbone=") as e:
        memtl.from_pretrained(tiny, backbone=dict(entry("minilm")))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="a random backbone needs every weight saved"):
        memtl.from_pretrained(folder, backbone=dict(entry("tiny_bert")))
    manifest = json.loads((folder / "memtl.json").read_text())
    (folder / "memtl.json").write_text(json.dumps({**manifest, "format": 99, "memtl_version": "9.0"}))
    with pytest.raises(ConfigError, match="memtl 9.0 in format 99.*upgrade memtl"):
        memtl.from_pretrained(folder)
    (folder / "memtl.json").write_text(json.dumps(manifest))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no model.safetensors: the folder is incomplete"):
        memtl.from_pretrained(folder)
    (folder / "memtl.json").unlink()
    with pytest.raises(ConfigError, match="has no memtl.json"):
        memtl.from_pretrained(folder)
    with pytest.raises(ConfigError, match="was not prepared by memtl.apply_method"):
        memtl.save_pretrained(load_model(entry("tiny_bert"), 2), tmp_path / "x")


@pytest.mark.parametrize("args, message", [
    ([], "give one of run_dir="),
    (["run_dir={tmp}/nope"], "no results.json there"),
    (["model_dir={tmp}/nope"], "no such folder"),
    (["run_dir={tmp}/unfinished"], "has no model/ (the run's status is 'failed')"),
    (["model_dir={tmp}/saved"], "does not say what it was trained on"),
    (["run_dir={tmp}/unfinished", "split=train"], "split=train: choose one of dev"),
    (["run_dr={tmp}"], "unknown key 'run_dr'"),
    (["--foo"], "unknown option --foo: eval.py takes key=value overrides"),
])
def test_eval_cli_bad_input(tmp_path, args, message):
    _saved(tmp_path)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "results.json").write_text(json.dumps({"status": "failed", "config": {}}))
    before = sorted(p for p in tmp_path.rglob("*"))
    proc = run_cli([a.format(tmp=tmp_path) for a in args], script="eval.py", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


# --- eval.py split=test: the GLUE server's files, QA predictions ----------------------------

GLUE_LABELS = {"cola": {"0", "1"}, "sst2": {"0", "1"}, "mrpc": {"0", "1"}, "qqp": {"0", "1"},
               "mnli": {"entailment", "neutral", "contradiction"}, "qnli": {"entailment", "not_entailment"},
               "rte": {"entailment", "not_entailment"}}
SERVER_FILES = {"cola": ["CoLA"], "sst2": ["SST-2"], "mrpc": ["MRPC"], "stsb": ["STS-B"], "qqp": ["QQP"],
                "mnli": ["MNLI-m", "MNLI-mm"], "qnli": ["QNLI"], "rte": ["RTE"]}


@pytest.fixture(scope="module")
def glue_with_tests(glue_root, tmp_path_factory):
    """The GLUE fixture plus test files: the real unlabelled ones where ../shared/data has
    them, QQP's and MNLI's two written in their real layout (index/id column, no label)."""
    import shutil

    from conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("glue_tests")
    shutil.copytree(glue_root / "glue_data", root / "glue_data")
    for task in ("CoLA", "SST-2", "MRPC", "STS-B", "QNLI", "RTE"):
        shutil.copy(SHARED_DATA / "glue_data" / task / "test.tsv", root / "glue_data" / task / "test.tsv")
    (root / "glue_data" / "QQP" / "test.tsv").write_text(
        "id\tquestion1\tquestion2\n" + "".join(f"{i}\tis it {i}?\tcould it be {i}?\n" for i in range(37)))
    head = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
           "sentence2_parse\tsentence1\tsentence2\n"
    for split, n in (("test_matched", 31), ("test_mismatched", 29)):
        (root / "glue_data" / "MNLI" / f"{split}.tsv").write_text(
            head + "".join(f"{i}\t{i}\t{i}n\tfiction\t( x )\t( x )\t( x )\t( x )\tA man sleeps {i}.\tA man is {i}.\n"
                           for i in range(n)))
    return root


def _rows(path: Path) -> int:
    return len([ln for ln in path.read_text(encoding="utf-8-sig").splitlines()[1:] if ln.strip()])


@pytest.mark.parametrize("task", list(SERVER_FILES))
def test_eval_test_split_writes_the_glue_server_files(glue_with_tests, tmp_path, task):
    from memtl.evaluate import evaluate

    res = run(compose(["backbone=tiny_bert", "method=lora", f"task=glue/{task}", f"data.root={glue_with_tests}",
                       *SMOKE, "trainer.max_steps=1"], tmp_path))
    assert res["status"] == "completed"
    report = evaluate(run_dir=str(tmp_path), split="test")
    assert sorted(report["files"]) == sorted(SERVER_FILES[task])
    sources = {"MNLI-m": "test_matched.tsv", "MNLI-mm": "test_mismatched.tsv"}
    for stem in SERVER_FILES[task]:
        lines = (tmp_path / "eval" / f"{stem}.tsv").read_text().splitlines()
        assert lines[0] == "index\tprediction"
        local = glue_with_tests / "glue_data" / get_task(task).local_dir
        expected_rows = _rows(local / sources.get(stem, "test.tsv"))
        assert len(lines) - 1 == expected_rows == report["files"][stem]["rows"]
        index, predictions = zip(*(ln.split("\t") for ln in lines[1:]))
        assert list(index[:3]) == ["0", "1", "2"]
        if task == "stsb":
            assert all(0.0 <= float(p) <= 5.0 and len(p.split(".")[1]) == 3 for p in predictions)
        else:
            assert set(predictions) <= GLUE_LABELS[task]


def test_eval_test_split_writes_qa_predictions(tmp_path):
    from memtl.evaluate import evaluate

    run(compose(["backbone=tiny_llama", "method=meft1", "task=qa/arc_easy", "data.max_train_samples=16",
                       *SMOKE, "trainer.max_steps=1", "data.batch_size=8"], tmp_path))
    report = evaluate(run_dir=str(tmp_path), split="test")
    lines = [json.loads(ln) for ln in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert report["qa_split"] == "test" and len(lines) == report["questions"] == 24  # data.max_eval_samples
    assert all(ln["id"] and 0 <= ln["prediction"] < 5 and ln["answer"] is not None for ln in lines)
    assert report["accuracy"] == pytest.approx(sum(ln["prediction"] == ln["answer"] for ln in lines) / 24)


@pytest.mark.parametrize("backbone", ["tiny_llama", "minilm"])
def test_a_folder_saved_before_peft_wrapped_sherls_late_lora_loads(backbone, tmp_path):
    """SHERL's late LoRA was hand-written before it went through peft: its saved keys
    (``q_proj.weight``, ``q_proj.lora_A.weight``) load into peft's names, giving the same logits."""
    from safetensors.torch import load_file, save_file

    tok = load_tokenizer(entry(backbone))
    torch.manual_seed(0)
    model = memtl.apply_method(load_model(entry(backbone), 3, tok), "sherl", late_layers=1, late_tuning="lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 at init would hide a LoRA left out on load
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    memtl.save_pretrained(model, tmp_path / "m", tokenizer=tok)
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    legacy = {k.replace(".base_layer.", ".").replace(".default.", "."): v for k, v in state.items()}
    assert any(".lora_A.weight" in k for k in legacy) and legacy.keys() != state.keys()
    save_file(legacy, str(weights))
    with torch.no_grad():
        again = memtl.from_pretrained(tmp_path / "m")(**batch).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_a_meft_folder_saved_before_method_output_loads_with_the_average(tmp_path, variant):
    """MEFT's decoder default became output=chain; a folder whose options predate the option ran
    the streams' average and must load as that, with the same logits."""
    tok = load_tokenizer(entry("tiny_llama"))
    torch.manual_seed(0)
    model = memtl.apply_method(load_model(entry("tiny_llama"), 3, tok), variant, output="mean")
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    memtl.save_pretrained(model, tmp_path / "m", tokenizer=tok)
    manifest = json.loads((tmp_path / "m" / "memtl.json").read_text())
    assert manifest["options"].pop("output") == "mean"
    (tmp_path / "m" / "memtl.json").write_text(json.dumps(manifest))
    with torch.no_grad():
        again = memtl.from_pretrained(tmp_path / "m")(**batch).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    from memtl.methods.meft import meft_stacks

    loaded = memtl.from_pretrained(tmp_path / "m")
    assert [s.output_stream for s in meft_stacks(loaded)] == [None]  # the average, not the new default (chain)
