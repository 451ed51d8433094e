"""GlueMetrics against independent sklearn/scipy computations, batch-wise == one update,
key names, and a two-process (gloo) DDP sync."""

import socket

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from memtl.data import GLUE_TASKS, get_task
from memtl.metrics import GlueMetrics, main_metric_mode, majority_class_baseline

SEEDS = [0, 1, 2, 3]


def reference(task, logits, labels) -> dict[str, float]:
    """GLUE's definitions, computed with sklearn/scipy on numpy arrays."""
    y = labels.numpy()
    if task.is_regression:
        p = logits.reshape(-1).numpy().astype(np.float64)
        return {"pearson": pearsonr(p, y)[0], "spearman": spearmanr(p, y)[0]}
    p = logits.argmax(-1).numpy()
    fns = {"accuracy": accuracy_score, "f1": lambda y, p: f1_score(y, p, pos_label=1), "mcc": matthews_corrcoef}
    return {k: fns[k](y, p) for k in task.metrics}


def random_data(task, seed, n=300):
    g = torch.Generator().manual_seed(seed)
    if task.is_regression:  # STS-B-like: scores in 0.2 steps (ties), predictions correlated with them
        labels = torch.randint(0, 26, (n,), generator=g) / 5
        logits = labels[:, None] + 1.5 * torch.randn(n, 1, generator=g)
    else:  # better than chance, but not perfect
        labels = torch.randint(0, task.num_labels, (n,), generator=g)
        logits = torch.randn(n, task.num_labels, generator=g)
        logits[torch.arange(n), labels] += 0.8
    return logits, labels


@pytest.mark.parametrize("name", list(GLUE_TASKS))
@pytest.mark.parametrize("seed", SEEDS)
def test_against_sklearn_scipy(name, seed):
    task = GLUE_TASKS[name]
    logits, labels = random_data(task, seed)
    want = reference(task, logits, labels)

    whole = GlueMetrics(task)
    whole.update(logits, labels)
    got = whole.compute()
    assert got.keys() == want.keys() == set(task.metrics)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-5), k
        assert isinstance(got[k], float)

    # uneven batches, with a reset in between, give the same numbers
    whole.reset()
    batched = GlueMetrics(task)
    g = torch.Generator().manual_seed(seed + 100)
    cuts = sorted(torch.randperm(len(labels) - 1, generator=g)[:7].add(1).tolist())
    for a, b in zip([0, *cuts], [*cuts, len(labels)]):
        batched.update(logits[a:b], labels[a:b])
        whole.update(logits[a:b], labels[a:b])
    assert batched.compute() == pytest.approx(got, abs=1e-6)
    assert whole.compute() == pytest.approx(got, abs=1e-6)


@pytest.mark.parametrize("name", ["cola", "mrpc", "mnli", "stsb"])
def test_input_forms(name):
    """Class ids instead of logits, (B,) instead of (B, 1) scores, half-precision logits."""
    task = GLUE_TASKS[name]
    logits, labels = random_data(task, 7)
    ref = GlueMetrics(task)
    ref.update(logits, labels)
    ref = ref.compute()
    other = GlueMetrics(task)
    if task.is_regression:
        other.update(logits[:100].squeeze(-1), labels[:100])
        other.update(logits[100:], labels[100:].double())
    else:
        other.update(logits[:100].argmax(-1), labels[:100])
        other.update(logits[100:].to(torch.bfloat16), labels[100:])
    # bf16 may flip an argmax of two near-equal logits; regression is exact
    assert other.compute() == pytest.approx(ref, abs=1e-6 if task.is_regression else 0.02)


def test_degenerate_mcc_is_zero_like_sklearn():
    # a constant prediction (common early in CoLA training): sklearn/GLUE report 0
    labels = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 1])
    m = GlueMetrics("cola")
    m.update(torch.ones(10, dtype=torch.long), labels)
    assert m.compute() == {"mcc": 0.0} == {"mcc": matthews_corrcoef(labels.numpy(), np.ones(10, dtype=int))}


def test_keys_prefix_and_module():
    mnli = get_task("mnli")
    matched, mismatched = (GlueMetrics(mnli, prefix=p) for p in mnli.eval_prefixes)
    assert matched.keys == ("accuracy",) and mismatched.keys == ("mm_accuracy",)
    logits, labels = random_data(mnli, 0)
    mismatched.update(logits, labels)
    assert set(mismatched.compute()) == {"mm_accuracy"}
    assert GlueMetrics("mrpc").keys == ("accuracy", "f1")
    assert GlueMetrics("stsb").keys == ("pearson", "spearman")
    assert GlueMetrics("cola").keys == ("mcc",)
    # an nn.Module whose metric states move with .to() (Lightning moves it to the device)
    m = GlueMetrics("rte")
    assert isinstance(m, torch.nn.Module) and any(True for _ in m.metrics.values())
    m.to(torch.float64)
    m(logits[:, :2], labels % 2)  # calling the module updates
    assert 0 <= m.compute()["accuracy"] <= 1


def test_main_metric_mode():
    for task in GLUE_TASKS.values():
        for key in task.metric_keys:
            assert main_metric_mode(key) == "max"
    assert main_metric_mode("val/loss") == "min"


# -----------------------------------------------------------------------------
# DDP: two CPU processes (gloo), each sees part of the data; compute() equals the whole

DDP_TASKS = ["cola", "mrpc", "stsb"]


def _ddp_worker(rank, world, port, data, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    for name, (logits, labels) in data.items():
        m = GlueMetrics(name)
        m.update(logits[rank::world], labels[rank::world])
        out[name] = m.compute()
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_sync():
    import torch.multiprocessing as mp

    # odd n: the two ranks hold different counts; fork: no re-import, so the test stays quick
    data = {name: random_data(GLUE_TASKS[name], 3, n=101) for name in DDP_TASKS}
    queue = mp.get_context("fork").Queue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), data, queue), nprocs=2, start_method="fork")
    results = dict(queue.get(timeout=60) for _ in range(2))
    for name in DDP_TASKS:
        want = reference(GLUE_TASKS[name], *data[name])
        half = GlueMetrics(name)
        half.update(data[name][0][0::2], data[name][1][0::2])
        assert half.compute() != pytest.approx(want, abs=1e-3)  # so equality below needs the sync
        for rank in (0, 1):
            assert results[rank][name] == pytest.approx(want, abs=1e-5), (name, rank)


def test_majority_class_baseline_scores_the_constant_prediction():
    train = torch.tensor([1, 1, 0, 1, 0])  # class 1 is the majority of train...
    dev = torch.tensor([0, 0, 0, 1, 1])    # ...and the minority of dev
    got = majority_class_baseline("mrpc", train, [dev])
    assert got["label"] == 1
    constant = np.ones(5, dtype=int)
    assert got["metrics"]["accuracy"] == pytest.approx(accuracy_score(dev.numpy(), constant))  # 0.4
    assert got["metrics"]["f1"] == pytest.approx(f1_score(dev.numpy(), constant, pos_label=1))  # 0.571
    # MNLI: one dict, the mismatched split's keys prefixed as in training
    mnli = majority_class_baseline("mnli", torch.tensor([2, 2, 0]), [torch.tensor([2, 1]), torch.tensor([0, 0, 2])])
    assert mnli["metrics"] == pytest.approx({"accuracy": 0.5, "mm_accuracy": 1 / 3})
    assert majority_class_baseline("cola", torch.tensor([1, 1, 0]), [torch.tensor([0, 1])])["metrics"]["mcc"] == 0
    assert majority_class_baseline("stsb", torch.tensor([0.2, 4.0]), [torch.tensor([1.0, 2.0])]) is None
