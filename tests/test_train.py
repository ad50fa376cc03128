"""Tests for the train package: step, evaluation, the loop, its callbacks, checkpoint and resume."""

import csv
import inspect
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_multirate as om
from optax_multirate import train as tr
from optax_multirate.data import Split, batches
from optax_multirate.models import MLP


def _split(n: int, seed: int, classes: int = 3) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 6, 6, 1)).astype(np.float32)
    y = (x.reshape(n, -1)[:, :classes].argmax(-1)).astype(np.int32)
    return Split(x=x, y=y)


TRAIN = _split(96, 0)
TEST = _split(37, 1)  # not a multiple of the eval batch size: exercises the padded batch
BN_MLP = MLP((8, 8), num_classes=3, batch_norm=True)
KW = dict(batch_size=16, seed=0)  # 6 steps per epoch


def _batch(split: Split, n: int = 16) -> dict:
    return {"x": split.x[:n], "y": split.y[:n]}


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))


def _frozen_tx(params):
    lab = om.rule_labels(params, {"head": "^head/"}, default="body")
    return om.freeze_schedule(optax.sgd(0.1, momentum=0.9), lab, {"body": (0, 5)})


def _no_time(history):
    return [{k: v for k, v in h.items() if k != "train_time_s"} for h in history]


class Recorder(tr.Callback):
    """Records every hook call, and the row as ``on_log`` sees it."""

    def __init__(self):
        self.calls, self.logged = [], []

    def on_train_begin(self, loop):
        self.calls.append("train_begin")

    def on_epoch_begin(self, loop):
        self.calls.append(f"epoch_begin {loop.state.epoch}")

    def on_step_end(self, loop, metrics):
        assert isinstance(metrics["loss"], jax.Array)  # device arrays, not read
        self.calls.append("step")

    def on_epoch_end(self, loop, row):
        self.calls.append(f"epoch_end {row['epoch']}")

    def on_log(self, loop, row):
        self.calls.append("log")
        self.logged.append(dict(row))

    def on_train_end(self, loop):
        self.calls.append("train_end")


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
    with pytest.raises(TypeError, match="extra_args_fn"):
        tr.make_train_step(model, tx, extra_args_fn=3)


def test_batches_of_every_form_give_the_same_step():
    model = MLP((4,), num_classes=3)
    params, state = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = optax.sgd(0.1)
    step = tr.make_train_step(model, tx)
    x, y = TRAIN.x[:16], TRAIN.y[:16]
    outs = [
        step(params, tx.init(params), state, b, jax.random.PRNGKey(0))
        for b in ({"x": x, "y": y}, {"image": x, "label": y}, (x, y))
    ]
    assert all(_equal(o, outs[0]) for o in outs[1:])
    with pytest.raises(ValueError, match=r"'x' or 'image'.*\['inputs', 'targets'\]"):
        step(params, tx.init(params), state, {"inputs": x, "targets": y}, jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="2-tuple"):
        step(params, tx.init(params), state, [x, y, y], jax.random.PRNGKey(0))


def test_step_on_a_one_device_mesh_equals_no_mesh():
    tx = optax.sgd(0.1, momentum=0.9)
    plain = tr.fit(BN_MLP, tx, TRAIN, epochs=1, **KW)
    step = tr.make_train_step(BN_MLP, tx, mesh=om.parallel.data_mesh(jax.devices()[:1]))
    meshed = tr.fit(BN_MLP, tx, TRAIN, epochs=1, step=step, **KW)
    assert _equal(meshed.params, plain.params)
    assert step.place({"a": np.ones(2)})["a"].sharding.mesh == step.mesh
    with pytest.raises(TypeError, match="mesh"):
        tr.make_train_step(BN_MLP, tx, mesh="data")


# ---------------------------------------------------------------------------------- model calls


class Flagless(nn.Module):
    """No train flag at all."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.reshape(len(x), -1))


class Flagged(nn.Module):
    """Logits in train mode, zeros in eval mode: the flag must reach both."""

    flag: str

    @nn.compact
    def __call__(self, x, **kwargs):
        train = kwargs[self.flag] if self.flag == "training" else not kwargs[self.flag]
        logits = nn.Dense(3)(x.reshape(len(x), -1))
        return logits if train else jnp.zeros_like(logits)


@pytest.mark.parametrize(
    "model,call",
    [
        (Flagless(), None),
        (Flagged("training"), "training"),
        (Flagged("deterministic"), lambda train: {"deterministic": not train}),
    ],
    ids=["none", "str", "callable"],
)
def test_call_says_how_the_model_is_called(model, call):
    res = tr.fit(model, optax.sgd(0.1), TRAIN, epochs=1, call=call,
                 callbacks=[tr.Evaluate({"test": TEST})], **KW)  # fmt: skip
    row = res.history[-1]
    assert np.isfinite(row["train_loss"])
    if call is not None:  # eval mode saw zero logits: uniform loss, class 0 predicted
        assert row["test_loss"] == pytest.approx(np.log(3), rel=1e-6)
        assert row["test_accuracy"] == pytest.approx(np.mean(TEST.y == 0))
        assert row["train_loss"] != pytest.approx(np.log(3), rel=1e-3)  # train mode did not
    with pytest.raises(TypeError, match="call"):
        tr.fit(model, optax.sgd(0.1), TRAIN, epochs=1, call=3, **KW)


def test_custom_loss_in_the_step_the_loop_and_evaluation():
    def mse(outputs, batch):
        target = jax.nn.one_hot(batch["y"], 3)
        err = jnp.mean((outputs - target) ** 2)
        return err, {"max_logit": jnp.max(outputs)}

    model = MLP((8,), num_classes=3)
    res = tr.fit(model, optax.sgd(0.1), TRAIN, epochs=2, loss=mse,
                 callbacks=[tr.Evaluate({"test": TEST}, batch_size=16)], **KW)  # fmt: skip
    row = res.history[-1]
    assert {"train_loss", "train_max_logit", "test_loss", "test_max_logit"} <= set(row)
    assert "train_accuracy" not in row and np.isnan(res.final_accuracy)
    logits = np.asarray(model.apply({"params": res.params}, TEST.x, train=False), np.float64)
    want = np.mean((logits - np.eye(3)[TEST.y]) ** 2, axis=1).mean()
    assert row["test_loss"] == pytest.approx(want, rel=1e-5)
    assert row["test_max_logit"] == pytest.approx(logits.max(1).mean(), rel=1e-5)
    scalar = tr.fit(model, optax.sgd(0.1), TRAIN, epochs=1, loss=lambda o, b: jnp.mean(o**2), **KW)
    assert set(scalar.history[-1]) == {"epoch", "step", "train_time_s", "train_loss"}
    with pytest.raises(TypeError, match="loss"):
        tr.fit(model, optax.sgd(0.1), TRAIN, epochs=1, loss="mse", **KW)


# ---------------------------------------------------------------------------------- evaluation


def test_evaluate_matches_numpy_on_a_split_and_on_batches():
    model = MLP((5,), num_classes=3)
    params, state = tr.init_model(model, jax.random.PRNGKey(1), TEST.x[:1])
    got = tr.evaluate(model, params, state, TEST, batch_size=16)
    logits = np.asarray(model.apply({"params": params}, TEST.x, train=False), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want_loss = -logp[np.arange(len(TEST)), TEST.y].mean()
    want_acc = (logits.argmax(-1) == TEST.y).mean()
    assert list(got) == ["loss", "accuracy"]
    assert got["accuracy"] == pytest.approx(want_acc, abs=1e-9)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    # uneven batches weigh by their examples
    chunks = [(TEST.x[a:b], TEST.y[a:b]) for a, b in ((0, 30), (30, 37))]
    again = tr.evaluate(model, params, state, chunks)
    assert again["accuracy"] == pytest.approx(want_acc, abs=1e-9)
    assert again["loss"] == pytest.approx(want_loss, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        tr.evaluate(model, params, state, TEST, batch_size=0)
    with pytest.raises(ValueError, match="data must not be empty"):
        tr.evaluate(model, params, state, [])
    with pytest.warns(DeprecationWarning, match="split"):
        old = tr.evaluate(model, params, state, split=TEST, batch_size=16)
    assert old == got


# ----------------------------------------------------------------------------------------- fit


def test_fit_history_timing_and_hooks(tmp_path):
    model = MLP((8,), num_classes=3)
    params, _ = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = _frozen_tx(params)
    rec = Recorder()
    # the recorder comes first, yet on_log sees what Evaluate adds in on_epoch_end
    res = tr.fit(model, tx, TRAIN, epochs=2, **KW,
                 callbacks=[rec, tr.Evaluate({"test": TEST, "val": TEST})])  # fmt: skip
    keys = ["epoch", "step", "train_time_s", "train_loss", "train_accuracy"]
    keys += ["test_loss", "test_accuracy", "val_loss", "val_accuracy"]
    assert [list(h) for h in res.history] == [keys, keys]
    assert rec.logged == res.history
    assert [h["step"] for h in res.history] == [6, 12] and res.steps == 12
    epoch = ["step"] * 6
    assert rec.calls == ["train_begin", "epoch_begin 0", *epoch, "epoch_end 1", "log",
                         "epoch_begin 1", *epoch, "epoch_end 2", "log", "train_end"]  # fmt: skip
    assert res.final_accuracy == res.history[-1]["test_accuracy"]
    assert res.train_time_s == res.history[-1]["train_time_s"] == res.state.train_time_s > 0
    assert res.compile_time_s > 0 and res.num_compiles == 2  # body frozen, then full
    assert set(res.step_times_ms) == {"full", "phase:2/4"}
    assert res.masks["phase:2/4"] == (False, False, True, True)
    assert sum(map(len, res.step_times_ms.values())) == 12 - 2  # compiling steps left out
    assert (res.state.epoch, res.state.batch, res.state.step) == (2, 0, 12)
    assert not any(np.isnan(v) for h in res.history for v in h.values())


def test_twelve_parameters_at_most():
    assert len(inspect.signature(tr.fit).parameters) <= 12


def test_fit_rejects_bad_arguments():
    model, tx = MLP((4,), num_classes=3), optax.sgd(0.1)
    fit = lambda **kw: tr.fit(model, tx, **{"data": TRAIN, "epochs": 1, **KW, **kw})  # noqa: E731
    for kw, err, match in [
        ({"epochs": -1}, ValueError, "epochs"),
        ({"epochs": 1.5}, TypeError, "epochs"),
        ({"batch_size": 1000}, ValueError, "batch_size"),
        ({"batch_size": None}, ValueError, "batch_size is required"),
        ({"max_steps": -1}, ValueError, "max_steps"),
        ({"init": (1, 2, 3)}, TypeError, "init must be a LoopState"),
        ({"step": 3}, TypeError, "step must be a TrainStep"),
        ({"callbacks": [lambda loop: None]}, TypeError, "Callback"),
        ({"callbacks": tr.Evaluate({})}, TypeError, "sequence of Callback"),
        ({"data": TRAIN.x}, ValueError, "batch_size is for a Split only"),
        ({"data": {"x": TRAIN.x, "y": TRAIN.y}, "batch_size": None}, TypeError, "mapping"),
        ({"data": 3, "batch_size": None}, TypeError, "data must be a Split"),
    ]:
        with pytest.raises(err, match=match):
            fit(**kw)
    with pytest.raises(TypeError, match="flax.linen.Module"):
        tr.fit(lambda x: x, tx, TRAIN, epochs=1, **KW)


def test_data_as_a_split_a_callable_or_a_list():
    model, tx = MLP((8,), num_classes=3), optax.sgd(0.1, momentum=0.9)  # no dropout
    by_split = tr.fit(model, tx, TRAIN, epochs=2, **KW)
    by_fn = tr.fit(model, tx, lambda e: batches(TRAIN, 16, seed=0, epoch=e), epochs=2)
    assert _equal(by_fn.params, by_split.params) and by_fn.steps == 12
    assert _no_time(by_fn.history) == _no_time(by_split.history)
    # a list is iterated again each epoch; tuples and TFDS's names work too
    first = list(batches(TRAIN, 16, seed=0, epoch=0))
    one = tr.fit(model, tx, TRAIN, epochs=1, **KW)
    for data in (first, [(b["x"], b["y"]) for b in first],
                 [{"image": b["x"], "label": b["y"]} for b in first]):  # fmt: skip
        assert _equal(tr.fit(model, tx, data, epochs=1).params, one.params)
    twice = tr.fit(model, tx, first, epochs=2)
    assert twice.steps == 12 and [h["step"] for h in twice.history] == [6, 12]


def test_a_one_shot_iterator_is_refused_with_the_fix():
    model, tx = MLP((8,), num_classes=3), optax.sgd(0.1)
    gen = (b for b in batches(TRAIN, 16, seed=0))
    for data in (gen, iter(list(batches(TRAIN, 16, seed=0)))):
        with pytest.raises(TypeError, match="one-shot iterator.*pass a callable"):
            tr.fit(model, tx, data, epochs=1)


def test_dropout_keys_follow_the_data_position():
    model = MLP((8,), num_classes=3, dropout=0.5)
    tx = optax.sgd(0.1)
    first = list(batches(TRAIN, 16, seed=0, epoch=0))
    # known count (a list): key i of split(fold_in(key(seed), epoch), count), as for a Split
    assert _equal(tr.fit(model, tx, first, epochs=1).params,
                  tr.fit(model, tx, TRAIN, epochs=1, **KW).params)  # fmt: skip
    # unknown count (a callable): fold_in(fold_in(key(seed), epoch), i); check step 0 by hand
    by_fn = tr.fit(model, tx, lambda e: first[:1], epochs=1)
    params, state = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), 0)
    p, *_ = tr.make_train_step(model, tx)(params, tx.init(params), state, first[0], key)
    assert _equal(by_fn.params, p)


def test_continuing_with_init_equals_one_fit():
    model = MLP((8,), num_classes=3, dropout=0.2)  # dropout: the keys must follow the epoch
    params, _ = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    tx = _frozen_tx(params)
    kw = dict(batch_size=16, seed=5)
    whole = tr.fit(model, tx, TRAIN, epochs=3, **kw)
    step = tr.make_train_step(model, tx)
    first = tr.fit(model, tx, TRAIN, epochs=1, step=step, **kw)
    seen = []
    extras = tr.UpdateExtras(lambda loop: seen.append(loop.state.epoch) or {})
    rest = tr.fit(model, tx, TRAIN, epochs=3, init=first.state, step=step, callbacks=[extras],
                  **kw)  # fmt: skip
    assert _equal(rest.params, whole.params) and _equal(rest.opt_state, whole.opt_state)
    assert [h["epoch"] for h in rest.history] == [1, 2, 3] and seen == [1, 2]
    assert _no_time(rest.history) == _no_time(whole.history)
    assert len(first.history) == 1 and first.state.epoch == 1  # init was not changed
    # the reused step compiled nothing new; each result counts its own call's compiles
    assert first.num_compiles == len(step.phased.masks) and rest.num_compiles == 0
    done = tr.fit(model, tx, TRAIN, epochs=3, init=rest.state, step=step, **kw)
    assert done.steps == 18 and _equal(done.params, whole.params)  # nothing left to run
    with pytest.raises(ValueError, match="step must be a TrainStep built for this model and tx"):
        tr.fit(model, optax.sgd(0.1), TRAIN, epochs=1, step=step, **kw)
    with pytest.raises(ValueError, match="step must be a TrainStep built for this model and tx"):
        tr.fit(MLP((9,), num_classes=3), tx, TRAIN, epochs=1, step=step, **kw)
    with pytest.raises(ValueError, match="leave them at their defaults"):
        tr.fit(model, tx, TRAIN, epochs=1, step=step, call=None, **kw)


def test_max_steps_and_stop_end_inside_an_epoch():
    model, tx = MLP((8,), num_classes=3), optax.sgd(0.1)
    part = tr.fit(model, tx, TRAIN, epochs=3, max_steps=8, **KW)
    assert part.steps == 8 and len(part.history) == 1
    assert (part.state.epoch, part.state.batch, part.state.metric_steps) == (1, 2, 2)
    rest = tr.fit(model, tx, TRAIN, epochs=3, init=part.state, **KW)
    whole = tr.fit(model, tx, TRAIN, epochs=3, **KW)
    assert _equal(rest.params, whole.params)
    assert _no_time(rest.history) == _no_time(whole.history)

    class StopAfterFirstEpoch(tr.Callback):
        def on_epoch_end(self, loop, row):
            loop.stop = True

    rec = Recorder()
    res = tr.fit(model, tx, TRAIN, epochs=3, callbacks=[StopAfterFirstEpoch(), rec], **KW)
    assert res.steps == 6 and len(res.history) == 1 and rec.calls[-2:] == ["log", "train_end"]


# ---------------------------------------------------------------------------------- callbacks


def test_update_extras_reach_tx_update():
    values = []

    def update(updates, state, params=None, *, value, **extra):
        jax.debug.callback(values.append, value)
        return updates, state

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    extras = tr.UpdateExtras(lambda loop: {"value": float(loop.state.epoch) + 0.5})
    tr.fit(MLP((4,), num_classes=3), tx, TRAIN, epochs=2, callbacks=[extras], **KW)
    jax.effects_barrier()
    assert [float(v) for v in values] == [0.5] * 6 + [1.5] * 6
    with pytest.raises(TypeError, match="fn"):
        tr.UpdateExtras(3)
    bad = tr.UpdateExtras(lambda loop: 3)
    with pytest.raises(TypeError, match="mapping"):
        tr.fit(MLP((4,), num_classes=3), tx, TRAIN, epochs=1, callbacks=[bad], **KW)


def test_evaluate_several_splits_none_and_every_few_epochs():
    model, tx = MLP((8,), num_classes=3), optax.sgd(0.1)
    res = tr.fit(model, tx, TRAIN, epochs=3, **KW, callbacks=[
        tr.Evaluate({"a": TEST, "b": list(batches(TEST, 8, seed=0))}, every_epochs=2),
        tr.Evaluate({}),
    ])  # fmt: skip
    has = [sorted(k for k in h if k[:2] in ("a_", "b_")) for h in res.history]
    both = ["a_accuracy", "a_loss", "b_accuracy", "b_loss"]
    assert has == [[], both, both]  # epoch 2, and the last epoch
    plain = tr.fit(model, tx, TRAIN, epochs=1, **KW)
    assert set(plain.history[0]) == {"epoch", "step", "train_time_s", "train_loss",
                                     "train_accuracy"}  # fmt: skip
    assert np.isnan(plain.final_accuracy)
    with pytest.raises(TypeError, match="splits"):
        tr.Evaluate(TEST)
    with pytest.raises(ValueError, match="every_epochs"):
        tr.Evaluate({}, every_epochs=0)


def test_csv_logger_keeps_the_whole_history(tmp_path):
    model, tx = MLP((8,), num_classes=3), optax.sgd(0.1)
    path = tmp_path / "logs" / "m.csv"
    cbs = [tr.CSVLogger(path), tr.Evaluate({"test": TEST}, every_epochs=2)]
    part = tr.fit(model, tx, TRAIN, epochs=2, **KW, callbacks=cbs)
    res = tr.fit(model, tx, TRAIN, epochs=3, init=part.state, **KW, callbacks=cbs)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[0]["test_accuracy"] == "" and float(rows[1]["test_accuracy"]) == pytest.approx(
        res.history[1]["test_accuracy"]
    )
    assert list(rows[0]) == list(res.history[1])
    assert [p.name for p in path.parent.iterdir()] == ["m.csv"]  # no temporary file left


def test_tensorboard_writes_scalars_or_refuses(tmp_path, monkeypatch):
    written, flushed, closed = [], [], []

    class SummaryWriter:  # records what the callback writes, as tensorboardX's writer takes it
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            written.append((self.logdir, tag, value, step))

        def flush(self):
            flushed.append(len(written))

        def close(self):
            closed.append(True)

    monkeypatch.setitem(
        sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    model = MLP((8,), num_classes=3)
    cbs = [tr.TensorBoard(tmp_path / "tb"), tr.Evaluate({"test": TEST})]
    res = tr.fit(model, optax.sgd(0.1), TRAIN, epochs=2, callbacks=cbs, **KW)
    tags = {"train_time_s", "train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    assert {t for _, t, _, _ in written} == tags
    assert {d for d, _, _, _ in written} == {str(tmp_path / "tb")}
    assert sorted({s for _, _, _, s in written}) == [6, 12]  # the global step of each epoch
    last = {t: v for _, t, v, s in written if s == 12}
    assert last["test_accuracy"] == res.history[-1]["test_accuracy"]
    assert flushed == [len(tags), 2 * len(tags)] and closed == [True]  # flushed every epoch

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # not installed
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        tr.TensorBoard(tmp_path / "tb2")


def test_progress_bar_counts_the_steps():
    bar = tr.ProgressBar(desc="test")
    tr.fit(MLP((4,), num_classes=3), optax.sgd(0.1), TRAIN, epochs=2, max_steps=9, **KW,
           callbacks=[bar])  # fmt: skip
    assert (bar._bar.n, bar._bar.total, bar._bar.desc) == (9, 9, "test")


# ---------------------------------------------------------------------------------- checkpoint


def test_resume_mid_epoch_is_bitwise(tmp_path):
    model = BN_MLP
    params, _ = tr.init_model(model, jax.random.PRNGKey(0), TRAIN.x[:1])
    kw = dict(epochs=3, batch_size=16, seed=3)
    tx = _frozen_tx(params)  # a PhaseTag in the optimizer state must round-trip
    full = tr.fit(model, tx, TRAIN, **kw)

    ckpt = tmp_path / "ckpt"
    part = tr.fit(model, tx, TRAIN, callbacks=[tr.Checkpoint(ckpt)], max_steps=8, **kw)
    assert part.steps == 8 and len(part.history) == 1  # stopped inside epoch 2
    assert tr.latest_checkpoint(ckpt) == 8
    resumed = tr.fit(model, tx, TRAIN, callbacks=[tr.Checkpoint(ckpt, resume=True)], **kw)

    assert resumed.steps == full.steps == 18
    assert _equal(resumed.params, full.params)
    assert _equal(resumed.model_state, full.model_state)
    assert _equal(resumed.opt_state, full.opt_state)
    assert _no_time(resumed.history) == _no_time(full.history)
    assert tr.latest_checkpoint(ckpt) == 18
    assert len(list(ckpt.iterdir())) >= 2  # older checkpoints are kept

    with pytest.raises(ValueError, match="resume=True"):  # never overwrites checkpoints
        tr.fit(model, tx, TRAIN, callbacks=[tr.Checkpoint(ckpt)], **kw)
    with pytest.raises(ValueError, match="seed=3"):
        tr.fit(model, tx, TRAIN, callbacks=[tr.Checkpoint(ckpt, resume=True)],
               **{**kw, "seed": 4})  # fmt: skip
    # resuming a finished run does nothing and returns the same params
    again = tr.fit(model, tx, TRAIN, callbacks=[tr.Checkpoint(ckpt, resume=True)], **kw)
    assert again.steps == 18 and _equal(again.params, full.params)


def test_checkpoint_every_steps_and_max_to_keep(tmp_path):
    model, tx = MLP((4,), num_classes=3), optax.sgd(0.1)
    ckpt = tmp_path / "c"
    tr.fit(model, tx, TRAIN, epochs=2, **KW,
           callbacks=[tr.Checkpoint(ckpt, every_steps=4, max_to_keep=2)])  # fmt: skip
    saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert saved == [8, 12]  # of 4, 6, 8 and 12, the last two
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        tr.fit(model, tx, TRAIN, epochs=1, **KW, callbacks=[tr.Checkpoint(tmp_path / "other")])
    for kw, err in [({"every_steps": 0}, ValueError), ({"max_to_keep": 1}, ValueError),
                    ({"resume": 1}, TypeError)]:  # fmt: skip
        with pytest.raises(err, match=next(iter(kw))):
            tr.Checkpoint(ckpt, **kw)


def test_restore_from_other_model_names_the_path(tmp_path):
    kw = dict(epochs=2, batch_size=32, seed=0)
    ckpt = tmp_path / "c"
    tr.fit(MLP((8,), num_classes=3), optax.adam(1e-3), TRAIN, **{**kw, "epochs": 1},
           callbacks=[tr.Checkpoint(ckpt)])  # fmt: skip
    for model, match in [
        (MLP((9,), num_classes=3), "'params/Dense_0/bias' has shape \\(8,\\)"),
        (MLP((8, 8), num_classes=3), "Dense_1"),
    ]:
        with pytest.raises(ValueError, match=match):
            tr.fit(model, optax.adam(1e-3), TRAIN, **kw,
                   callbacks=[tr.Checkpoint(ckpt, resume=True)])  # fmt: skip


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
