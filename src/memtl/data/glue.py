"""GLUE: task table, strict local TSV reader (original `glue_data` layout), hub fallback,
and a Lightning DataModule with cached tokenization and dynamic padding.

Labels follow the Hugging Face `nyu-mll/glue` ids, so a model trained from local files
and one trained from the hub agree on what label 0 means.

Metric key names (what `memtl.metrics.GlueMetrics` returns, before any "val/" prefix):
every task logs its `metrics` for its first eval split under the bare name
(`accuracy`, `f1`, `mcc`, `pearson`, `spearman`); MNLI's second eval split
(validation_mismatched) logs the same names prefixed with `mm_` (`mm_accuracy`).
`main_metric` names one of those keys; all of them are "higher is better".
"""

import csv
import dataclasses
import hashlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from memtl.data.loading import (
    Collate,
    SiameseSplit,
    TokenCache,
    TokenizedSplit,
    check_data_options,
    make_loader,
    resolve_root,
    train_loader,
)
from memtl.errors import ConfigError

log = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# task table


@dataclass(frozen=True)
class GlueTask:
    name: str  # config name in nyu-mll/glue
    local_dir: str  # folder under glue_data/
    text_keys: tuple[str, ...]  # the 1 or 2 sentence fields (hub field names)
    num_labels: int  # 1 for regression
    is_regression: bool
    label_names: tuple[str, ...]  # in hub label-id order; () for regression
    metrics: tuple[str, ...]  # computed for every eval split
    main_metric: str  # key model selection monitors (first eval split unless prefixed)
    eval_splits: tuple[str, ...] = ("validation",)
    eval_prefixes: tuple[str, ...] = ("",)  # metric-key prefix per eval split
    # local TSV layout: the column (header name; index when headerless) of each text key
    # and of the label, and the label strings as written in the files, in label-id order
    text_columns: tuple = ()
    label_column: str | int = "label"
    file_labels: tuple[str, ...] = ()  # () -> the label is a float score
    header: bool = True  # CoLA's train/dev files have none
    num_columns: int | None = None  # headerless files only

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Every key the metrics produce over all eval splits, e.g. accuracy, mm_accuracy."""
        return tuple(p + m for p in self.eval_prefixes for m in self.metrics)


_BINARY = ("0", "1")
GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", ("sentence",), 2, False, ("unacceptable", "acceptable"),
                 ("mcc",), "mcc",
                 text_columns=(3,), label_column=1, file_labels=_BINARY, header=False, num_columns=4),
        GlueTask("sst2", "SST-2", ("sentence",), 2, False, ("negative", "positive"),
                 ("accuracy",), "accuracy",
                 text_columns=("sentence",), file_labels=_BINARY),
        # MRPC/QQP: GLUE reports F1 and accuracy; the MEFT paper selects and reports accuracy
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), 2, False, ("not_equivalent", "equivalent"),
                 ("accuracy", "f1"), "accuracy",
                 text_columns=("#1 String", "#2 String"), label_column="Quality", file_labels=_BINARY),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), 1, True, (),
                 ("pearson", "spearman"), "pearson",
                 text_columns=("sentence1", "sentence2"), label_column="score"),
        GlueTask("qqp", "QQP", ("question1", "question2"), 2, False, ("not_duplicate", "duplicate"),
                 ("accuracy", "f1"), "accuracy",
                 text_columns=("question1", "question2"), label_column="is_duplicate", file_labels=_BINARY),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), 3, False, ("entailment", "neutral", "contradiction"),
                 ("accuracy",), "accuracy",
                 eval_splits=("validation_matched", "validation_mismatched"), eval_prefixes=("", "mm_"),
                 text_columns=("sentence1", "sentence2"), label_column="gold_label",
                 file_labels=("entailment", "neutral", "contradiction")),
        GlueTask("qnli", "QNLI", ("question", "sentence"), 2, False, ("entailment", "not_entailment"),
                 ("accuracy",), "accuracy",
                 text_columns=("question", "sentence"), file_labels=("entailment", "not_entailment")),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), 2, False, ("entailment", "not_entailment"),
                 ("accuracy",), "accuracy",
                 text_columns=("sentence1", "sentence2"), file_labels=("entailment", "not_entailment")),
    ]
}

# local file of each split in the glue_data layout
_LOCAL_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test": "test.tsv",  # the unlabelled test splits (predictions for the GLUE server)
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}

#: each task's test split(s) and the file the GLUE server expects for each
SUBMISSION_FILES = {"cola": {"test": "CoLA"}, "sst2": {"test": "SST-2"}, "mrpc": {"test": "MRPC"},
                    "stsb": {"test": "STS-B"}, "qqp": {"test": "QQP"},
                    "mnli": {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"},
                    "qnli": {"test": "QNLI"}, "rte": {"test": "RTE"}}


def get_task(name, main_metric: str | None = None) -> GlueTask:
    """Look a task up by name ("rte", "glue/rte", "SST-2" all work); optionally override
    its main metric (the task yaml's `main_metric`)."""
    if isinstance(name, GlueTask):
        task = name
    else:
        key = str(name).lower().removeprefix("glue/").replace("-", "").replace("_", "")
        if key not in GLUE_TASKS:
            raise ConfigError(f"unknown GLUE task {name!r}; set task.name to one of {', '.join(GLUE_TASKS)}")
        task = GLUE_TASKS[key]
    if main_metric is not None and main_metric != task.main_metric:
        if main_metric not in task.metric_keys:
            raise ConfigError(f"task.main_metric={main_metric!r} is not computed for {task.name}; "
                              f"set it to one of {', '.join(task.metric_keys)}")
        task = dataclasses.replace(task, main_metric=main_metric)
    return task


# -----------------------------------------------------------------------------
# locating and reading the files


def _glue_dir(root: Path) -> Path:
    # accept both the data root (holding glue_data/) and the glue_data folder itself
    return root / "glue_data" if (root / "glue_data").is_dir() else root


def _local_file(task: GlueTask, split: str, root: Path) -> Path:
    return _glue_dir(root) / task.local_dir / _LOCAL_FILES[split]


def _bad(path, line, what) -> ConfigError:
    where = f"{path}:{line}" if line else str(path)
    return ConfigError(f"{where}: {what}; fix or restore the file "
                       "(see ../shared/data/README.md) or set data.root=<folder with an intact glue_data/>")


def _parse_tsv(data: bytes, path: Path, task: GlueTask) -> list[dict]:
    """Strictly parse one labelled GLUE TSV (raw bytes of `path`) into rows
    {text_key: str, ..., "label": int | float}."""
    try:
        text = data.decode("utf-8-sig")  # MRPC files start with a BOM
    except UnicodeDecodeError as e:
        raise _bad(path, data.count(b"\n", 0, e.start) + 1, f"not valid UTF-8 ({e.reason})") from None
    # QUOTE_NONE: GLUE sentences contain stray quotes that must stay part of the text
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows, cols, label_col = [], task.text_columns, task.label_column
    ncols = None if task.header else task.num_columns  # None until the header line is read
    for fields in reader:
        line = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line (e.g. an extra trailing newline)
        if ncols is None:  # the header: find the columns by name
            missing = [c for c in (*cols, label_col) if c not in fields]
            if missing:
                raise _bad(path, line, f"header {fields} lacks column(s) {missing} expected for {task.name}")
            ncols, cols, label_col = len(fields), [fields.index(c) for c in cols], fields.index(label_col)
            continue
        if len(fields) != ncols:
            raise _bad(path, line, f"expected {ncols} tab-separated columns, got {len(fields)}")
        raw = fields[label_col].strip()
        if task.is_regression:
            try:
                label = float(raw)
            except ValueError:
                label = math.nan
            if not math.isfinite(label):
                raise _bad(path, line, f"score {raw!r} is not a finite number")
        elif raw in task.file_labels:
            label = task.file_labels.index(raw)
        else:
            raise _bad(path, line, f"label {raw!r} is not one of {list(task.file_labels)}")
        rows.append({k: fields[c] for k, c in zip(task.text_keys, cols)} | {"label": label})
    if not rows:
        raise _bad(path, None, "empty file (no data rows)")
    return rows


def _parse_test_tsv(data: bytes, path: Path, task: GlueTask) -> list[dict]:
    """One unlabelled GLUE test TSV (always with a header; CoLA's names its text column
    ``sentence``, QQP's index ``id``) into rows {text_key: str, ..., "index": str, "label": 0}."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _bad(path, data.count(b"\n", 0, e.start) + 1, f"not valid UTF-8 ({e.reason})") from None
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    names = ("sentence",) if task.name == "cola" else task.text_columns
    rows, cols = [], None
    for fields in reader:
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if cols is None:
            index = "index" if "index" in fields else "id"
            missing = [c for c in (index, *names) if c not in fields]
            if missing:
                raise _bad(path, reader.line_num, f"header {fields} lacks column(s) {missing} of a {task.name} test file")
            ncols, cols, at = len(fields), [fields.index(c) for c in names], fields.index(index)
            continue
        if len(fields) != ncols:
            raise _bad(path, reader.line_num, f"expected {ncols} tab-separated columns, got {len(fields)}")
        rows.append({k: fields[c] for k, c in zip(task.text_keys, cols)}
                    | {"index": fields[at], "label": 0.0 if task.is_regression else 0})
    if not rows:
        raise _bad(path, None, "empty file (no data rows)")
    return rows


def read_glue_tsv(path, task) -> list[dict]:
    """Read one local GLUE TSV file, strictly (any defect -> ConfigError naming file and line)."""
    task, path = get_task(task), Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; set data.root=<folder laid out like ../shared/data>")
    return _parse_tsv(path.read_bytes(), path, task)


class _Source:
    """Where one split comes from: a local file or the hub. `fingerprint` identifies the
    content cheaply (file hash / datasets fingerprint); `rows()` parses it."""

    def __init__(self, task: GlueTask, split: str, root: Path | None):
        if split not in _LOCAL_FILES:
            raise ConfigError(f"unknown GLUE split {split!r}; use one of {', '.join(_LOCAL_FILES)}")
        self.task, self.split, self.path, self.hub = task, split, None, None
        where = None
        if root is not None:
            path = _local_file(task, split, root)
            if path.is_file():
                self.path, self.data = path, path.read_bytes()
                self.fingerprint = "file:" + hashlib.sha256(self.data).hexdigest()
                return
            where = path
        try:  # no local copy: fall back to the hub (fails fast when HF_HUB_OFFLINE=1)
            import datasets

            self.hub = datasets.load_dataset("nyu-mll/glue", task.name, split=split)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            looked = (f"no local file {where}" if where
                      else "no local data root (data.root unset, ../shared/data missing)")
            raise ConfigError(
                f"GLUE {task.name}/{split}: {looked} and the Hugging Face hub is unreachable "
                f"({type(e).__name__}: {reason}); set data.root=<folder laid out like ../shared/data, "
                f"i.e. holding glue_data/{task.local_dir}/{_LOCAL_FILES[split]}>, or go online") from None
        log.info("GLUE %s/%s: no local file, loaded nyu-mll/glue from the hub", task.name, split)
        self.fingerprint = "hub:" + self.hub._fingerprint

    def rows(self) -> list[dict]:
        test = self.split.startswith("test")
        if self.path is not None:
            return (_parse_test_tsv if test else _parse_tsv)(self.data, self.path, self.task)
        if test:  # the hub's test labels are -1: unlabelled
            return [{k: r[k] for k in self.task.text_keys} | {"index": str(r["idx"]), "label": 0.0
                    if self.task.is_regression else 0} for r in self.hub]
        return [{k: r[k] for k in self.task.text_keys} | {"label": r["label"]} for r in self.hub]


def read_glue_split(task, split: str = "train", root=None) -> list[dict]:
    """The plain reader: rows {text_key: str, ..., "label": int | float} of one split, from
    `root` (None -> default_data_root()) in the glue_data layout, else from the hub."""
    return _Source(get_task(task), split, resolve_root(root)).rows()


# -----------------------------------------------------------------------------
# tokenization


PAIR_ENCODINGS = ("cross", "siamese")


def tokenize_rows(rows, task: GlueTask, tokenizer, max_length: int, chunk: int = 8192,
                  pair_encoding: str = "cross") -> TokenizedSplit | SiameseSplit:
    """``cross``: one sequence per row (a sentence pair joined by the tokenizer, BERT's GLUE
    recipe); ``siamese``: each sentence of a pair tokenized on its own (a ``SiameseSplit``)."""
    check_pair_encoding(pair_encoding, task)
    if pair_encoding == "siamese":
        a, b = (tokenize_rows(rows, dataclasses.replace(task, text_keys=(k,)), tokenizer, max_length, chunk)
                for k in task.text_keys)
        return SiameseSplit(a, b)
    # in chunks: python lists of token ids for a whole large task (QQP, MNLI) would take GBs
    parts = []
    for i in range(0, len(rows), chunk):
        texts = [[r[k] for r in rows[i:i + chunk]] for k in task.text_keys]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        parts.append({k: torch.tensor([t for x in v for t in x], dtype=torch.int32) for k, v in enc.items()})
        parts[-1]["_len"] = torch.tensor([len(x) for x in enc["input_ids"]])
    features = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), features.pop("_len").cumsum(0)])
    dtype = torch.float32 if task.is_regression else torch.long
    labels = torch.tensor([r["label"] for r in rows], dtype=dtype)
    return TokenizedSplit(features, offsets, labels)


# -----------------------------------------------------------------------------
# evaluation protocols (data.protocol; memtl.data.loading.PROTOCOLS lists them)

# Ladder Side-Tuning (Sung et al., 2022; also SHERL's GLUE protocol), from its
# `seq2seq/data/tasks.py`: the tasks under 10k training examples split the official dev
# set in half (validation / test); the others hold out 1k training examples as validation
# and use the official dev set as test. Splits come from `torch.randperm` seeded with the
# data seed (LST's `data_seed`, 42 by default, independent of the training seed).
LST_SMALL_TASKS = ("cola", "mrpc", "stsb", "rte")
LST_HOLDOUT = 1000


# -----------------------------------------------------------------------------
# the DataModule


def check_pair_encoding(pair_encoding: str, task: GlueTask) -> None:
    if pair_encoding not in PAIR_ENCODINGS:
        raise ConfigError(f"data.pair_encoding={pair_encoding}: choose cross (one sequence per pair) or siamese "
                          "(each sentence encoded apart)")
    if pair_encoding == "siamese" and len(task.text_keys) != 2:
        raise ConfigError(f"data.pair_encoding=siamese needs a sentence-pair task; {task.name} has one sentence "
                          "per example: set data.pair_encoding=cross")


class GlueDataModule(L.LightningDataModule):
    """One GLUE task: train split + eval splits (`task.eval_splits` order = Lightning's
    dataloader_idx). max_train_samples / max_eval_samples keep the FIRST N rows of each
    split (deterministic, file order) — for smoke tests and quick sweeps.

    `protocol` decides what the splits are:

    - "dev": train on train; `val_dataloader()` (model selection) is the official dev
      set(s); `test_dataloader()` returns the same dev set(s).
    - "lst": the Ladder Side-Tuning / SHERL protocol. RTE, MRPC, STS-B, CoLA: train on
      the whole train split; the official dev set, shuffled with `split_seed`, is cut in
      half: first half = validation, second half = test. SST-2, QNLI, QQP: the train
      split, shuffled with `split_seed`, gives its first 1000 rows to validation and the
      rest to training; the official dev set is the test set. (MNLI, with two dev sets,
      is not supported under "lst" yet.) `max_*_samples` then keep the first N rows of the
      derived splits (in shuffled order). `lst_indices[split]` = (source split, row indices).

    The LightningModule evaluates `val_dataloader()` during fit (model selection); the test
    split is `test_dataloader()`, which Lightning's test stage (`trainer.test(module,
    datamodule=dm)`, with a `test_step` in the module) evaluates and reports."""

    def __init__(self, task, tokenizer, root=None, max_length: int = 128, batch_size: int = 16,
                 eval_batch_size: int | None = None, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, group_by_length: bool = False,
                 num_workers: int = 0, seed: int = 42, cache_dir=None, protocol: str = "dev",
                 split_seed: int = 42, pair_encoding: str = "cross"):
        super().__init__()
        check_data_options(protocol=protocol, split_seed=split_seed, max_length=max_length,
                           batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                           max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
        if tokenizer.pad_token is None:
            raise ConfigError("the tokenizer has no pad token, needed for dynamic padding; set one "
                              "(e.g. tokenizer.pad_token = tokenizer.eos_token) when loading the backbone")
        self._task = get_task(task)
        check_pair_encoding(pair_encoding, self._task)
        self.pair_encoding = pair_encoding
        if protocol == "lst" and len(self._task.eval_splits) > 1:
            raise ConfigError(f"data.protocol=lst does not support {self._task.name} yet (two dev sets, while "
                              "the training module expects one validation loader per dev set); set data.protocol=dev")
        self.protocol, self.split_seed = protocol, split_seed
        self.tokenizer, self.max_length = tokenizer, max_length
        self.root = resolve_root(root)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.group_by_length, self.num_workers, self.seed = group_by_length, num_workers, seed
        self.cache = TokenCache(tokenizer, cache_dir)
        self.collate = Collate(tokenizer)
        self.train_set, self.eval_sets, self.test_sets = None, None, None
        self.lst_indices: dict[str, tuple[str, list[int]]] = {}

    @property
    def task(self) -> GlueTask:
        return self._task

    @property
    def cache_dir(self) -> Path:
        return self.cache.dir

    @property
    def cache_hits(self) -> int:
        return self.cache.hits

    @property
    def cache_misses(self) -> int:
        return self.cache.misses

    @property
    def num_labels(self) -> int:
        return self._task.num_labels

    @property
    def train_size(self) -> int:
        if self.train_set is None:
            self.setup("fit")
        return len(self.train_set)

    def prepare_data(self):
        # Lightning runs this on one process per node: fill the cache before the ranks read it
        for split in ("train", *self._task.eval_splits):
            self._load(split, whole=self.protocol == "lst")

    def setup(self, stage: str | None = None):
        if self.protocol == "lst":
            if self.eval_sets is None:
                self._setup_lst()
            return
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._load("train")
        if self.eval_sets is None:
            self.eval_sets = [self._load(s) for s in self._task.eval_splits]
        self.test_sets = self.eval_sets  # "dev": the official dev set is what is reported

    def _setup_lst(self):
        task, n_val = self._task, LST_HOLDOUT
        train = self._load("train", whole=True)
        (dev_split,) = task.eval_splits
        dev = self._load(dev_split, whole=True)
        if task.name in LST_SMALL_TASKS:  # dev split in half
            perm = torch.randperm(len(dev), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
            half = len(dev) // 2
            self.lst_indices = {"train": ("train", list(range(len(train)))),
                                "validation": (dev_split, perm[:half]), "test": (dev_split, perm[half:])}
        else:  # 1k of train held out for validation
            if len(train) <= n_val:
                raise ConfigError(f"data.protocol=lst holds out {n_val} training examples of {task.name} for "
                                  f"validation, but its train split has only {len(train)}; set data.protocol=dev")
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
            self.lst_indices = {"train": ("train", perm[n_val:]), "validation": ("train", perm[:n_val]),
                                "test": (dev_split, list(range(len(dev))))}
        source = {"train": train, dev_split: dev}

        def part(name, limit):
            src, idx = self.lst_indices[name]
            return source[src].select(idx[:limit])

        self.train_set = part("train", self.max_train_samples)
        self.eval_sets = [part("validation", self.max_eval_samples)]
        self.test_sets = [part("test", self.max_eval_samples)]

    def _load(self, split: str, whole: bool = False) -> TokenizedSplit:
        """One source split, tokenized (cached); its first max_*_samples rows unless `whole`."""
        limit = None if whole else self.max_train_samples if split == "train" else self.max_eval_samples
        source = _Source(self._task, split, self.root)
        # these settings, in this order, are in the key existing cache files are named by: keep them so
        siamese = ["siamese"] if self.pair_encoding == "siamese" else []
        path = self.cache.path(self._task.name, split, source.fingerprint,
                               self.max_length, self._task.name, split, limit, *siamese)
        ds = self.cache.load(path)
        if ds is not None:
            log.info("GLUE %s/%s: %d rows from cache %s", self._task.name, split, len(ds), path)
            return ds
        rows = source.rows()[:limit]
        ds = tokenize_rows(rows, self._task, self.tokenizer, self.max_length, pair_encoding=self.pair_encoding)
        self.cache.store(path, ds)
        log.info("GLUE %s/%s: %d rows tokenized from %s", self._task.name, split, len(ds),
                 source.path or "the hub")
        return ds

    def test_predict_sets(self) -> list[tuple[str, list[str], TokenizedSplit]]:
        """The unlabelled test split(s), whole: (the GLUE server's file stem, each row's index,
        the tokenized rows in file order)."""
        out = []
        for split, stem in SUBMISSION_FILES[self._task.name].items():
            indices = [r["index"] for r in _Source(self._task, split, self.root).rows()]
            out.append((stem, indices, self._load(split, whole=True)))
        return out

    def _loader(self, ds, batch_size, **kw) -> DataLoader:
        return make_loader(ds, batch_size, self.collate, self.num_workers, self.seed, **kw)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return train_loader(self.train_set, self.batch_size, self.collate, self.num_workers, self.seed,
                            self.group_by_length)

    def val_dataloader(self) -> list[DataLoader]:
        if self.eval_sets is None:
            self.setup("validate")
        return [self._loader(ds, self.eval_batch_size, shuffle=False) for ds in self.eval_sets]

    def test_dataloader(self) -> list[DataLoader]:
        """The reported split(s): the official dev set(s) ("dev"), LST's test split ("lst")."""
        if self.test_sets is None:
            self.setup("test")
        return [self._loader(ds, self.eval_batch_size, shuffle=False) for ds in self.test_sets]
