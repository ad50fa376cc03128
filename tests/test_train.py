"""Tests for the train loop: step, evaluation, fit, checkpoint and bitwise resume."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_multirate as om
from optax_multirate import train as tr
from optax_multirate.data import Split
from optax_multirate.models import MLP


def _split(n: int, seed: int, classes: int = 3) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 6, 6, 1)).astype(np.float32)
    y = (x.reshape(n, -1)[:, :classes].argmax(-1)).astype(np.int32)
    return Split(x=x, y=y)


TRAIN = _split(96, 0)
TEST = _split(37, 1)  # not a multiple of the eval batch size: exercises the padded batch
BN_MLP = MLP((8, 8), num_classes=3, batch_norm=True)


def _batch(split: Split, n: int = 16) -> dict:
    return {"x": split.x[:n], "y": split.y[:n]}


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))


def _frozen_tx(params):
    lab = om.rule_labels(params, {"head": "^head/"}, default="body")
    return om.freeze_schedule(optax.sgd(0.1, momentum=0.9), lab, {"body": (0, 5)})


# ---------------------------------------------------------------------------------- the step


def test_step_jit_equals_no_jit():
    params, state = tr.init_model(BN_MLP, jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = optax.adam(1e-2)
    outs = []
    for jit in (True, False):
        step = tr.make_train_step(BN_MLP, tx, jit=jit)
        p, o, s = params, tx.init(params), state
        for i in range(2):
            p, o, s, m = step(p, o, s, _batch(TRAIN), jax.random.PRNGKey(i))
        outs.append((p, s, m))
    for u, v in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_step_updates_batch_stats_and_compiles_once():
    params, state = tr.init_model(BN_MLP, jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = optax.sgd(0.1)
    step = tr.make_train_step(BN_MLP, tx)
    p, o, s = params, tx.init(params), state
    for i in range(4):
        p, o, s, metrics = step(p, o, s, _batch(TRAIN), jax.random.PRNGKey(i))
    assert sorted(metrics) == ["accuracy", "loss"]
    assert not _equal(s, state)  # running mean/var moved
    assert jax.tree.structure(s) == jax.tree.structure(state)
    assert step.phased.num_compiles == 1


def test_step_passes_extra_args_to_tx():
    seen = {}

    def update(updates, state, params=None, *, value, **extra):
        del params, extra
        seen["value"] = value
        return jax.tree.map(lambda u: u * value, updates), state

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    model = MLP((4,), num_classes=3)
    params, state = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    step = tr.make_train_step(model, tx, jit=False)
    p, *_ = step(params, tx.init(params), state, _batch(TRAIN), jax.random.PRNGKey(0), value=0.0)
    assert _equal(p, params)  # value=0 zeroes the update

    step = tr.make_train_step(model, tx, extra_args_fn=lambda m: {"value": m["accuracy"]})
    _, _, _, m = step(params, tx.init(params), state, _batch(TRAIN), jax.random.PRNGKey(0))
    assert 0.0 <= float(m["accuracy"]) <= 1.0
    with pytest.raises(ValueError, match="extra_args_fn"):
        tr.make_train_step(model, tx, extra_args_fn=3)


def test_evaluate_matches_numpy():
    model = MLP((5,), num_classes=3)
    params, state = tr.init_model(model, jax.random.PRNGKey(1), TEST.x[:1])
    got = tr.evaluate(model, params, state, TEST, batch_size=16)
    logits = np.asarray(model.apply({"params": params}, TEST.x, train=False), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want_loss = -logp[np.arange(len(TEST)), TEST.y].mean()
    want_acc = (logits.argmax(-1) == TEST.y).mean()
    assert got["accuracy"] == pytest.approx(want_acc, abs=1e-9)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        tr.evaluate(model, params, state, TEST, batch_size=0)


# ----------------------------------------------------------------------------------------- fit


def test_fit_history_metrics_and_logs(tmp_path):
    model = MLP((8,), num_classes=3)
    params, _ = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = _frozen_tx(params)
    calls = []
    res = tr.fit(
        model,
        tx,
        TRAIN,
        TEST,
        epochs=2,
        batch_size=16,
        seed=0,
        val=TEST,
        log_csv=tmp_path / "m.csv",
        on_epoch_end=lambda e, r: calls.append((e, len(r.history))),
    )
    keys = {"epoch", "step", "train_time_s", "train_loss", "train_accuracy"}
    keys |= {"test_loss", "test_accuracy", "val_loss", "val_accuracy"}
    assert [set(h) for h in res.history] == [keys, keys]
    assert [h["step"] for h in res.history] == [6, 12]
    assert calls == [(1, 1), (2, 2)]
    assert res.final_accuracy == res.history[-1]["test_accuracy"]
    assert res.train_time_s == res.history[-1]["train_time_s"] > 0
    assert res.compile_time_s > 0 and res.num_compiles == 2  # body frozen, then full
    assert set(res.step_times_ms) == {"full", "phase:2/4"}
    assert res.masks["phase:2/4"] == (False, False, True, True)
    assert sum(map(len, res.step_times_ms.values())) == 12 - 2  # compiling steps left out
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_fit_writes_tensorboard_scalars_or_refuses(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    written, flushed = [], []

    class SummaryWriter:  # records what fit writes, as tensorboardX's writer would take it
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            written.append((self.logdir, tag, value, step))

        def flush(self):
            flushed.append(len(written))

    fake = types.ModuleType("tensorboardX")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    model = MLP((8,), num_classes=3)
    res = tr.fit(model, optax.sgd(0.1), TRAIN, TEST, epochs=2, batch_size=16, seed=0,
                 tensorboard_dir=tmp_path / "tb")  # fmt: skip
    tags = {"train_time_s", "train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    assert {t for _, t, _, _ in written} == tags
    assert {d for d, _, _, _ in written} == {str(tmp_path / "tb")}
    assert sorted({s for _, _, _, s in written}) == [6, 12]  # the global step of each epoch
    last = {t: v for _, t, v, s in written if s == 12}
    assert last["test_accuracy"] == res.history[-1]["test_accuracy"]
    assert flushed == [len(tags), 2 * len(tags)]  # flushed after every epoch

    # neither tensorboardX nor tensorflow: a clear error before any training
    real_find_spec = importlib.util.find_spec
    hidden = ("tensorboardX", "tensorflow")
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name in hidden else real_find_spec(name, *a),
    )  # fmt: skip
    with pytest.raises(ImportError, match="tensorboard_dir=.*pip install tensorboardX"):
        tr.fit(model, optax.sgd(0.1), TRAIN, TEST, epochs=1, batch_size=16, seed=0,
               tensorboard_dir=tmp_path / "tb2")  # fmt: skip


def test_fit_rejects_bad_arguments(tmp_path):
    model = MLP((4,), num_classes=3)
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="epochs"):
        tr.fit(model, tx, TRAIN, TEST, epochs=-1, batch_size=16, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        tr.fit(model, tx, TRAIN, TEST, epochs=1, batch_size=1000, seed=0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        tr.fit(model, tx, TRAIN, TEST, epochs=1, batch_size=16, seed=0, resume=True)
    with pytest.raises(ValueError, match="max_to_keep"):
        tr.fit(
            model,
            tx,
            TRAIN,
            TEST,
            epochs=1,
            batch_size=16,
            seed=0,
            checkpoint_dir=tmp_path,
            max_to_keep=1,
        )


# ---------------------------------------------------------------------------------- checkpoint


def test_fit_in_pieces_with_epoch_offset_equals_one_fit():
    model = MLP((8,), num_classes=3, dropout=0.2)  # dropout: the keys must follow the offset
    params, _ = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = _frozen_tx(params)
    kw = dict(batch_size=16, seed=5)
    whole = tr.fit(model, tx, TRAIN, TEST, epochs=3, **kw)
    step = tr.make_train_step(model, tx)
    first = tr.fit(model, tx, TRAIN, TEST, epochs=1, train_step=step, **kw)
    seen = []
    rest = tr.fit(
        model, tx, TRAIN, TEST, epochs=2, epoch_offset=1, train_step=step,
        params=first.params, model_state=first.model_state, opt_state=first.opt_state,
        extra=lambda e, h: seen.append(e) or {}, **kw,
    )  # fmt: skip
    assert _equal(rest.params, whole.params) and _equal(rest.opt_state, whole.opt_state)
    assert [h["epoch"] for h in rest.history] == [2, 3] and seen == [1, 2]
    assert rest.history[-1]["test_accuracy"] == whole.history[-1]["test_accuracy"]
    # the reused step compiled nothing new; each result counts its own call's compiles
    assert first.num_compiles == len(step.phased.masks) and rest.num_compiles == 0
    with pytest.raises(ValueError, match="epoch_offset must be an int >= 0"):
        tr.fit(model, tx, TRAIN, TEST, epochs=1, epoch_offset=-1, **kw)
    with pytest.raises(ValueError, match="train_step must be a TrainStep built for this"):
        tr.fit(model, optax.sgd(0.1), TRAIN, TEST, epochs=1, train_step=step, **kw)
    with pytest.raises(ValueError, match="train_step must be a TrainStep built for this"):
        tr.fit(MLP((9,), num_classes=3), tx, TRAIN, TEST, epochs=1, train_step=step, **kw)


def test_resume_mid_epoch_is_bitwise(tmp_path):
    model = BN_MLP
    params, _ = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    kw = dict(epochs=3, batch_size=16, seed=3)
    tx = _frozen_tx(params)  # a PhaseTag in the optimizer state must round-trip
    full = tr.fit(model, tx, TRAIN, TEST, **kw)

    ckpt = tmp_path / "ckpt"
    part = tr.fit(model, tx, TRAIN, TEST, checkpoint_dir=ckpt, max_steps=8, **kw)  # mid-epoch 2
    assert part.steps == 8 and len(part.history) == 1
    assert tr.latest_checkpoint(ckpt) == 8
    resumed = tr.fit(model, tx, TRAIN, TEST, checkpoint_dir=ckpt, resume=True, **kw)

    assert resumed.steps == full.steps == 18
    assert _equal(resumed.params, full.params)
    assert _equal(resumed.model_state, full.model_state)
    assert _equal(resumed.opt_state, full.opt_state)
    drop = lambda hist: [{k: v for k, v in h.items() if k != "train_time_s"} for h in hist]
    assert drop(resumed.history) == drop(full.history)
    assert tr.latest_checkpoint(ckpt) == 18
    assert len(list(ckpt.iterdir())) >= 2  # older checkpoints are kept

    with pytest.raises(ValueError, match="resume=True"):  # never overwrites checkpoints
        tr.fit(model, tx, TRAIN, TEST, checkpoint_dir=ckpt, **kw)
    # resuming a finished run does nothing and returns the same params
    again = tr.fit(model, tx, TRAIN, TEST, checkpoint_dir=ckpt, resume=True, **kw)
    assert again.steps == 18 and _equal(again.params, full.params)


def test_restore_from_other_model_names_the_path(tmp_path):
    model = MLP((8,), num_classes=3)
    tr.fit(
        model,
        optax.adam(1e-3),
        TRAIN,
        TEST,
        epochs=1,
        batch_size=32,
        seed=0,
        checkpoint_dir=tmp_path / "c",
    )
    wider = MLP((9,), num_classes=3)
    with pytest.raises(ValueError, match="'params/Dense_0/bias' has shape \\(8,\\)"):
        tr.fit(
            wider,
            optax.adam(1e-3),
            TRAIN,
            TEST,
            epochs=2,
            batch_size=32,
            seed=0,
            checkpoint_dir=tmp_path / "c",
            resume=True,
        )
    deeper = MLP((8, 8), num_classes=3)
    with pytest.raises(ValueError, match="Dense_1"):
        tr.fit(
            deeper,
            optax.adam(1e-3),
            TRAIN,
            TEST,
            epochs=2,
            batch_size=32,
            seed=0,
            checkpoint_dir=tmp_path / "c",
            resume=True,
        )


def test_save_restore_helpers_round_trip(tmp_path):
    model = MLP((4,), num_classes=3)
    params, _ = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = _frozen_tx(params)
    state = tx.init(params)
    state = state._replace(count=jnp.asarray(7, jnp.int32))
    tree = {"params": params, "opt_state": state, "step": np.int32(7)}
    tr.save_checkpoint(tmp_path / "a", tree, info={"note": "x"})
    template = {"params": params, "opt_state": tx.init(params), "step": np.int32(0)}
    got, info = tr.restore_checkpoint(tmp_path / "a", template, with_info=True)
    assert info == {"note": "x"}
    assert _equal(got, tree)
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    assert got["opt_state"].tag.paths == state.tag.paths  # static fields from the template
    with pytest.raises(ValueError, match="exists"):
        tr.save_checkpoint(tmp_path / "a", tree)
    with pytest.raises(ValueError, match="no checkpoint"):
        tr.restore_checkpoint(tmp_path / "missing", template)
    bad = {**template, "params": jax.tree.map(lambda x: x[..., :1], params)}
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
        tr.restore_checkpoint(tmp_path / "a", bad)
