"""Multiple-choice QA: OpenBookQA, PIQA, ARC-Easy, ARC-Challenge, SciQ.

Strict readers for the local release files (``../shared/data``, see its README) and the
Hugging Face hub as fallback, the prompt each task uses, and a Lightning DataModule whose
batches suit the head the backbone uses for QA (``memtl.backbones.qa_head``); the model
side (scoring, objective) is ``memtl.scoring``.

Splits (the local files; a split without a local file comes from the hub when online):

  task           train                          validation (model selection)          test (reported)
  arc_easy       ARC-Easy-Train.jsonl           ARC-Easy-Dev.jsonl                    ARC-Easy-Test.jsonl
  arc_challenge  ARC-Challenge-Train.jsonl      ARC-Challenge-Dev.jsonl               ARC-Challenge-Test.jsonl
  openbookqa     Main/train.jsonl               Main/dev.jsonl, else the reformatted  Main/test.jsonl
                                                dev_nutcracker_format/dev.json
  piqa           train.jsonl + train-labels.lst valid.jsonl + valid-labels.lst         -- (tests.jsonl is unlabeled)
                 (train.jsonl is not local: hub)
  sciq           train.json (not local: hub)    valid.json                            test.json

Prompts follow EleutherAI's lm-evaluation-harness, so zero-shot numbers compare with
published ones; a choice is scored as the continuation ``" " + choice``:

  arc_*       "Question: {question}\\nAnswer:"
  openbookqa  "{question_stem}"                   (mostly sentence completions)
  piqa        "Question: {goal}\\nAnswer:"
  sciq        "{support}\\nQuestion: {question}\\nAnswer:"   (support passage first)

SciQ lists the correct answer apart from three distractors: the four are put in an order
shuffled with a seed taken from the question and answer text (``random.Random(str)`` hashes
with SHA-512), so the order is the same on every run and from local files or the hub, and
the answer is not always first.

Every reader error is one line ``file:line: what; fix`` (a ConfigError).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from memtl.data.loading import check_data_options, make_loader, resolve_root, train_loader
from memtl.errors import ConfigError

log = logging.getLogger(__name__)

LENGTH_NORMS = ("none", "token", "char")


@dataclass(frozen=True)
class QATask:
    name: str
    num_labels: int  # the most choices a question has (accuracy's class count)
    hub: tuple[str, str | None]  # (dataset path, config name)
    files: dict  # split -> list of candidate local files (first found wins), each (format, paths...)
    length_norm: str = "char"  # how a choice's log-likelihood is normalised (memtl.scoring)
    family: str = "qa"
    is_regression: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    eval_splits: tuple[str, ...] = ("validation",)
    eval_prefixes: tuple[str, ...] = ("",)
    splits: tuple[str, ...] = field(default=("train", "validation", "test"))

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return tuple(p + m for p in self.eval_prefixes for m in self.metrics)

    def prompt(self, row: dict) -> str:
        if self.name == "openbookqa":
            return row["question"]
        if self.name == "sciq":
            return f"{row.get('support', '').lstrip()}\nQuestion: {row['question']}\nAnswer:"
        return f"Question: {row['question']}\nAnswer:"


def _arc(name):
    d = f"ARC/{name}/{name}"
    return {"train": [("arc", f"{d}-Train.jsonl")], "validation": [("arc", f"{d}-Dev.jsonl")],
            "test": [("arc", f"{d}-Test.jsonl")]}


QA_TASKS: dict[str, QATask] = {t.name: t for t in [
    QATask("arc_easy", 5, ("allenai/ai2_arc", "ARC-Easy"), _arc("ARC-Easy")),
    QATask("arc_challenge", 5, ("allenai/ai2_arc", "ARC-Challenge"), _arc("ARC-Challenge")),
    QATask("openbookqa", 4, ("allenai/openbookqa", "main"),
           {"train": [("arc", "openbookqa/Main/train.jsonl")],
            "validation": [("arc", "openbookqa/Main/dev.jsonl"),
                           ("nutcracker", "openbookqa/dev_nutcracker_format/dev.json")],
            "test": [("arc", "openbookqa/Main/test.jsonl")]}),
    QATask("piqa", 2, ("ybisk/piqa", None),
           {"train": [("piqa", "piqa/train.jsonl", "piqa/train-labels.lst")],
            "validation": [("piqa", "piqa/valid.jsonl", "piqa/valid-labels.lst")]},
           splits=("train", "validation")),
    QATask("sciq", 4, ("allenai/sciq", None),
           {"train": [("sciq", "sciq/train.json")], "validation": [("sciq", "sciq/valid.json")],
            "test": [("sciq", "sciq/test.json")]}),
]}


def is_qa_task(name) -> bool:
    return isinstance(name, QATask) or str(name).lower().removeprefix("qa/") in QA_TASKS


def get_qa_task(name, main_metric: str | None = None, length_norm: str | None = None) -> QATask:
    if isinstance(name, QATask):
        task = name
    else:
        key = str(name).lower().removeprefix("qa/")
        if key not in QA_TASKS:
            raise ConfigError(f"unknown QA task {name!r}; set task.name to one of {', '.join(QA_TASKS)}")
        task = QA_TASKS[key]
    if main_metric is not None and main_metric not in task.metric_keys:
        raise ConfigError(f"task.main_metric={main_metric!r} is not computed for {task.name}; "
                          f"set it to one of {', '.join(task.metric_keys)}")
    if length_norm is not None and length_norm != task.length_norm:
        if length_norm not in LENGTH_NORMS:
            raise ConfigError(f"task.length_norm={length_norm!r} is unknown; choose none (summed log-likelihood), "
                              "token (mean per token) or char (per character, lm-eval's acc_norm)")
        task = replace(task, length_norm=length_norm)
    return task


# -----------------------------------------------------------------------------
# strict readers: each returns rows {"question", "choices": [str], "label": int, ["support"]}


def _bad(path, line, what) -> ConfigError:
    where = f"{path}:{line}" if line else str(path)
    return ConfigError(f"{where}: {what}; fix or restore the file (see ../shared/data/README.md) "
                       "or set data.root=<folder with intact QA files>")


def _jsonl(path: Path):
    """(line number, object) per non-empty line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, None, f"not valid UTF-8 ({e.reason})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad(path, i, f"not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _bad(path, i, f"expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _text(path, line, obj, *keys) -> str:
    value = obj
    for k in keys:
        value = value.get(k) if isinstance(value, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, line, f"field {'.'.join(keys)!r} is missing or not a non-empty string")
    return value


def _finish(rows, path) -> list[dict]:
    if not rows:
        raise _bad(path, None, "empty file (no questions)")
    return rows


LABEL_SETS = ("ABCDE", "12345")


def read_arc_jsonl(path, num_choices=(3, 4, 5)) -> list[dict]:
    """ARC and OpenBookQA Main jsonl: ``question.stem``, ``question.choices[{text, label}]``,
    ``answerKey``; labels A.. or 1.. in order (ARC mixes both across questions)."""
    path, rows = Path(path), []
    for i, obj in _jsonl(path):
        stem = _text(path, i, obj, "question", "stem")
        choices = (obj.get("question") or {}).get("choices")
        if not isinstance(choices, list) or len(choices) not in num_choices:
            n = len(choices) if isinstance(choices, list) else "no"
            raise _bad(path, i, f"question.choices: expected {'/'.join(map(str, num_choices))} choices, got {n}")
        labels = [c.get("label") if isinstance(c, dict) else None for c in choices]
        if not any(labels == list(s[:len(labels)]) for s in LABEL_SETS):
            raise _bad(path, i, f"choice labels {labels} are not A, B, C... or 1, 2, 3... in order")
        texts = [_text(path, i, c, "text") for c in choices]
        key = obj.get("answerKey")
        if key not in labels:
            raise _bad(path, i, f"answerKey {key!r} is not one of the choice labels {labels}")
        rows.append({"id": obj.get("id"), "question": stem, "choices": texts, "label": labels.index(key)})
    return _finish(rows, path)


def read_obqa_nutcracker(path) -> list[dict]:
    """OpenBookQA dev in nutcracker-db's schema (JSON lines): ``centerpiece`` (the stem),
    ``options`` (4 texts, A-D), ``correct_options`` (["A"]), ``correct_options_idx`` ([0]);
    the letter and the index must agree."""
    path, rows = Path(path), []
    for i, obj in _jsonl(path):
        stem = _text(path, i, obj, "centerpiece")
        options = obj.get("options")
        if not isinstance(options, list) or len(options) != 4 or not all(isinstance(o, str) and o.strip()
                                                                          for o in options):
            raise _bad(path, i, "options: expected a list of 4 non-empty strings")
        letters, idx = obj.get("correct_options"), obj.get("correct_options_idx")
        if (not isinstance(letters, list) or len(letters) != 1 or letters[0] not in ("A", "B", "C", "D")
                or idx != ["ABCD".index(letters[0])]):
            raise _bad(path, i, f"correct_options {letters!r} / correct_options_idx {idx!r}: expected one answer, "
                       "a letter A-D and its index 0-3")
        rows.append({"id": None, "question": stem, "choices": list(options), "label": idx[0]})
    return _finish(rows, path)


def read_piqa(path, labels_path) -> list[dict]:
    """PIQA: ``goal``, ``sol1``, ``sol2`` per jsonl line, the label (0 = sol1, 1 = sol2) on the
    same line of the separate ``*-labels.lst`` file."""
    path, labels_path = Path(path), Path(labels_path)
    if not labels_path.is_file():
        raise ConfigError(f"{labels_path}: no such file (PIQA's labels for {path.name}); restore it "
                          "(see ../shared/data/README.md) or set data.root=<folder with intact QA files>")
    labels = []
    for i, line in enumerate(labels_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.strip() not in ("0", "1"):
            raise _bad(labels_path, i, f"label {line.strip()!r} is not 0 or 1")
        labels.append((i, int(line)))
    rows = []
    for n, (i, obj) in enumerate(_jsonl(path)):
        goal = _text(path, i, obj, "goal")
        sols = [_text(path, i, obj, k) for k in ("sol1", "sol2")]
        if n >= len(labels):
            raise _bad(labels_path, None, f"has {len(labels)} labels but {path.name} has more questions "
                       f"(question {n + 1}, {path.name}:{i})")
        rows.append({"id": obj.get("id"), "question": goal, "choices": sols, "label": labels[n][1]})
    if len(rows) != len(labels):
        raise _bad(labels_path, labels[len(rows)][0] if len(rows) < len(labels) else None,
                   f"has {len(labels)} labels but {path.name} has {len(rows)} questions")
    return _finish(rows, path)


def sciq_row(question: str, correct: str, distractors: list[str], support: str = "") -> dict:
    """One SciQ question with its four choices in a seeded order (see the module docstring)."""
    choices = [correct, *distractors]
    random.Random(f"sciq|{question}|{correct}").shuffle(choices)
    return {"id": None, "question": question, "choices": choices, "label": choices.index(correct),
            "support": support}


def read_sciq(path) -> list[dict]:
    """SciQ release: one JSON array of {question, correct_answer, distractor1..3, support}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, None, f"not valid UTF-8 ({e.reason})") from None
    dec, pos = json.JSONDecoder(), 0
    seen = [0, 1]  # (position, its line): counted onwards, positions only grow

    def line_at(p):
        seen[1] += text.count("\n", seen[0], p)
        seen[0] = p
        return seen[1]

    def skip(p):
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if not text.startswith("[", pos):
        raise _bad(path, line_at(pos), "expected a JSON array of questions")
    pos, rows = skip(pos + 1), []
    while pos < len(text) and text[pos] != "]":  # item by item, to name the line of a bad one
        line = line_at(pos)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _bad(path, e.lineno, f"not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise _bad(path, line, f"expected a JSON object, got {type(obj).__name__}")
        q, a = _text(path, line, obj, "question"), _text(path, line, obj, "correct_answer")
        ds = [_text(path, line, obj, f"distractor{k}") for k in (1, 2, 3)]
        support = obj.get("support", "")
        if not isinstance(support, str):
            raise _bad(path, line, "field 'support' is not a string")
        rows.append(sciq_row(q, a, ds, support))
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise _bad(path, line_at(pos), "expected ',' or ']' between questions")
    if pos >= len(text):
        raise _bad(path, line_at(pos), "the JSON array is not closed (truncated file?)")
    if skip(pos + 1) != len(text):
        raise _bad(path, line_at(skip(pos + 1)), "text after the end of the JSON array")
    return _finish(rows, path)


READERS = {"arc": read_arc_jsonl, "nutcracker": read_obqa_nutcracker, "piqa": read_piqa, "sciq": read_sciq}


def _hub_rows(task: QATask, ds) -> list[dict]:
    """The hub copies' columns -> our rows (ai2_arc, openbookqa/main, ybisk/piqa, allenai/sciq)."""
    rows = []
    for r in ds:
        if task.name.startswith("arc") or task.name == "openbookqa":
            labels = list(r["choices"]["label"])
            q = r["question"] if task.name != "openbookqa" else r["question_stem"]
            rows.append({"id": r.get("id"), "question": q, "choices": list(r["choices"]["text"]),
                         "label": labels.index(r["answerKey"])})
        elif task.name == "piqa":
            rows.append({"id": None, "question": r["goal"], "choices": [r["sol1"], r["sol2"]], "label": int(r["label"])})
        else:
            rows.append(sciq_row(r["question"], r["correct_answer"],
                                 [r["distractor1"], r["distractor2"], r["distractor3"]], r.get("support") or ""))
    return rows


def read_qa_split(task, split: str = "train", root=None) -> list[dict]:
    """Rows of one split: from the first local file the task lists under ``root``
    (None -> default_data_root()), else from the hub."""
    task = get_qa_task(task)
    if split not in task.splits:
        raise ConfigError(f"{task.name} has no labeled {split} split; use one of {', '.join(task.splits)}")
    root = resolve_root(root)
    looked = []
    if root is not None:
        for fmt, *rel in task.files[split]:
            paths = [root / r for r in rel]
            if paths[0].is_file():
                return READERS[fmt](*paths)
            looked.append(str(paths[0]))
    try:  # no local copy: the hub (fails fast when HF_HUB_OFFLINE=1)
        import datasets

        ds = datasets.load_dataset(task.hub[0], task.hub[1], split=split)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        where = (f"no local file {' nor '.join(looked)}" if looked
                 else "no local data root (data.root unset, ../shared/data missing)")
        path, config = task.hub
        hub = path + (f" ({config})" if config else "")
        raise ConfigError(f"{task.name}/{split}: {where} and the Hugging Face hub ({hub}) is unreachable "
                          f"({type(e).__name__}: {reason}); go online (HF_HUB_OFFLINE=0) to load it from the hub, "
                          "or set data.root=<folder laid out like ../shared/data with that file>") from None
    log.info("%s/%s: no local file, loaded %s from the hub", task.name, split, task.hub[0])
    return _hub_rows(task, ds)


# -----------------------------------------------------------------------------
# tokenization and batches


def special_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts before a single text (BOS for LLaMA, </s> for OPT, [CLS] for
    the WordPiece stand-in; none for SmolLM2): the start of every LM prompt."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i]
    return []


class QASet(Dataset):
    """Tokenized questions, one dict each (QA sets are small: at most a few thousand)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @property
    def lengths(self) -> list[int]:
        return [max(len(c) for c in it["choices"]) + len(it.get("prompt", ())) for it in self.items]


def tokenize_qa(rows, task: QATask, tokenizer, head: str, max_length: int) -> QASet:
    """Per question: the label, the character length of each choice and

    - causal_lm:  ``prompt`` (prefix + prompt tokens) and ``choices`` (tokens of " " + choice);
      the prompt is cut from the left so that prompt + longest choice fit max_length
    - seq2seq_lm: ``prompt`` (the encoder input, cut from the left) and ``choices`` (the decoder
      targets: the choice as the tokenizer encodes a text, e.g. <s> choice </s>)
    - multiple_choice: ``choices`` = the tokenizer's (prompt, choice) pair encodings, the prompt cut
    """
    prompts = [task.prompt(r) for r in rows]
    conts = [[" " + c for c in r["choices"]] for r in rows]
    flat = [c for cs in conts for c in cs]
    owner = [q for q, cs in enumerate(conts) for _ in cs]  # the question of each flat choice
    items = [{"label": r["label"], "nchars": [len(c) for c in cs], "choices": []} for r, cs in zip(rows, conts)]
    # one tokenizer call per list (fast tokenizers batch it), then back to questions
    if head == "multiple_choice":
        enc = tokenizer([prompts[q] for q in owner], [c.lstrip() for c in flat], truncation="only_first",
                        max_length=max_length)
        for q, vals in zip(owner, zip(*enc.values())):
            items[q]["choices"].append(dict(zip(enc.keys(), vals)))
    elif head == "causal_lm":
        prefix = special_prefix(tokenizer)
        for q, ids in zip(owner, tokenizer(flat, add_special_tokens=False)["input_ids"]):
            items[q]["choices"].append(ids[:max_length - len(prefix) - 1])
        for item, body in zip(items, tokenizer(prompts, add_special_tokens=False)["input_ids"]):
            room = max_length - len(prefix) - max(map(len, item["choices"]))
            item["prompt"] = prefix + body[max(0, len(body) - room):]
    elif head == "seq2seq_lm":
        side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
        try:
            enc = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
        finally:
            tokenizer.truncation_side = side
        for item, ids in zip(items, enc):
            item["prompt"] = ids
        for q, ids in zip(owner, tokenizer(flat, truncation=True, max_length=max_length)["input_ids"]):
            items[q]["choices"].append(ids)
    else:
        raise ConfigError(f"QA has no batches for head {head!r}")
    return QASet(items)


class QACollate:
    """Batches for ``memtl.scoring.MultipleChoiceModel``.

    LM heads: one row per (question, choice) of the batch, flattened (questions with fewer
    choices add fewer rows); ``row_question``/``row_choice`` place each row's score in the
    (batch, max choices) table. causal_lm rows are prompt + choice, LEFT-padded so every
    choice ends at the last position (the LM head then runs on the last positions only),
    with position ids that skip the padding. multiple_choice: (batch, choices, length)
    tensors; a question with fewer choices repeats its first one, masked by ``choice_mask``.
    """

    def __init__(self, tokenizer, head: str):
        self.pad_id, self.head = tokenizer.pad_token_id, head
        if self.pad_id is None:
            raise ConfigError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")

    def _pad(self, seqs, left=False, value=None):
        value = self.pad_id if value is None else value
        n = max(map(len, seqs))
        out = torch.full((len(seqs), n), value, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(n - len(s), n) if left else slice(0, len(s))
            out[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
        return out, mask

    def __call__(self, items):
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        nchoices = [len(it["choices"]) for it in items]
        if self.head == "multiple_choice":
            c_max = max(nchoices)
            flat = [it["choices"][c if c < len(it["choices"]) else 0] for it in items for c in range(c_max)]
            batch = {"labels": labels,
                     "choice_mask": torch.tensor([[c < n for c in range(c_max)] for n in nchoices])}
            for key in flat[0]:
                value = self.pad_id if key == "input_ids" else 0
                t, _ = self._pad([f[key] for f in flat], value=value)
                batch[key] = t.view(len(items), c_max, -1)
            return batch
        rq = torch.tensor([q for q, n in enumerate(nchoices) for _ in range(n)])
        rc = torch.tensor([c for n in nchoices for c in range(n)])
        choices = [c for it in items for c in it["choices"]]
        batch = {"labels": labels, "row_question": rq, "row_choice": rc,
                 "choice_len": torch.tensor([len(c) for c in choices]),
                 "choice_chars": torch.tensor([n for it in items for n in it["nchars"]], dtype=torch.float)}
        if self.head == "causal_lm":
            seqs = [it["prompt"] + c for it in items for c in it["choices"]]
            batch["input_ids"], batch["attention_mask"] = self._pad(seqs, left=True)
        else:  # seq2seq_lm: encoder = prompt (one copy per choice), decoder = the choice
            prompts = [it["prompt"] for it in items for _ in it["choices"]]
            batch["input_ids"], batch["attention_mask"] = self._pad(prompts)
            batch["targets"], _ = self._pad(choices)
        return batch


# -----------------------------------------------------------------------------
# the DataModule


class QADataModule(L.LightningDataModule):
    """One QA task: train / validation (model selection) / test (reported, where the task has a
    labeled test split). max_train_samples / max_eval_samples keep the first N questions.
    No tokenization cache (unlike GLUE): the largest local split (OpenBookQA train, 4957
    questions x 4 choices) tokenizes in 1-3 s.
    Training order: ``memtl.data.loading.TrainSampler`` in a ``ResumableLoader`` (seeded per epoch,
    resumable mid-epoch, DDP-sharded), as for GLUE."""

    def __init__(self, task, tokenizer, head: str, root=None, max_length: int = 128, batch_size: int = 16,
                 eval_batch_size: int | None = None, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, group_by_length: bool = False, num_workers: int = 0,
                 seed: int = 42, protocol: str = "dev"):
        super().__init__()
        check_data_options(protocol=protocol, max_length=max_length, batch_size=batch_size,
                           eval_batch_size=eval_batch_size, num_workers=num_workers,
                           max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
        if protocol != "dev":
            raise ConfigError(f"data.protocol={protocol} is a GLUE protocol; QA tasks train on train, select on "
                              "validation and report test: set data.protocol=dev")
        self.task, self.tokenizer, self.head = get_qa_task(task), tokenizer, head
        self.root, self.max_length = resolve_root(root), max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.group_by_length, self.num_workers, self.seed = group_by_length, num_workers, seed
        self.collate = QACollate(tokenizer, head)
        self.sets: dict[str, QASet] = {}

    @property
    def has_test(self) -> bool:
        return "test" in self.task.splits

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    def prepare_data(self):
        for split in self.task.splits:  # reads every file now: a missing or bad one fails before the model loads
            self._load(split)

    def setup(self, stage: str | None = None):
        for split in self.task.splits:
            self._load(split)

    def _load(self, split: str) -> QASet:
        if split not in self.sets:
            limit = self.max_train_samples if split == "train" else self.max_eval_samples
            rows = read_qa_split(self.task, split, self.root)[:limit]
            self.sets[split] = tokenize_qa(rows, self.task, self.tokenizer, self.head, self.max_length)
            log.info("%s/%s: %d questions", self.task.name, split, len(rows))
        return self.sets[split]

    @property
    def train_size(self) -> int:
        return len(self._load("train"))

    def _loader(self, ds, batch_size, **kw) -> DataLoader:
        return make_loader(ds, batch_size, self.collate, self.num_workers, self.seed, **kw)

    def train_dataloader(self):
        return train_loader(self._load("train"), self.batch_size, self.collate, self.num_workers, self.seed,
                            self.group_by_length)

    def val_dataloader(self):
        return [self._loader(self._load("validation"), self.eval_batch_size, shuffle=False)]

    def test_dataloader(self):
        split = "test" if self.has_test else "validation"
        return [self._loader(self._load(split), self.eval_batch_size, shuffle=False)]
