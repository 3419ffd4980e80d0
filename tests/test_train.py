"""The shared training loop: it learns, its schedule has the promised shape, and it resumes exactly."""
from __future__ import annotations

import functools
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_heads.train import TensorBatches, Trainer, cosine_with_warmup, fit_loop, get_rng_state, set_rng_state
from conftest import make_blobs


def toy_problem(n_per_class=64, dropout=0.0, seed=0):
    X, y, _ = make_blobs(n_per_class=n_per_class, n_classes=3, dim=8, sep=3.0, seed=seed)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                torch.nn.Linear(16, 3))
    return model, X, y


def make_trainer(model, X, y, batch_size=20, **kw):
    cfg = dict(epochs=3, lr=1e-2, weight_decay=0.01, warmup_steps=2, seed=7)
    cfg.update(kw)
    return Trainer(model, lambda b: F.cross_entropy(model(b[0]), b[1]),
                   TensorBatches(X, y, batch_size=batch_size, seed=3), **cfg)


def test_loss_decreases_and_learns_toy_problem():
    model, X, y = toy_problem()
    trainer = fit_loop(model, lambda b: F.cross_entropy(model(b[0]), b[1]),
                       TensorBatches(X, y, batch_size=16, seed=0), epochs=15, lr=1e-2)
    assert len(trainer.loss_curve) == 15
    assert trainer.loss_curve[-1] < 0.25 * trainer.loss_curve[0]
    with torch.inference_mode():
        assert (model(X).argmax(1) == y).float().mean() > 0.95


def test_cosine_with_warmup_values_at_known_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(13):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Warm-up 1/4 .. 4/4 of the base lr, then half a cosine from 2.0 down to 0 at step 12.
    np.testing.assert_allclose(lrs[:4], [0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose([lrs[4], lrs[6], lrs[8], lrs[12]],
                               [2.0, 1.0 + math.cos(math.pi / 4), 1.0, 0.0], atol=1e-12)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    floor = cosine_with_warmup(opt2, 0, 10, min_lr_ratio=0.1)
    assert floor.lr_lambdas[0](10) == pytest.approx(0.1) and floor.lr_lambdas[0](0) == pytest.approx(1.0)


def test_tensor_batches_cover_every_row_once_in_a_seeded_order():
    X = torch.arange(50)
    batches = TensorBatches(X, batch_size=16, seed=5)
    assert len(batches) == 4 and len(TensorBatches(X, batch_size=16, drop_last=True)) == 3
    epoch0 = torch.cat([b[0] for b in batches(0)])
    assert sorted(epoch0.tolist()) == list(range(50))
    assert torch.equal(epoch0, torch.cat([b[0] for b in TensorBatches(X, batch_size=16, seed=5)(0)]))
    assert not torch.equal(epoch0, torch.cat([b[0] for b in batches(1)]))
    assert torch.equal(torch.cat([b[0] for b in TensorBatches(X, batch_size=16, shuffle=False)(0)]), X)
    with pytest.raises(ValueError, match="first dimension"):
        TensorBatches(X, torch.zeros(3), batch_size=4)


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
@pytest.mark.parametrize("stop_at", ["epoch", "mid-epoch"])
def test_resume_from_state_dict_gives_identical_weights(stop_at, schedule):
    # Dropout makes the result depend on the RNG stream, not only on the data order.
    # A plateau run monitors the training loss; patience 5 never ends these 3 epochs.
    build = functools.partial(make_trainer, schedule="plateau", patience=5) if schedule == "plateau" else make_trainer
    model_a, X, y = toy_problem(dropout=0.3)
    build(model_a, X, y, grad_accum=2).fit()

    model_b, _, _ = toy_problem(dropout=0.3)

    def interrupt(trainer, logs):
        if (stop_at == "epoch" and "step" not in logs) or logs.get("step") == 7:
            trainer.should_stop = True

    hook = {"on_epoch_end": interrupt} if stop_at == "epoch" else {"on_step": interrupt}
    trainer_b = build(model_b, X, y, grad_accum=2, **hook).fit()
    assert trainer_b.epoch < 3
    buf = io.BytesIO()
    torch.save(trainer_b.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # a checkpoint needs no pickle

    model_c, _, _ = toy_problem(dropout=0.3, seed=1)  # different init: everything must come from the state
    trainer_c = build(model_c, X, y, grad_accum=2)
    trainer_c.load_state_dict(state)
    trainer_c.fit()
    for p_a, p_c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p_a, p_c)
    assert trainer_c.step == 3 * math.ceil(math.ceil(len(X) / 20) / 2)


def test_grad_accumulation_equals_one_big_batch():
    model_a, X, y = toy_problem()
    model_b, _, _ = toy_problem()
    X, y = X[:32], y[:32]
    for model, bs, accum in ((model_a, 32, 1), (model_b, 16, 2)):
        Trainer(model, lambda b, m=model: F.cross_entropy(m(b[0]), b[1]),
                TensorBatches(X, y, batch_size=bs, shuffle=False), epochs=1, lr=0.1, grad_accum=accum).fit()
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p_a, p_b, rtol=0, atol=1e-6)


def test_early_stopping_restores_best_weights():
    model, X, y = toy_problem()
    scores = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.9])
    snapshots = {}
    trainer = make_trainer(model, X, y, epochs=6, eval_fn=lambda: next(scores), patience=2,
                           on_epoch_end=lambda t, logs: snapshots.setdefault(logs["epoch"], [
                               p.detach().clone() for p in model.parameters()]))
    trainer.fit()
    assert trainer.epoch == 4 and trainer.best_epoch == 2 and trainer.val_scores == [0.1, 0.5, 0.4, 0.3]
    for p, best in zip(model.parameters(), snapshots[2], strict=True):
        assert torch.equal(p, best)


def test_plateau_schedule_stops_where_the_score_stops_improving_and_keeps_the_best_weights():
    model, X, y = toy_problem()
    scores = iter([0.1, 0.5, 0.5004, 0.4, 0.6, 0.55, 0.6, 0.59, 0.2, 0.9])
    lrs = []
    trainer = make_trainer(model, X, y, epochs=50, schedule="plateau", patience=3, min_delta=0.001,
                           eval_fn=lambda: next(scores), on_epoch_end=lambda t, logs: lrs.append(logs["lr"]))
    trainer.fit()
    # 0.5004 is no improvement on 0.5 (min_delta); 0.6 at epoch 5 is the best, and three epochs
    # without better end the run at epoch 8, before the 0.9 of epoch 10.
    assert trainer.stop_reason == "plateau" and trainer.epoch == 8 and trainer.best_epoch == 5
    assert lrs[1:] == [lrs[1]] * (len(lrs) - 1) and lrs[1] == pytest.approx(1e-2)  # constant after warm-up


def test_plateau_schedule_says_when_the_epoch_cap_stopped_it(caplog):
    model, X, y = toy_problem()
    scores = iter(range(100))  # always improving
    with caplog.at_level("WARNING", logger="clip_heads.train"):
        trainer = make_trainer(model, X, y, epochs=4, schedule="plateau", patience=2, eval_fn=lambda: next(scores)).fit()
    assert trainer.stop_reason == "epochs" and trainer.epoch == 4
    assert "stopped at its epoch cap (epochs=4) before the validation score reached a plateau" in caplog.text
    caplog.clear()
    # Without a validation score, the plateau is the training loss's: a model that cannot learn
    # (lr 0) has a flat loss from the start.
    model, X, y = toy_problem()
    flat = make_trainer(model, X, y, batch_size=len(X), epochs=40, lr=0.0, schedule="plateau", patience=3,
                        min_delta=1e-6).fit()
    assert flat.stop_reason == "plateau" and flat.epoch == 1 + 3 and not caplog.text
    with pytest.raises(ValueError, match="plateau' needs patience"):
        make_trainer(model, X, y, schedule="plateau")


def test_training_leaves_the_callers_random_stream_alone():
    model, X, y = toy_problem(dropout=0.5)
    torch.manual_seed(123)
    before = get_rng_state()
    make_trainer(model, X, y, epochs=1).fit()
    after = get_rng_state()
    assert torch.equal(before["torch"], after["torch"])
    set_rng_state(before)


def test_bad_configuration_is_refused_with_a_message():
    model, X, y = toy_problem()
    with pytest.raises(ValueError, match="schedule"):
        make_trainer(model, X, y, schedule="linear")
    with pytest.raises(ValueError, match="grad_accum"):
        make_trainer(model, X, y, grad_accum=0)
