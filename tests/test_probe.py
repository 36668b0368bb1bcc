"""Linear-probe accuracy (ocljax.metrics.probe) and the ``Learner.features`` plumbing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIG

from ocljax import learners, models
from ocljax.learners.supervised import init_net, net_features
from ocljax.metrics import probe


def identity(state, x, hp):
    """Features are the inputs themselves (scaled by the state, offset by ``hp``)."""
    return x * state + hp


def blobs(seed, n_per_class, centres, spread=0.1):
    """Gaussian blobs around ``centres`` [C, F]: (x [C * n, F] float32, y [C * n] int32)."""
    rng = np.random.default_rng(seed)
    centres = np.asarray(centres, np.float32)
    y = np.repeat(np.arange(len(centres)), n_per_class).astype(np.int32)
    x = centres[y] + spread * rng.standard_normal((len(y), centres.shape[1])).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


CENTRES = [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [-3.0, -3.0, 0.0]]


def probe_acc(state, train, test, train_mask=None, test_mask=None, **kw):
    (xtr, ytr), (xte, yte) = train, test
    tm = jnp.ones(ytr.shape, bool) if train_mask is None else train_mask
    em = jnp.ones(yte.shape, bool) if test_mask is None else test_mask
    kw = {"steps": 60, "batch": 7, **kw}  # batch 7 does not divide N: exercises the padding
    return probe.linear_probe_accuracy(identity, state, 0.0, xtr, ytr, tm, xte, yte, em, 4, **kw)


def test_standardiser_hand_values():
    # masked rows [1, 0], [3, 0]: mean [2, 0], std [1, 0] -> scale [1, 0] (constant feature off);
    # the unmasked row [100, 5] must not count
    f = jnp.asarray([[1.0, 0.0], [3.0, 0.0], [100.0, 5.0]])
    y, m = jnp.asarray([0, 1, 0]), jnp.asarray([True, True, False])
    p = probe.fit_linear_probe(f, y, m, 2, steps=5)
    np.testing.assert_allclose(p.mean, [2.0, 0.0])
    np.testing.assert_allclose(p.scale, [1.0, 0.0])
    assert p.W.shape == (2, 2) and p.b.shape == (2,)
    assert np.all(np.asarray(p.W[1]) == 0)  # a switched-off feature gets no weight
    # the cut-off is relative: tiny but real spreads are standardised, not switched off
    tiny = probe.fit_linear_probe(1e-5 * f, y, m, 2, steps=5)
    np.testing.assert_allclose(tiny.scale, [1e5, 0.0], rtol=1e-5)


def test_separable_features_give_accuracy_one():
    acc = probe_acc(jnp.float32(1.0), blobs(0, 10, CENTRES), blobs(1, 6, CENTRES))
    assert float(acc) == 1.0
    # a single feature threshold: class 0 below 0, class 1 above
    x = jnp.asarray([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
    y = jnp.asarray([0, 0, 0, 1, 1, 1])
    p = probe.fit_linear_probe(x, y, jnp.ones(6, bool), 2, steps=100)
    assert np.array_equal(np.argmax(probe.probe_predict(p, x), -1), y)


def test_reaches_the_regularised_optimum():
    """At the end of the fit the gradient of ``mean CE + l2/2 ||W||^2`` (standardised features,
    written out independently here) is ~0: the optimiser minimises the stated objective."""
    x, y = blobs(2, 8, CENTRES, spread=2.0)  # overlapping: a non-trivial optimum
    l2 = 0.1
    p = probe.fit_linear_probe(x, y, jnp.ones(y.shape, bool), 4, steps=400, lr=0.1, l2=l2)
    z = (x - x.mean(0)) / x.std(0)

    def objective(W, b):
        logp = jax.nn.log_softmax(z @ W + b)
        return -jnp.take_along_axis(logp, y[:, None], 1).mean() + 0.5 * l2 * jnp.sum(W * W)

    gW, gb = jax.grad(objective, argnums=(0, 1))(p.W, p.b)
    assert float(jnp.abs(gW).max()) < 1e-3 and float(jnp.abs(gb).max()) < 1e-3


def test_absent_class_is_never_predicted():
    xtr, ytr = blobs(3, 10, CENTRES)
    xte, yte = blobs(4, 6, CENTRES)
    mask = ytr != 1  # class 1 unseen; its (unmasked) rows still sit in the arrays
    p = probe.fit_linear_probe(xtr, ytr, mask, 4, steps=60)
    logits = probe.probe_predict(p, xte)
    assert np.all(np.isneginf(np.asarray(logits[:, 1])))
    assert np.all(np.isfinite(np.asarray(logits[:, [0, 2, 3]])))
    assert 1 not in np.asarray(jnp.argmax(logits, -1))
    # class-1 test rows (a quarter) are all wrong, the rest right
    assert float(probe_acc(jnp.float32(1.0), (xtr, ytr), (xte, yte), train_mask=mask)) == 0.75
    # no masked row at all: nothing is fitted, but nothing is NaN either
    empty = probe.fit_linear_probe(xtr, ytr, jnp.zeros(ytr.shape, bool), 4, steps=5)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in empty)


def test_test_mask_and_per_task_accuracy_hand_values():
    train, (xte, yte) = blobs(5, 10, CENTRES), blobs(6, 4, CENTRES)
    ytr = train[1]
    tm = ytr != 3  # class 3 unseen -> its test rows are wrong
    task = jnp.where(yte < 2, 0, 1)  # task 0 = classes {0, 1}, task 1 = {2, 3}
    task = task.at[0].set(-1).at[1].set(7)  # two rows outside [0, 2): ignored
    em = jnp.ones(yte.shape, bool).at[4].set(False)  # a class-1 row masked out
    acc = probe.linear_probe_task_accuracy(identity, jnp.float32(1.0), 0.0, *train, tm, xte, yte,
                                           em, task, 2, 4, steps=60, batch=5)
    # task 0: 8 rows - 2 outside - 1 masked = 5, all right; task 1: 4 of class 2 right, 4 wrong
    np.testing.assert_allclose(acc, [1.0, 0.5])
    # the pooled accuracy over the 15 masked rows (task ignored): 11 right
    pooled = probe_acc(jnp.float32(1.0), train, (xte, yte), train_mask=tm, test_mask=em)
    np.testing.assert_allclose(pooled, 11 / 15, rtol=1e-6)
    # a task with no row scores 0, as per_task_accuracy does
    three = probe.linear_probe_task_accuracy(identity, jnp.float32(1.0), 0.0, *train, tm, xte,
                                             yte, em, task, 3, 4, steps=60, batch=5)
    np.testing.assert_allclose(three, [1.0, 0.5, 0.0])


def test_vmap_over_members_equals_single_calls():
    train, test = blobs(7, 8, CENTRES, spread=1.5), blobs(8, 8, CENTRES, spread=1.5)
    # three members: different representations (a per-member linear map) and hparams
    states = jnp.asarray(np.random.default_rng(9).standard_normal((3, 3, 3)), jnp.float32)
    hps = jnp.asarray([0.0, 1.0, -2.0])

    def matmul(state, x, hp):
        return x @ state + hp

    def one(state, hp):
        (xtr, ytr), (xte, yte) = train, test
        p = probe.fit_linear_probe(probe.batched_features(matmul, state, hp, xtr, 7), ytr,
                                   ytr != 2, 4, steps=50)
        acc = probe.linear_probe_accuracy(matmul, state, hp, xtr, ytr, ytr != 2, xte, yte,
                                          jnp.ones(yte.shape, bool), 4, steps=50, batch=7)
        return p, acc

    p_v, acc_v = jax.jit(jax.vmap(one))(states, hps)
    for i in range(3):
        p_i, acc_i = jax.jit(one)(states[i], hps[i])
        assert float(acc_v[i]) == float(acc_i)
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
                     p_v, p_i)
    assert len({float(a) for a in acc_v}) > 1  # the members really differ


def test_invariant_to_scaling_the_features():
    train, test = blobs(10, 8, CENTRES, spread=1.5), blobs(11, 8, CENTRES, spread=1.5)
    small = probe_acc(jnp.float32(1.0), train, test)
    large = probe_acc(jnp.float32(1000.0), train, test)
    assert 0.3 < float(small) < 1.0  # overlapping blobs: a non-trivial accuracy
    assert float(small) == float(large)
    f = train[0]
    m = jnp.ones(train[1].shape, bool)
    p1 = probe.fit_linear_probe(f, train[1], m, 4, steps=60)
    p2 = probe.fit_linear_probe(1000 * f, train[1], m, 4, steps=60)
    np.testing.assert_allclose(p1.W, p2.W, rtol=1e-3, atol=1e-4)


def test_batched_features_matches_one_call():
    x = jnp.arange(30.0).reshape(10, 3)
    out = probe.batched_features(identity, jnp.float32(2.0), 1.0, x, batch=4)  # 3 batches
    np.testing.assert_array_equal(out, 2 * x + 1)
    assert out.dtype == jnp.float32


def tiny_model():
    return models.make_model("mlp", 4, width=16, depth=1)


def test_net_features_on_a_tiny_mlp():
    model = tiny_model()
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (5, 4, 4, 1)), jnp.uint8)
    net = init_net(model, "sgd", jax.random.PRNGKey(0), x, 0.1)
    feats = net_features(model)(net, x, None)
    assert feats.shape == (5, model.feature_dim)
    np.testing.assert_array_equal(feats, model.apply(net.params, net.model_state, x, False)[1])
    # a state holding the network as .net reads the same features
    holder = learners.get("er").State
    assert holder._fields[0] == "net"
    wrapped = holder(net, *([None] * (len(holder._fields) - 1)))
    np.testing.assert_array_equal(net_features(model)(wrapped, x, None), feats)
    with pytest.raises(TypeError, match="NetState"):
        net_features(model)({"params": net.params}, x, None)


# Learners without a representation to probe (``features`` is None): they never read the input.
NO_REPRESENTATION = {"blind"}


@pytest.mark.parametrize("name", sorted(learners.REGISTRY))
def test_every_learner_exposes_features(name):
    module = learners.get(name)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    cfg = module.Config(**{k: v for k, v in TINY_CONFIG.items() if k in fields})
    model = tiny_model()
    learner = module.make(model, cfg)
    if name in NO_REPRESENTATION:
        assert learner.features is None
        return
    assert learner.features is not None, f"{name} has no features function"
    hp = module.HParams()
    x = jax.ShapeDtypeStruct((4, 4, 4, 1), jnp.uint8)
    state = jax.eval_shape(learner.init, jax.random.PRNGKey(0), x, hp)
    prepared = jax.eval_shape(learner.prepare_eval, state, hp, jax.random.PRNGKey(1))
    for s in (state, prepared):
        out = jax.eval_shape(learner.features, s, jax.ShapeDtypeStruct((6, 4, 4, 1), jnp.uint8),
                             hp)
        assert out.shape == (6, model.feature_dim)
