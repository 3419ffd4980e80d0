"""Fit time and quality of the heads on an FI-sized planted problem, beside scikit-learn's MLP.

    python benchmarks/bench_heads.py [--n 23308] [--dim 512] [--hidden 512] [--seeds 3] [--threads 2] [--skip-cv]
                                     [--memory-n 200000] [--cache 100000] [--queries 4096]

Data: the planted problem of tests/test_plateau.py (one construction for both, in
tests/planted.py): FI's 8 class priors, each class a mixture of two Gaussians
under one anisotropic covariance, so the Bayes classifier - and its accuracy - is known. An
80/20 split as in the issue that found the MLP under-trained. Printed: accuracy and macro-F1
of the ``mlp`` head at its defaults (which train to a validation plateau), of scikit-learn's
``MLPClassifier`` of the same shape with its default rule (all the data, until the training
loss stops falling) and with its validation-plateau rule (``early_stopping=True``), fit times
and their ratios, the mlp's 10-fold CV time, and the linear, contrastive and Tip-Adapter heads.

Then, at scale: Tip-Adapter's predict rate (``2 * queries * cache * dim`` useful flops a second,
queries against a ``--cache``-key cache) beside the machine's float32 matmul rate measured just
before and after it in the same process (a 2048^3 product), and their ratio; and each head's peak
memory while fitting ``--memory-n`` x dim float32 vectors, in a fresh process per head: the rise
of the peak RSS over the process's RSS before the fit (data, torch and a warm-up fit already in
it), as a multiple of the feature matrix's bytes. The trained heads run one epoch there and the
linear head two Cs (memory does not grow with either), Tip-Adapter with fixed alpha and beta
(its cache is what it keeps: one normalised copy is its learned state).

On a machine shared with other jobs, run it with ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP
threads otherwise spin at every barrier, and with one core taken by another process two such
threads slow each other down about tenfold.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neural_network import MLPClassifier

from clip_heads.heads import ContrastiveHead, LinearHead, MLPHead, TipAdapterHead

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from planted import fi_planted  # noqa: E402  (the tests' planted problem: one construction)

MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np, torch
from clip_heads.heads import ContrastiveHead, LinearHead, MLPHead, TipAdapterHead
name, n, dim, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 8
rng = np.random.default_rng(0)
X = np.empty((n, dim), np.float32)
for i in range(0, n, 65536):  # no float64 temporary of the whole matrix
    X[i:i + 65536] = rng.standard_normal((min(65536, n - i), dim), dtype=np.float32)
y = rng.integers(0, k, n)
X[np.arange(n), y] += 3.0
prompts = np.eye(k, dim, dtype=np.float32)
make = {"linear": lambda: LinearHead(Cs=(0.1, 1.0), max_iter=20),
        "mlp": lambda: MLPHead(epochs=1, patience=None),
        "contrastive": lambda: ContrastiveHead(prompt_embeds=prompts, epochs=1, patience=None),
        "tip-adapter": lambda: TipAdapterHead(prompt_embeds=prompts, alpha=1.0, beta=5.5)}[name]
make().fit(X[:5000], y[:5000])  # warm-up: torch's own allocations belong to the baseline
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
make().fit(X, y)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "x_bytes": X.nbytes}))
"""


def fit_memory(name: str, n: int, dim: int) -> dict:
    """Peak memory of one head's fit on n x dim float32 vectors, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, name, str(n), str(dim)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_rate(size: int = 2048, reps: int = 5) -> float:
    """The machine's float32 matmul rate, flop/s: the best of ``reps`` size^3 products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b)[1] for _ in range(reps))
    return 2 * size**3 / best


def tip_predict_rate(n_cache: int, n_queries: int, dim: int, k: int = 25) -> tuple[float, float, float, float]:
    """Tip-Adapter predict on a planted cache: (useful flop/s, seconds, sgemm rate before, after)."""
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((n_cache, dim), dtype=np.float32)
    labels = rng.integers(0, k, n_cache)
    head = TipAdapterHead(prompt_embeds=np.eye(k, dim, dtype=np.float32), alpha=1.0, beta=5.5).fit(keys, labels)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    head.decision_function(queries[:300])  # warm-up
    before = matmul_rate()
    _, t = timed(lambda: head.decision_function(queries))
    after = matmul_rate()
    return 2 * n_queries * n_cache * dim / t, t, before, after


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=23308)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the MLP comparison")
    ap.add_argument("--skip-cv", action="store_true", help="skip the 10-fold CV of the mlp head")
    ap.add_argument("--memory-n", type=int, default=200_000, help="rows of the peak-memory fits (0 skips them)")
    ap.add_argument("--cache", type=int, default=100_000, help="Tip-Adapter cache size of the predict-rate run")
    ap.add_argument("--queries", type=int, default=4096, help="queries of the predict-rate run (0 skips it)")
    ap.add_argument("--only-scale", action="store_true", help="only the predict-rate and memory runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.queries:
        rate, t, before, after = tip_predict_rate(args.cache, args.queries, args.dim)
        print(f"tip-adapter predict, {args.queries} queries x {args.cache} cached keys x {args.dim}: {t:.2f} s, "
              f"{rate / 1e9:.1f} GFLOP/s; float32 matmul (2048^3) {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s "
              f"before / after; ratio {rate / ((before + after) / 2):.2f} (torch threads {torch.get_num_threads()})")
    if args.memory_n:
        for name in ("linear", "mlp", "contrastive", "tip-adapter"):
            m = fit_memory(name, args.memory_n, args.dim)
            print(f"{name} fit on {args.memory_n} x {args.dim} float32 ({m['x_bytes'] / 2**20:.0f} MiB): peak RSS "
                  f"{m['peak'] / 2**20:.0f} MiB, {(m['peak'] - m['before']) / m['x_bytes']:.2f}x the features above "
                  f"the {m['before'] / 2**20:.0f} MiB before the fit")
    if args.only_scale:
        return
    X, y, means, bayes = fi_planted(args.n, args.dim)
    cut = int(0.8 * len(X))
    Xtr, ytr, Xte, yte = X[:cut], y[:cut], X[cut:], y[cut:]
    unit = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731  (the heads' normalize=True)

    def quality(pred) -> str:
        return f"accuracy {np.mean(pred == yte):.3f}, macro-F1 {f1_score(yte, pred, average='macro'):.3f}"

    print(f"data: {args.n} x {args.dim}, 8 classes (FI priors), 80/20 split; Bayes {quality(bayes(Xte))}; "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r}, "
          f"load average {os.getloadavg()[0]:.2f}")
    MLPHead(hidden=16, epochs=1, patience=None).fit(Xtr[:2000], ytr[:2000])  # warm-up: the first optimizer step imports torch._dynamo

    # Both MLPs vary by about a point from seed to seed: compare means over --seeds seeds.
    rows = {"mlp head (defaults)": [], "sklearn MLPClassifier(early_stopping=True): validation plateau": [],
            "sklearn MLPClassifier(): its default, all data until the training loss plateaus": []}
    for seed in range(args.seeds):
        head, t = timed(lambda s=seed: MLPHead(hidden=args.hidden, random_state=s).fit(Xtr, ytr))
        rows["mlp head (defaults)"].append((head.predict(Xte), t, f"{head.n_epochs_} epochs, {head.stop_reason_}"))
        for (label, kw) in zip(list(rows)[1:], ({"early_stopping": True}, {}), strict=True):
            if kw or seed == 0:  # sklearn's default rule is slow: one seed
                ref, t = timed(lambda s=seed, kw=kw: MLPClassifier(hidden_layer_sizes=(args.hidden,), random_state=s, **kw)
                               .fit(unit(Xtr), ytr))
                rows[label].append((ref.predict(unit(Xte)), t, f"{ref.n_iter_} epochs"))
    t_ours = np.mean([t for _, t, _ in rows["mlp head (defaults)"]])
    for label, runs in rows.items():
        acc = np.mean([np.mean(p == yte) for p, _, _ in runs])
        f1 = np.mean([f1_score(yte, p, average="macro") for p, _, _ in runs])
        t = np.mean([t for _, t, _ in runs])
        print(f"{label}, hidden {args.hidden}, {len(runs)} seed(s): accuracy {acc:.3f}, macro-F1 {f1:.3f}, "
              f"fit {t:.2f} s ({'; '.join(n for _, _, n in runs)}); mlp head's time / this {t_ours / t:.2f}")

    if not args.skip_cv:
        cv = StratifiedKFold(10, shuffle=True, random_state=0)
        scores, t_cv = timed(lambda: cross_val_score(MLPHead(hidden=args.hidden), Xtr, ytr, cv=cv))
        print(f"mlp 10-fold CV: {t_cv:.2f} s, accuracy {scores.mean():.3f} +- {scores.std():.3f}")

    head, t_search = timed(lambda: LinearHead().fit(Xtr, ytr))
    C = head.C_
    _, t_refit = timed(lambda: LinearHead(C=C).fit(Xtr, ytr))
    ref, t_sk = timed(lambda: LogisticRegression(C=C, max_iter=1000).fit(unit(Xtr), ytr))
    print(f"linear with C search ({len(head.val_scores_)} Cs): {t_search:.2f} s, C={C:g}, {head.n_iter_} L-BFGS "
          f"iterations (converged: {head.converged_}); {quality(head.predict(Xte))}; one fit at that C {t_refit:.2f} s")
    print(f"sklearn LogisticRegression(lbfgs, C={C:g}): {t_sk:.2f} s; {quality(ref.predict(unit(Xte)))}")

    prompts = unit(means)
    for name, make in (("contrastive", lambda: ContrastiveHead(prompt_embeds=prompts, hidden=args.hidden)),
                       ("tip-adapter", lambda: TipAdapterHead(prompt_embeds=prompts))):
        head, t = timed(lambda make=make: make().fit(Xtr, ytr))
        extra = f", {head.n_epochs_} epochs (stopped: {head.stop_reason_})" if name == "contrastive" else ""
        print(f"{name} fit: {t:.2f} s{extra}; {quality(head.predict(Xte))}")


if __name__ == "__main__":
    main()
