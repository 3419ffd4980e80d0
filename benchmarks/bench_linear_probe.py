"""Linear probe cost: our `linear` head vs scikit-learn vs clip_benchmark's own linear probe, one run.

    .venv/bin/python benchmarks/bench_linear_probe.py            # FI-sized: 23,308 x 512, 8 classes
    .venv/bin/python benchmarks/bench_linear_probe.py --cifar    # CIFAR-100-sized: 50,000 x 512, 100 classes (~10 min on 2 cores)

On the same planted features (Gaussian classes, L2-normalised; a held-out test set of 5,000,
or 10,000 with --cifar), prints fit time and test accuracy of:

1. ``LinearHead()``: full-batch L-BFGS, C read from the validation accuracy's peak, refit on all
   training data;
2. ``sklearn.linear_model.LogisticRegression(lbfgs)`` at the C our head chose (one fit);
3. the real clip_benchmark package (``clip-benchmark==1.6.2``): its shipped
   ``clip_benchmark.metrics.linear_probe.evaluate`` with its own weight-decay search (97-point
   log grid 1e-6..1e2, 7 starting points then 4 refinement rounds of 3, and a final fit on
   train + validation: 20 AdamW fits of lr 0.1, 10 epochs, batch 64), given 80% of the
   training data to fit and 20% to validate, as its ``--val_proportion`` does.

clip_benchmark is an optional benchmark dependency (``pip install "clip-heads[bench]"``; where
torch must stay as installed, ``pip install --no-deps clip-benchmark==1.6.2``: its linear-probe
module needs only torch, numpy, scikit-learn and tqdm, while its declared dependencies
open_clip/torchvision would replace torch). Without it, row 3 is skipped.

The package's linear probe is written for CUDA only (``assert device == 'cuda'``, ``.cuda()``
calls). To run it unchanged on a CPU this script, for the duration of that one call, makes
``Module.cuda``/``Tensor.cuda`` return their argument and passes a device string that compares
equal to ``'cuda'`` but names the CPU to torch; the image "model" it is given is the identity
on our features, so its feature caching stores exactly the vectors the other two rows fit. Its
training-progress prints are sent to /dev/null. One helper is replaced: the package's top-k
``accuracy`` (used to score each weight decay on the validation split and the final test)
calls ``float()`` on a one-element array, which NumPy >= 2.4 refuses; the script passes the
same count of correct top-k predictions over the number of samples. Nothing else is changed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from clip_heads.heads import get_head


def planted(n: int, dim: int, n_classes: int, seed: int = 0, sep: float = 2.0):
    """Gaussian classes whose means are ``sep`` apart in noise units: hard enough (~0.75
    accuracy) that the regularisation strength matters, as with real CLIP features."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, n_classes, n)
    X = (means[y] + rng.normal(size=(n, dim))).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


class _CudaNamedCpu(str):
    """'cpu' to torch, equal to 'cuda' for clip_benchmark's device assertion."""

    def __eq__(self, other: object) -> bool:
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


class _Identity(torch.nn.Module):
    """An image "model" whose ``encode_image`` returns the (already computed) features."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _cuda_calls_stay_on_cpu():
    module_cuda, tensor_cuda = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = module_cuda, tensor_cuda


def clip_benchmark_probe(Xfit, yfit, Xval, yval, Xte, yte, seed: int = 0) -> dict | None:
    """clip_benchmark 1.6.2's ``linear_probe.evaluate`` on our features; None if not installed."""
    try:
        import clip_benchmark.metrics.linear_probe as lp
        from importlib.metadata import version
    except ImportError:
        return None
    fits = []
    train = lp.train

    def counted(*args, **kwargs):
        fits.append(1)
        return train(*args, **kwargs)

    def loader(X, y):
        ds = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
        return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False, num_workers=0)

    def top_k_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
        # The package's helper calls float() on a 1-element array, which NumPy >= 2.4 refuses.
        hits = output.topk(max(topk), 1).indices == target.view(-1, 1).to(output.device)
        return [hits[:, :k].any(1).float().mean().item() for k in topk]

    accuracy = lp.accuracy
    lp.train, lp.accuracy = counted, top_k_accuracy
    try:
        with tempfile.TemporaryDirectory() as root, _cuda_calls_stay_on_cpu(), \
                open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            t, cpu = time.perf_counter(), time.process_time()
            out = lp.evaluate(_Identity(), loader(Xfit, yfit), loader(Xte, yte), fewshot_k=-1, batch_size=64,
                              num_workers=0, lr=0.1, epochs=10, model_id="bench", seed=seed, feature_root=root,
                              device=_CudaNamedCpu("cpu"), val_dataloader=loader(Xval, yval), normalize=True,
                              amp=False, verbose=False)
            seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    finally:
        lp.train, lp.accuracy = train, accuracy
    return {"seconds": seconds, "cpu": cpu, "acc": float(out["lp_acc1"]), "fits": len(fits), "weight_decay": out["weight_decay"],
            "version": version("clip-benchmark")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", action="store_true", help="CIFAR-100-sized problem: 50,000 x 512, 100 classes, 10,000 test")
    ap.add_argument("--n", type=int, default=None, help="training samples [23308, or 50000 with --cifar]")
    ap.add_argument("--test", type=int, default=None, help="test samples [5000, or 10000 with --cifar]")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=None, help="[8, or 100 with --cifar]")
    ap.add_argument("--no-clip-benchmark", action="store_true", help="skip the clip_benchmark row")
    ap.add_argument("--no-sklearn", action="store_true", help="skip the sklearn row (minutes at the CIFAR shape)")
    args = ap.parse_args()
    n = args.n or (50_000 if args.cifar else 23_308)
    n_test = args.test or (10_000 if args.cifar else 5_000)
    C = args.classes or (100 if args.cifar else 8)
    X, y = planted(n + n_test, args.dim, C)
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
    print(f"planted problem: train {Xtr.shape}, test {Xte.shape}, {C} classes; torch threads {torch.get_num_threads()}")

    t, cpu = time.perf_counter(), time.process_time()
    head = get_head("linear")(random_state=0).fit(Xtr, ytr)
    ours, ours_cpu = time.perf_counter() - t, time.process_time() - cpu
    ours_acc = float((head.predict(Xte) == yte).mean())
    print(f"ours: LinearHead (L-BFGS, C search over {len(head.val_scores_)} values, C={head.C_:.3g}, refit)"
          f"   {ours:8.2f} s ({ours_cpu:.1f} s CPU)   test acc {ours_acc:.4f}")

    print("  its validation accuracy by C: " + ", ".join(f"{c:.3g}: {a:.4f}" for c, a in head.val_scores_.items()))
    if not args.no_sklearn:
        t = time.perf_counter()
        sk = LogisticRegression(C=head.C_, max_iter=1000).fit(Xtr, ytr)
        sk_time = time.perf_counter() - t
        sk_acc = float(sk.score(Xte, yte))
        print(f"sklearn LogisticRegression(lbfgs) at C={head.C_:.3g}, one fit            {sk_time:8.2f} s   test acc {sk_acc:.4f}")
        print(f"ratio sklearn-fit / ours                  {sk_time / ours:6.2f}")
        print(f"|accuracy ours - sklearn|                 {abs(ours_acc - sk_acc) * 100:.2f} points")

    if args.no_clip_benchmark:
        return
    fit, val, yfit, yval = train_test_split(Xtr, ytr, test_size=0.2, random_state=0, stratify=ytr)
    cb = clip_benchmark_probe(fit, yfit, val, yval, Xte, yte)
    if cb is None:
        print("clip_benchmark: not installed, skipped (pip install --no-deps clip-benchmark==1.6.2)")
        return
    print(f"clip_benchmark {cb['version']} linear_probe.evaluate (its weight-decay search, {cb['fits']} AdamW fits, "
          f"chose wd={cb['weight_decay']:.3g}; on CPU)   {cb['seconds']:8.2f} s ({cb['cpu']:.1f} s CPU)   "
          f"test acc {cb['acc']:.4f}")
    print(f"ratio clip_benchmark / ours               {cb['seconds'] / ours:6.2f} wall, {cb['cpu'] / ours_cpu:.2f} CPU "
          f"(on a busy machine the two phases may see different loads: compare CPU too, and rerun when quiet)")
    print(f"accuracy ours - clip_benchmark            {(ours_acc - cb['acc']) * 100:+.2f} points")


if __name__ == "__main__":
    main()
