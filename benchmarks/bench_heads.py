"""Time the heads on a WEBEmo-sized synthetic store and print the figures.

    python benchmarks/bench_heads.py [--n 23308] [--dim 512] [--classes 8] [--threads 2]

Data: isotropic Gaussian classes around equal-norm random means (the test suite's planted
structure), separated so that the Bayes accuracy is about 0.8, like a hard real task. Targets:
an MLP fit within 2 s and its 10-fold cross-validation within 20 s on a 2-core CPU. The first
optimizer step of a process imports torch._dynamo (~1 s); a warm-up fit pays it before timing.

On a machine shared with other jobs, run it with ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP
threads otherwise spin at every barrier, and with one core taken by another process two such
threads slow each other down about tenfold (measured: an MLP fit of 2 s became 20 s).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from clip_heads.heads import ContrastiveHead, LinearHead, MLPHead, TipAdapterHead


def planted(n: int, dim: int, n_classes: int, sep: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, n_classes, size=n)
    X = (rng.normal(size=(n, dim)) + means[y]).astype(np.float32)
    return X, y, means


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=23308)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--sep", type=float, default=2.5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    X, y, means = planted(args.n + 5000, args.dim, args.classes, args.sep)
    Xtr, ytr, Xte, yte = X[:args.n], y[:args.n], X[args.n:], y[args.n:]
    bayes = (np.argmax(Xte @ means.T, 1) == yte).mean()
    print(f"data: {args.n} x {args.dim}, {args.classes} classes, Bayes accuracy on 5000 held-out rows {bayes:.3f}; "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r}, "
          f"load average {os.getloadavg()[0]:.2f}")
    MLPHead(epochs=1).fit(Xtr[:2000], ytr[:2000])  # warm-up

    head, med, best = timed(lambda: MLPHead().fit(Xtr, ytr), args.repeats)
    print(f"mlp fit: median {med:.2f} s, min {best:.2f} s over {args.repeats} ({len(head.loss_curve_)} epochs, "
          f"best {head.best_epoch_}); held-out accuracy {head.score(Xte, yte):.3f}")

    cv = StratifiedKFold(10, shuffle=True, random_state=0)
    scores, med, _ = timed(lambda: cross_val_score(MLPHead(), Xtr, ytr, cv=cv))
    print(f"mlp 10-fold CV: {med:.2f} s, accuracy {scores.mean():.3f} +- {scores.std():.3f}")

    head, t_search, _ = timed(lambda: LinearHead().fit(Xtr, ytr))
    acc_ours = head.score(Xte, yte)
    C = head.C_
    _, t_refit, _ = timed(lambda: LinearHead(C=C).fit(Xtr, ytr))
    unit = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731  (LinearHead's normalize=True)
    ref, t_sk, _ = timed(lambda: LogisticRegression(C=C, max_iter=1000).fit(unit(Xtr), ytr))
    print(f"linear with C search ({len(head.val_scores_)} Cs): {t_search:.2f} s, chose C={C:g}, "
          f"accuracy {acc_ours:.3f}; one fit at that C {t_refit:.2f} s")
    print(f"sklearn LogisticRegression(lbfgs, C={C:g}): {t_sk:.2f} s, accuracy {ref.score(unit(Xte), yte):.3f}")

    prompts = means / np.linalg.norm(means, axis=1, keepdims=True)
    for name, make in (("contrastive", lambda: ContrastiveHead(prompt_embeds=prompts)),
                       ("tip-adapter", lambda: TipAdapterHead(prompt_embeds=prompts))):
        head, med, _ = timed(lambda: make().fit(Xtr, ytr))
        print(f"{name} fit: {med:.2f} s, accuracy {head.score(Xte, yte):.3f}")


if __name__ == "__main__":
    main()
