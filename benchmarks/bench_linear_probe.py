"""Linear probe cost: our `linear` head vs scikit-learn vs clip_benchmark's procedure, one run.

    .venv/bin/python benchmarks/bench_linear_probe.py [--n 23308] [--sweep 97] [--measure 5]

On a synthetic store-sized problem (the FI size: 23,308 x 512, 8 classes, planted Gaussian
classes), prints fit time and held-out accuracy of:

1. `LinearHead()`: full-batch L-BFGS, C chosen on a validation split, refit on all training data;
2. `sklearn.linear_model.LogisticRegression(lbfgs)` at the C our head chose (fit only);
3. clip_benchmark's linear-probe *procedure*, re-implemented here from its description:
   AdamW (lr 0.1, 10 epochs, batch 64, cosine schedule) trained once per weight-decay value
   of a 97-point log grid from 1e-6 to 1e-2 on 80% of the training data, scored on the other
   20%, then retrained on all of it with the best value. Running all 97 fits takes minutes on
   a CPU, so `--measure K` times K of them and projects the sweep as mean fit time x (97 + 1);
   `--measure 97` runs it all.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from clip_heads.heads import get_head


def planted(n: int, dim: int, n_classes: int, seed: int = 0, sep: float = 2.0):
    """Gaussian classes whose means are ``sep`` apart in noise units: hard enough (~0.8
    accuracy) that the regularisation strength matters, as with real CLIP features."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, n_classes, n)
    X = (means[y] + rng.normal(size=(n, dim))).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


def adamw_probe(X: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float, seed: int = 0,
                lr: float = 0.1, epochs: int = 10, batch_size: int = 64) -> torch.nn.Linear:
    """One clip_benchmark-style probe fit: AdamW + cosine schedule over mini-batches."""
    g = torch.Generator().manual_seed(seed)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    probe = torch.nn.Linear(X.shape[1], n_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(X) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=g).split(batch_size):
            loss = torch.nn.functional.cross_entropy(probe(Xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return probe


def probe_acc(probe: torch.nn.Linear, X: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((probe(torch.from_numpy(X)).argmax(1).numpy() == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=23308)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--sweep", type=int, default=97)
    ap.add_argument("--measure", type=int, default=5)
    args = ap.parse_args()
    X, y = planted(args.n + 5000, args.dim, args.classes)
    Xtr, ytr, Xte, yte = X[: args.n], y[: args.n], X[args.n :], y[args.n :]
    print(f"train {Xtr.shape}, test {Xte.shape}, {args.classes} classes, torch threads {torch.get_num_threads()}")

    t = time.perf_counter()
    head = get_head("linear")(random_state=0).fit(Xtr, ytr)
    ours = time.perf_counter() - t
    ours_acc = float((head.predict(Xte) == yte).mean())

    t = time.perf_counter()
    sk = LogisticRegression(C=head.C_, max_iter=1000).fit(Xtr, ytr)
    sk_time = time.perf_counter() - t
    sk_acc = float(sk.score(Xte, yte))

    wds = np.logspace(-6, -2, args.sweep)
    fit, val, yfit, yval = train_test_split(Xtr, ytr, test_size=0.2, random_state=0, stratify=ytr)
    pick = np.linspace(0, args.sweep - 1, min(args.measure, args.sweep)).round().astype(int)
    times, scores = [], {}
    for i in pick:
        t = time.perf_counter()
        scores[wds[i]] = probe_acc(adamw_probe(fit, yfit, args.classes, wds[i]), val, yval)
        times.append(time.perf_counter() - t)
    best = max(scores, key=scores.get)
    t = time.perf_counter()
    final = adamw_probe(Xtr, ytr, args.classes, best)
    refit = time.perf_counter() - t
    cb_acc = probe_acc(final, Xte, yte)
    per_fit = float(np.mean(times))
    projected = per_fit * args.sweep + refit
    measured = "measured" if len(pick) == args.sweep else f"projected from {len(pick)} timed fits"

    print(f"ours: LinearHead (L-BFGS, C search {len(head.val_scores_)} values, C={head.C_:.3g})  {ours:7.2f} s   test acc {ours_acc:.4f}")
    print(f"sklearn LogisticRegression(lbfgs) at C={head.C_:.3g}, fit only                {sk_time:7.2f} s   test acc {sk_acc:.4f}")
    print(f"clip_benchmark procedure: {per_fit:.2f} s per AdamW fit x {args.sweep} + refit {refit:.2f} s = {projected:7.1f} s ({measured})   test acc {cb_acc:.4f}")
    print(f"ratio sklearn-fit / ours          {sk_time / ours:6.2f}")
    print(f"ratio clip_benchmark-sweep / ours {projected / ours:6.1f}")
    print(f"|accuracy ours - sklearn|         {abs(ours_acc - sk_acc) * 100:.2f} points")


if __name__ == "__main__":
    main()
