"""Multiple-choice QA: the readers on the real files and on broken copies, the choice scoring
against a hand computation, and training runs through the real CLI."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import REPO, SHARED_DATA, run_cli
from omegaconf import OmegaConf

from memtl.backbones import load_model, load_tokenizer
from memtl.data.qa import (QA_TASKS, QACollate, get_qa_task, read_arc_jsonl, read_obqa_nutcracker, read_piqa,
                           read_qa_split, read_sciq, special_prefix, tokenize_qa)
from memtl.errors import ConfigError
from memtl.scoring import MultipleChoiceModel

CLI_SMOKE = ["trainer.limit_train_batches=3", "trainer.max_epochs=1", "data.max_train_samples=24",
             "data.max_eval_samples=12", "data.batch_size=4", "logger=none", "callbacks.memory.measure_batches=[1]",
             "callbacks.memory.timing_warmup=1", "trainer.enable_progress_bar=false"]


def entry(name):
    return OmegaConf.load(REPO / "conf" / "backbone" / f"{name}.yaml")


# -- readers on the real files (row counts from ../shared/data/README.md) ----------------------

@pytest.mark.parametrize("task,split,rows,choices", [
    ("arc_easy", "train", 2251, {3, 4, 5}), ("arc_easy", "validation", 570, {3, 4, 5}),
    ("arc_easy", "test", 2376, {3, 4, 5}), ("arc_challenge", "train", 1119, {3, 4, 5}),
    ("arc_challenge", "validation", 299, {3, 4, 5}), ("arc_challenge", "test", 1172, {3, 4, 5}),
    ("openbookqa", "train", 4957, {4}), ("openbookqa", "validation", 500, {4}), ("openbookqa", "test", 500, {4}),
    ("piqa", "validation", 1838, {2}), ("sciq", "validation", 1000, {4}), ("sciq", "test", 1000, {4}),
])
def test_real_files(task, split, rows, choices):
    data = read_qa_split(task, split, SHARED_DATA)
    assert len(data) == rows
    assert {len(r["choices"]) for r in data} == choices
    assert all(0 <= r["label"] < len(r["choices"]) and all(c.strip() for c in r["choices"]) for r in data)
    labels = Counter(r["label"] for r in data)
    assert len(labels) >= 2  # answers are not all in one place
    if (task, split) == ("piqa", "validation"):
        assert labels == {1: 928, 0: 910}


def test_real_file_contents():
    obqa = read_qa_split("openbookqa", "train", SHARED_DATA)
    assert obqa[0]["id"] == "7-980" and obqa[0]["question"] == "The sun is responsible for"
    assert obqa[0]["choices"][obqa[0]["label"]] == "plants sprouting, blooming and wilting"  # answerKey D
    dev = read_qa_split("openbookqa", "validation", SHARED_DATA)  # the nutcracker schema
    assert dev[0]["question"].startswith("Frilled sharks") and dev[0]["choices"][dev[0]["label"]] == "Deep sea animals"
    assert dev[1]["label"] == 3
    arc = read_qa_split("arc_easy", "validation", SHARED_DATA)
    numeric = [r for r in arc if r["id"] == "MCAS_2000_4_6"]
    assert numeric and numeric[0]["label"] == 0
    sciq = read_qa_split("sciq", "validation", SHARED_DATA)
    first = sciq[0]
    assert first["question"].startswith("Who proposed the theory of evolution")
    assert sorted(first["choices"]) == sorted(["darwin", "Linnaeus", "shaw", "Scopes"])
    assert first["choices"][first["label"]] == "darwin"
    # the seeded order: the same on every read, answers spread over all four places
    assert [r["choices"] for r in read_sciq(SHARED_DATA / "sciq" / "valid.json")] == [r["choices"] for r in sciq]
    assert min(Counter(r["label"] for r in sciq).values()) > 200


def test_missing_local_files_name_the_file_and_the_hub():
    with pytest.raises(ConfigError) as e:
        read_qa_split("piqa", "train", SHARED_DATA)
    msg = str(e.value)
    assert "\n" not in msg and f"{SHARED_DATA.resolve()}/piqa/train.jsonl" in msg and "ybisk/piqa" in msg
    assert "HF_HUB_OFFLINE=0" in msg
    with pytest.raises(ConfigError, match=r"sciq/train: no local file .*sciq/train\.json .*allenai/sciq"):
        read_qa_split("sciq", "train", SHARED_DATA)
    with pytest.raises(ConfigError, match="piqa has no labeled test split"):
        read_qa_split("piqa", "test", SHARED_DATA)


def test_hub_columns_give_the_same_rows_as_the_local_files():
    """The hub fallback's converters, fed the hub's column layout built from local rows."""
    import datasets

    from memtl.data.qa import _hub_rows

    local = read_qa_split("arc_challenge", "validation", SHARED_DATA)[:20]
    raw = [json.loads(ln) for ln in (SHARED_DATA / "ARC" / "ARC-Challenge" / "ARC-Challenge-Dev.jsonl")
           .read_text().splitlines()[:20]]
    hub = datasets.Dataset.from_list([{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                                       "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                                   "label": [c["label"] for c in r["question"]["choices"]]}}
                                      for r in raw])
    assert _hub_rows(get_qa_task("arc_challenge"), hub) == local
    sciq = json.loads((SHARED_DATA / "sciq" / "valid.json").read_text())[:20]
    assert _hub_rows(get_qa_task("sciq"), datasets.Dataset.from_list(sciq)) == \
        read_qa_split("sciq", "validation", SHARED_DATA)[:20]  # same seeded choice order
    piqa = [json.loads(ln) for ln in (SHARED_DATA / "piqa" / "valid.jsonl").read_text().splitlines()[:20]]
    labels = (SHARED_DATA / "piqa" / "valid-labels.lst").read_text().split()[:20]
    hub = datasets.Dataset.from_list([{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)}
                                      for r, lab in zip(piqa, labels)])
    assert [{k: v for k, v in r.items() if k != "id"} for r in _hub_rows(get_qa_task("piqa"), hub)] == \
        [{k: v for k, v in r.items() if k != "id"} for r in read_qa_split("piqa", "validation", SHARED_DATA)[:20]]


def test_openbookqa_prefers_an_official_dev_file(tmp_path):
    main = tmp_path / "openbookqa" / "Main"
    main.mkdir(parents=True)
    (main / "dev.jsonl").write_text(json.dumps(
        {"id": "x", "question": {"stem": "s", "choices": [{"text": t, "label": lab} for t, lab in
                                                          zip("wxyz", "ABCD")]}, "answerKey": "B"}) + "\n")
    rows = read_qa_split("openbookqa", "validation", tmp_path)
    assert rows == [{"id": "x", "question": "s", "choices": list("wxyz"), "label": 1}]


# -- readers on broken files: one line naming file:line ----------------------------------------

def arc_line(choices=("a", "b", "c", "d"), labels="ABCD", key="B", stem="q"):
    return json.dumps({"id": "i", "question": {"stem": stem, "choices": [{"text": t, "label": lab}
                                                                         for t, lab in zip(choices, labels)]},
                       "answerKey": key})


def nut_line(options=("a", "b", "c", "d"), letters=("A",), idx=(0,)):
    return json.dumps({"centerpiece": "q", "options": list(options), "correct_options": list(letters),
                       "correct_options_idx": list(idx)})


PIQA_OK = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
SCIQ_OK = {"question": "q", "correct_answer": "a", "distractor1": "b", "distractor2": "c", "distractor3": "d",
           "support": ""}


def sciq_text(items):
    return json.dumps(items, indent=4)


BROKEN = [
    ("arc", arc_line() + "\n{not json\n", None, r"f:2: not a JSON object"),
    ("arc", arc_line() + "\n\n" + arc_line(key="E") + "\n", None, r"f:3: answerKey 'E' is not one of the choice labels"),
    ("arc", arc_line(choices=("a", "b"), labels="AB"), None, r"f:1: question.choices: expected 3/4/5 choices, got 2"),
    ("arc", arc_line(labels="ACBD"), None, r"f:1: choice labels \['A', 'C', 'B', 'D'\] are not A, B, C"),
    ("arc", arc_line(labels="1234", key="2") + "\n" + arc_line(stem=""), None, r"f:2: field 'question.stem'"),
    ("arc", "\n\n", None, r"f: empty file \(no questions\)"),
    ("arc", "[1, 2]\n", None, r"f:1: expected a JSON object, got list"),
    ("nutcracker", nut_line() + "\n" + nut_line(letters=("E",)), None, r"f:2: correct_options \['E'\]"),
    ("nutcracker", nut_line(letters=("B",), idx=(0,)), None, r"f:1: correct_options \['B'\] / correct_options_idx \[0\]"),
    ("nutcracker", nut_line(options=("a", "b", "c")), None, r"f:1: options: expected a list of 4 non-empty strings"),
    ("piqa", PIQA_OK + "\n" + PIQA_OK + "\n", "0\n", r"f.lst: has 1 labels but f has more questions"),
    ("piqa", PIQA_OK + "\n", "0\n1\n", r"f.lst:2: has 2 labels but f has 1 questions"),
    ("piqa", PIQA_OK + "\n", "2\n", r"f.lst:1: label '2' is not 0 or 1"),
    ("piqa", PIQA_OK + "\n" + json.dumps({"goal": "g", "sol1": "a"}) + "\n", "0\n1\n", r"f:2: field 'sol2'"),
    ("piqa", PIQA_OK + "\n", None, r"f.lst: no such file \(PIQA's labels for f\)"),
    ("sciq", sciq_text([SCIQ_OK, {k: v for k, v in SCIQ_OK.items() if k != "distractor3"}]), None,
     r"f:10: field 'distractor3' is missing"),
    ("sciq", sciq_text([SCIQ_OK])[:-3], None, r"f:\d+: the JSON array is not closed|f:\d+: not valid JSON"),
    ("sciq", json.dumps(SCIQ_OK), None, r"f:1: expected a JSON array of questions"),
    ("sciq", sciq_text([SCIQ_OK]) + "\nx", None, r"f:11: text after the end of the JSON array"),
    ("sciq", sciq_text([SCIQ_OK, "x"]), None, r"f:10: expected a JSON object, got str"),
    ("sciq", "[]", None, r"f: empty file"),
]


@pytest.mark.parametrize("fmt,text,labels,needle", BROKEN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)])
def test_broken_files(fmt, text, labels, needle, tmp_path):
    path = tmp_path / "f"
    path.write_text(text)
    args = [path]
    if fmt == "piqa":
        args.append(tmp_path / "f.lst")
        if labels is not None:
            args[1].write_text(labels)
    reader = {"arc": read_arc_jsonl, "nutcracker": read_obqa_nutcracker, "piqa": read_piqa, "sciq": read_sciq}[fmt]
    with pytest.raises(ConfigError) as e:
        reader(*args)
    msg = str(e.value).replace(str(tmp_path) + "/", "")
    assert "\n" not in msg
    assert __import__("re").search(needle, msg), msg
    assert "fix" in msg or "restore" in msg


def test_prompts():
    row = {"question": "Why?", "choices": ["a"], "label": 0, "support": "  Because.\n"}
    assert get_qa_task("arc_easy").prompt(row) == "Question: Why?\nAnswer:"
    assert get_qa_task("qa/piqa").prompt(row) == "Question: Why?\nAnswer:"
    assert get_qa_task("openbookqa").prompt(row) == "Why?"
    assert get_qa_task("sciq").prompt(row) == "Because.\n\nQuestion: Why?\nAnswer:"
    assert set(QA_TASKS) == {"openbookqa", "piqa", "arc_easy", "arc_challenge", "sciq"}
    with pytest.raises(ConfigError, match="task.length_norm='chars' is unknown"):
        get_qa_task("sciq", length_norm="chars")


# -- scoring against a hand computation --------------------------------------------------------

def _scored(name, head, norm, n=5, max_length=64):
    """A float64 tiny model, the first n ARC-Easy dev questions (3-5 choices among them) and
    the wrapper's output; n covers a 3-choice question in a batch of 4-choice ones."""
    tok = load_tokenizer(entry(name))
    torch.manual_seed(0)
    model = load_model(entry(name), tokenizer=tok, head=head).double().eval()
    task = get_qa_task("arc_easy")
    rows = read_qa_split(task, "validation", SHARED_DATA)
    three = next(i for i, r in enumerate(rows) if len(r["choices"]) == 3)
    rows = rows[:n - 1] + [rows[three]]
    ds = tokenize_qa(rows, task, tok, head, max_length)
    batch = QACollate(tok, head)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        out = MultipleChoiceModel(model, head, norm)(**batch)
    return model, tok, ds, batch, out


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt", "tiny_bart"])
@pytest.mark.parametrize("norm", ["none", "token", "char"])
def test_choice_scores_by_hand(name, norm):
    """Each choice alone, unpadded: log_softmax over the full vocabulary at every position,
    summed over the choice's tokens by an explicit loop; then the normalisation and the
    cross-entropy over the question's choices."""
    head = "seq2seq_lm" if name == "tiny_bart" else "causal_lm"
    model, tok, ds, batch, out = _scored(name, head, norm)
    low = torch.finfo(out.logits.dtype).min
    expect = torch.full_like(out.logits, low)
    loss = 0.0
    with torch.no_grad():
        for q, item in enumerate(ds):
            for c, choice in enumerate(item["choices"]):
                if head == "causal_lm":
                    seq = torch.tensor([item["prompt"] + choice])
                    logp = torch.log_softmax(model(input_ids=seq).logits[0], -1)
                    total = sum(logp[len(item["prompt"]) + j - 1, t] for j, t in enumerate(choice))
                else:
                    dec = torch.tensor([[model.config.decoder_start_token_id] + choice[:-1]])
                    logp = torch.log_softmax(model(input_ids=torch.tensor([item["prompt"]]),
                                                   decoder_input_ids=dec).logits[0], -1)
                    total = sum(logp[j, t] for j, t in enumerate(choice))
                expect[q, c] = total / {"none": 1, "token": len(choice), "char": item["nchars"][c]}[norm]
            scores = expect[q, :len(item["choices"])]
            loss += -(scores[item["label"]] - torch.logsumexp(scores, 0)) / len(ds)
    assert len(ds[4]["choices"]) == 3 and out.logits[4, 3] == low  # the absent 4th choice
    torch.testing.assert_close(out.logits, expect, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, loss, rtol=1e-9, atol=1e-9)


def test_the_lm_head_runs_on_the_choice_tokens_only_a_chunk_at_a_time(monkeypatch):
    """Long prompts, short answers: the vocabulary projection sees the choice tokens only
    (not the prompt, not the padding), at most CHUNK_BYTES of logits at once."""
    from memtl import scoring

    tok = load_tokenizer(entry("tiny_llama"))
    model = load_model(entry("tiny_llama"), tokenizer=tok, head="causal_lm").eval()
    task = get_qa_task("sciq")  # long prompts (support passages), short answers
    rows = read_qa_split(task, "validation", SHARED_DATA)[:4]
    ds = tokenize_qa(rows, task, tok, "causal_lm", 256)
    batch = QACollate(tok, "causal_lm")([ds[i] for i in range(4)])
    vocab = model.lm_head.weight.shape[0]
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 5 * 4 * vocab)  # 5 tokens' logits at a time
    seen = []  # the logits of each chunk, as they are upcast
    upcast = scoring._upcast
    monkeypatch.setattr(scoring, "_upcast", lambda x: seen.append(tuple(x.shape)) or upcast(x))
    with torch.no_grad():
        MultipleChoiceModel(model, "causal_lm")(**batch)
    tokens = int(batch["choice_len"].sum())
    chunks = [5] * (tokens // 5) + ([tokens % 5] if tokens % 5 else [])
    assert [shape for shape in seen if shape[-1] == vocab] == [(n, vocab) for n in chunks]
    assert batch["input_ids"].shape[1] > 3 * int(batch["choice_len"].max())


@pytest.mark.parametrize("bias", [False, True])
def test_token_logprobs_values_and_gradients_equal_plain_autograd(bias):
    """Chunked, with a hand-written backward: log_softmax(h W^T + b)[target] and the
    gradients of h, W and b equal plain autograd's (float64), chunks of 3 of 10 tokens."""
    from memtl import scoring

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias, dtype=torch.float64)
    h = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=g)
    weights = torch.randn(10, generator=g, dtype=torch.float64)
    got = scoring._TokenLogProbs.apply(h, head.weight, head.bias, targets, 3)
    (got * weights).sum().backward()
    mine = [h.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    head.zero_grad(set_to_none=True)
    h.grad = None
    ref = torch.log_softmax(head(h), -1).gather(-1, targets[:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(mine, [h.grad, head.weight.grad] + ([head.bias.grad] if bias else [])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, method", [("tiny_llama", "full"), ("tiny_opt", "lora"), ("tiny_llama", "meft3"),
                                          ("tiny_opt", "sherl")])
def test_choice_scoring_gradients_equal_the_plain_lm_head(name, method):
    """The training loss through the chunked scorer: every trainable parameter's gradient
    (the tied LM head's, under full fine-tuning, included) equals the one from plain logits
    of the whole model forward (float64)."""
    from memtl.methods import apply_method

    tok = load_tokenizer(entry(name))
    torch.manual_seed(0)
    model = apply_method(load_model(entry(name), tokenizer=tok, head="causal_lm").double(), method).eval()
    task = get_qa_task("arc_easy")
    ds = tokenize_qa(read_qa_split(task, "validation", SHARED_DATA)[:4], task, tok, "causal_lm", 64)
    batch = QACollate(tok, "causal_lm")([ds[i] for i in range(4)])
    MultipleChoiceModel(model, "causal_lm")(**batch).loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def plain_logprobs(model, input_ids, attention_mask, choice_len):
        k = int(choice_len.max())
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[:, -k - 1:-1]
        lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, -k:, None]).squeeze(-1)
        return (lp * (torch.arange(k)[None] >= (k - choice_len)[:, None])).sum(-1)

    import memtl.scoring as scoring

    original = scoring.choice_logprobs
    scoring.choice_logprobs = plain_logprobs
    try:
        MultipleChoiceModel(model, "causal_lm")(**batch).loss.backward()
    finally:
        scoring.choice_logprobs = original
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == ref.keys() and ours
    if method == "full":
        assert any("embed_tokens" in n for n in ours)  # the tied head/embedding trains
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-9, atol=1e-12, msg=n)


def test_tokenization_per_head():
    tok = load_tokenizer(entry("tiny_llama"))
    assert special_prefix(tok) == [tok.cls_token_id]  # the WordPiece stand-in's [CLS] plays BOS
    task = get_qa_task("arc_easy")
    rows = [{"question": "what " * 100, "choices": ["one", "two three"], "label": 1}]
    item = tokenize_qa(rows, task, tok, "causal_lm", 32)[0]
    assert item["prompt"][0] == tok.cls_token_id and len(item["prompt"]) + 2 == 32  # cut from the left
    assert tok.decode(item["prompt"][-2:]) == "answer :"
    assert item["choices"] == [tok(" one", add_special_tokens=False)["input_ids"],
                               tok(" two three", add_special_tokens=False)["input_ids"]]
    assert item["nchars"] == [4, 10]
    mc = tokenize_qa(rows, task, tok, "multiple_choice", 32)[0]
    assert [len(c["input_ids"]) for c in mc["choices"]] == [32, 32]
    assert tok.decode(mc["choices"][1]["input_ids"]).endswith("[SEP] two three [SEP]")
    batch = QACollate(tok, "multiple_choice")([mc, tokenize_qa(rows[:1] * 1, task, tok, "multiple_choice", 32)[0]])
    assert batch["input_ids"].shape == (2, 2, 32) and batch["choice_mask"].all()


def test_multiple_choice_head_masks_absent_choices():
    tok = load_tokenizer(entry("tiny_bert"))
    torch.manual_seed(0)
    model = load_model(entry("tiny_bert"), tokenizer=tok, head="multiple_choice").eval()
    task = get_qa_task("arc_easy")
    rows = read_qa_split(task, "validation", SHARED_DATA)
    pick = [rows[0], next(r for r in rows if len(r["choices"]) == 5), next(r for r in rows if len(r["choices"]) == 3)]
    ds = tokenize_qa(pick, task, tok, "multiple_choice", 64)
    batch = QACollate(tok, "multiple_choice")([ds[i] for i in range(3)])
    assert batch["input_ids"].shape[:2] == (3, 5)
    assert batch["choice_mask"].tolist() == [[1, 1, 1, 1, 0], [1] * 5, [1, 1, 1, 0, 0]]
    with torch.no_grad():
        out = MultipleChoiceModel(model, "multiple_choice")(**batch)
        # question 3 alone, its 3 choices only: the same logits
        alone = model(**{k: v[2:3, :3] for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                           "token_type_ids")}).logits
    torch.testing.assert_close(out.logits[2, :3], alone[0])
    assert (out.logits[2, 3:] == torch.finfo(out.logits.dtype).min).all() and torch.isfinite(out.loss)
    by_hand = sum(-torch.log_softmax(out.logits[i, :n], 0)[pick[i]["label"]] for i, n in enumerate((4, 5, 3))) / 3
    torch.testing.assert_close(out.loss, by_hand)


# -- end to end through the CLI ----------------------------------------------------------------

@pytest.mark.parametrize("backbone,method", [("tiny_llama", "full"), ("tiny_llama", "lora"), ("tiny_bert", "full"),
                                             ("tiny_bart", "lora")])
def test_train_cli(backbone, method, tmp_path):
    out = tmp_path / "run"
    proc = run_cli([f"backbone={backbone}", f"method={method}", "task=qa/arc_easy", *CLI_SMOKE,
                    f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["trainer"]["global_step"] == 3
    assert set(res["metrics"]) == {"accuracy"} and 0 <= res["metrics"]["accuracy"] <= 1
    assert res["best"]["metric"] == "accuracy"
    assert set(res["test"]) == {"accuracy"} and 0 <= res["test"]["accuracy"] <= 1  # ARC-Easy-Test.jsonl
    assert res["config"]["task"]["length_norm"] == "char"
    p = res["params"]
    assert (p["trainable"] == p["total"]) == (method == "full") and p["trainable"] > 0
    if method == "lora":
        assert p["trainable"] < p["total"] / 50  # q_proj/v_proj adapters; the LM head stays frozen


@pytest.mark.parametrize("backbone,method", [("tiny_bert", "meft1"), ("tiny_roberta", "sherl")])
def test_memory_efficient_methods_on_the_multiple_choice_head(backbone, method, tmp_path):
    from conftest import compose

    from memtl.run import run

    res = run(compose([f"backbone={backbone}", f"method={method}", "task=qa/arc_challenge", *CLI_SMOKE], tmp_path))
    assert res["status"] == "completed" and 0 <= res["metrics"]["accuracy"] <= 1
    assert 0 < res["params"]["trainable"] < res["params"]["total"] / 50


@pytest.mark.parametrize("backbone", ["tiny_llama", "tiny_bart", "tiny_bert"])
def test_bf16_mixed_precision(backbone, tmp_path):
    from conftest import compose

    from memtl.run import run

    res = run(compose([f"backbone={backbone}", "method=full", "task=qa/openbookqa", *CLI_SMOKE,
                       "trainer.precision=bf16-mixed"], tmp_path))
    assert res["status"] == "completed" and 0 <= res["metrics"]["accuracy"] <= 1


def test_crash_then_rerun_resumes_exactly(tmp_path):
    """QA batches go through GLUE's resumable sampler: a run that crashed mid-epoch 1 and
    was rerun ends with the same history and weights as an uninterrupted one."""
    from conftest import compose
    from test_resume import assert_same_run, stop_once

    from memtl.run import run

    common = ["backbone=tiny_llama", "method=lora", "task=qa/arc_easy", "data.max_train_samples=40",
              "data.max_eval_samples=8", "data.batch_size=8", "trainer.max_epochs=2",
              "callbacks.last_checkpoint.every_n_steps=2", "callbacks.memory.measure_batches=[1]",
              "trainer.enable_progress_bar=false", "optim.lr=1e-3", "logger=none"]
    run(compose(common, tmp_path / "whole"))
    cfg = compose([*common, *stop_once(8, tmp_path / "crashed", "crash")], tmp_path / "run")
    with pytest.raises(RuntimeError, match="planned crash at global step 8"):
        run(cfg)
    res = run(cfg)
    assert res["resumed"]["global_step"] == 7 and res["resumed"]["epoch"] == 1
    assert_same_run(tmp_path / "whole", tmp_path / "run")
    assert res["test"]["accuracy"] == json.loads((tmp_path / "whole" / "results.json").read_text())["test"]["accuracy"]


@pytest.mark.parametrize("args,needle", [
    (["task=qa/squad"], "unknown task 'qa/squad': choose one of"),
    (["task=qa/sciq"], "sciq/train: no local file"),
    (["task=qa/piqa"], "piqa/train.jsonl and the Hugging Face hub (ybisk/piqa) is unreachable"),
    (["task=qa/arc_easy", "task.length_norm=bytes"], "task.length_norm='bytes' is unknown"),
    (["task=qa/arc_easy", "data.protocol=lst"], "data.protocol=lst is a GLUE protocol"),
    (["task=qa/arc_easy", "task.name=arc_hard"], "unknown task 'arc_hard'"),
])
def test_bad_input_is_one_line(args, needle, tmp_path):
    proc = run_cli(["backbone=tiny_llama", "logger=none", f"hydra.run.dir={tmp_path}/run", *args])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-3000:]


# -- the real offline decoder ------------------------------------------------------------------

def test_smollm2_zero_shot_scoring():
    """SmolLM2-135M-Instruct (GGUF, ~20 s to load; ~1 s per 50 tokens here on one CPU thread):
    the real tokenizer and LM through the same prompt / tokenization / scoring path pick the
    obvious answer to a question, and give finite scores on ARC-Easy dev questions."""
    tok = load_tokenizer(entry("smollm2_135m"))
    assert special_prefix(tok) == [] and tok.pad_token == "<|im_end|>"
    model = load_model(entry("smollm2_135m"), tokenizer=tok, head="causal_lm").eval()
    task = get_qa_task("arc_easy")
    france = {"question": "What is the capital of France?", "choices": ["London", "Paris", "a banana", "Berlin"],
              "label": 1}
    rows = [france, *read_qa_split(task, "validation", SHARED_DATA)[:3]]
    ds = tokenize_qa(rows, task, tok, "causal_lm", 256)
    batch = QACollate(tok, "causal_lm")([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        out = MultipleChoiceModel(model, "causal_lm", "char")(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape == (4, 4)
    assert out.logits[0].argmax() == 1  # Paris


def test_eval_before_training_reports_the_starting_point(tmp_path):
    """eval_before=true: the dev accuracy of the model as the method leaves it at init, kept
    apart from the training history (model selection sees trained weights only)."""
    from conftest import compose

    from memtl.run import run

    cfg = compose(["backbone=tiny_llama", "method=meft1", "task=qa/arc_easy", *CLI_SMOKE, "eval_before=true"], tmp_path)
    res = run(cfg)
    assert res["status"] == "completed" and set(res["initial"]) == {"accuracy"}
    assert len(res["history"]) == 1 and res["best"]["step"] == res["history"][0]["step"] > 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["initial"] == res["initial"]
    # the same model, evaluated without training, gives the same number
    assert "test" in res  # ARC-Easy has a labelled test split ...
    cfg2 = compose(["backbone=tiny_llama", "method=meft1", "task=qa/arc_easy", *CLI_SMOKE, "eval_before=true",
                    "trainer.limit_train_batches=1", "optim.lr=1e-12", "data.test=false"], tmp_path / "again")
    again = run(cfg2)
    assert again["initial"] == res["initial"]
    assert "test" not in again  # ... not scored with data.test=false
