"""Behaviour that makes CoPE that method: the pseudo-prototypical proxy loss (attractor and
repellor against the other classes' prototypes, candidates without gradient), prototypes that
follow their class's mean embedding by momentum and never get a gradient, no step before two
classes, a class-balanced memory read, and nearest-prototype prediction over seen classes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learner_contract import B, batches, step_of

from ocljax import models
from ocljax.errors import ConfigError
from ocljax.learners import cope, er
from ocljax.memory import class_reservoir


def tiny_model():
    return models.make_model("mlp", 4, width=16, depth=1)


def unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def ppp_reference(f, labels, protos, seen, temperature):
    """The authors' ``PPPloss`` written from its definition as loops over classes, rows and
    pairs, in probabilities and float64."""
    f, protos = np.asarray(f, np.float64), np.asarray(protos, np.float64)
    e = lambda u, v: np.exp(u @ v / temperature)  # noqa: E731
    total = 0.0
    for c in np.unique(labels):
        others = [k for k in range(len(protos)) if seen[k] and k != c]
        z = lambda j, others=others: sum(e(protos[k], f[j]) for k in others)  # noqa: E731
        in_c = [i for i in range(len(f)) if labels[i] == c]
        not_c = [j for j in range(len(f)) if labels[j] != c]
        for i in in_c:
            candidates = [f[j] for j in in_c if j != i] + [protos[c]]
            p_att = np.mean([e(u, f[i]) / (e(u, f[i]) + z(i)) for u in candidates])
            total -= np.log(p_att)
            for j in not_c:
                p = e(f[i], f[j]) / (e(f[i], f[j]) + z(j))
                q = e(protos[c], f[j]) / (e(protos[c], f[j]) + z(j))
                total -= np.log(1 - (p + q) / 2)
    return total / len(f)


def ppp_probabilities(f, labels, protos, seen, temperature, detach=True):
    """The same loss in JAX, in probabilities, with the code's detaches: attractor candidates
    (other rows and prototypes) and all prototypes carry no gradient; the repellor's rows do.
    ``detach=False`` lets the attractor's candidate rows carry gradient too."""
    p = jax.lax.stop_gradient(protos)
    fd = jax.lax.stop_gradient(f) if detach else f
    total = 0.0
    for c in np.unique(labels):
        others = [k for k in range(len(protos)) if seen[k] and k != c]
        z = lambda j, ks=others: sum(jnp.exp(p[k] @ f[j] / temperature) for k in ks)  # noqa: E731
        in_c = [i for i in range(len(labels)) if labels[i] == c]
        not_c = [j for j in range(len(labels)) if labels[j] != c]
        for i in in_c:
            cands = [fd[j] for j in in_c if j != i] + [p[c]]
            terms = [jnp.exp(u @ f[i] / temperature) for u in cands]
            total -= jnp.log(sum(t / (t + z(i)) for t in terms) / len(cands))
            for j in not_c:
                a = jnp.exp(f[i] @ f[j] / temperature)
                b = jnp.exp(p[c] @ f[j] / temperature)
                total -= jnp.log(1 - (a / (a + z(j)) + b / (b + z(j))) / 2)
    return total / len(labels)


def problem(seed=0, m=9, d=6, c=5):
    rng = np.random.default_rng(seed)
    f = unit(rng.normal(size=(m, d)))
    protos = rng.uniform(0, 1, size=(c, d)) * rng.uniform(0.3, 1.0, size=(c, 1))  # not unit
    labels = np.array([0, 1, 0, 3, 0, 1, 3, 3, 2])[:m]
    seen = np.array([True, True, True, True, False])[:c]
    return f, labels, protos, seen


def test_loss_equals_the_authors_ppp_loss():
    f, labels, protos, seen = problem()
    for t in (0.1, 0.5):
        got = cope.ppp_loss(jnp.asarray(f, jnp.float32), jnp.asarray(labels),
                            jnp.ones(len(labels), bool), jnp.asarray(protos, jnp.float32),
                            jnp.asarray(seen), t)
        np.testing.assert_allclose(float(got), ppp_reference(f, labels, protos, seen, t),
                                   rtol=2e-5)


def test_a_single_row_class_is_attracted_by_its_prototype_alone_and_masked_rows_drop_out():
    f, labels, protos, seen = problem(1)
    valid = np.array([True, True, False, True, True, False, True, True, True])
    got = cope.ppp_loss(jnp.asarray(f, jnp.float32), jnp.asarray(labels), jnp.asarray(valid),
                        jnp.asarray(protos, jnp.float32), jnp.asarray(seen), 0.2)
    np.testing.assert_allclose(
        float(got), ppp_reference(f[valid], labels[valid], protos, seen, 0.2), rtol=2e-5)


def test_gradient_flows_where_the_code_lets_it():
    """Candidates of the attractor are detached, the repellor's pseudo-prototypes are not, and
    prototypes get no gradient at all: the gradient equals that of the loss written in
    probabilities with exactly those detaches."""
    f, labels, protos, seen = problem(2)
    fj, pj = jnp.asarray(f, jnp.float32), jnp.asarray(protos, jnp.float32)
    ones = jnp.ones(len(labels), bool)
    g_f, g_p = jax.grad(lambda a, b: cope.ppp_loss(a, jnp.asarray(labels), ones, b,
                                                   jnp.asarray(seen), 0.5), (0, 1))(fj, pj)
    want = jax.grad(lambda a: ppp_probabilities(a, labels, pj, seen, 0.5))(fj)
    np.testing.assert_allclose(np.asarray(g_f), np.asarray(want), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g_p) == 0.0)
    # without the attractor's detach the gradient differs: the test can tell
    no_detach = jax.grad(lambda a: ppp_probabilities(a, labels, pj, seen, 0.5, False))(fj)
    assert np.abs(np.asarray(no_detach) - np.asarray(g_f)).max() > 1e-2


def test_prototypes_move_by_momentum_towards_the_batch_mean_without_renormalising():
    rng = np.random.default_rng(3)
    protos = rng.normal(size=(4, 3))
    f = unit(rng.normal(size=(6, 3)))
    labels = np.array([0, 2, 0, 2, 2, 1])
    valid = np.array([True, True, True, True, True, False])
    got = np.asarray(cope.move_prototypes(jnp.asarray(protos, jnp.float32),
                                          jnp.asarray(f, jnp.float32), jnp.asarray(labels),
                                          jnp.asarray(valid), 0.9))
    want = protos.copy()
    want[0] = 0.9 * protos[0] + 0.1 * f[[0, 2]].mean(0)
    want[2] = 0.9 * protos[2] + 0.1 * f[[1, 3, 4]].mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # classes 1 (masked) and 3 stay


def test_update_is_the_ppp_loss_over_stream_and_class_balanced_replay_then_moves_prototypes():
    model = tiny_model()
    cfg = cope.Config(buffer_size=8, replay_batch=3, embed_dim=5)
    hp = cope.HParams(temperature=0.3, momentum=0.8)
    learner = cope.make(model, cfg)
    bs = batches()
    update = jax.jit(learner.update)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(3):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
    key = jax.random.PRNGKey(11)
    after, metrics = update(state, step_of(bs, 3), hp, key)
    k_write, k_read = jax.random.split(key)
    flushed = er.flush(state, k_write, add=class_reservoir.add)
    replay, mask = class_reservoir.sample(flushed.buffer, k_read, cfg.replay_batch)
    assert bool(mask.all())
    x = jnp.concatenate([bs.x[3], replay["x"]])
    y = np.concatenate([np.asarray(bs.y[3]), np.asarray(replay["y"])])
    params = state.net.params
    _, feats, _ = model.apply(params["net"], {}, x, True)
    f = np.asarray(cope.embed(params["embed"], feats))
    seen = np.asarray(state.seen) | np.isin(np.arange(4), np.asarray(bs.y[3]))
    want = ppp_reference(f, y, np.asarray(state.prototypes), seen, 0.3)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4)
    moved = cope.move_prototypes(state.prototypes, jnp.asarray(f), jnp.asarray(y),
                                 jnp.ones(len(y), bool), 0.8)
    np.testing.assert_allclose(np.asarray(after.prototypes), np.asarray(moved), rtol=1e-5,
                               atol=1e-6)


def test_no_step_before_two_classes_but_prototypes_move_and_prediction_stays_on_seen():
    model = tiny_model()
    learner = cope.make(model, cope.Config(buffer_size=8, replay_batch=3))
    hp, bs = cope.HParams(), batches()
    update = jax.jit(learner.update)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    only_one = step_of(bs, 0)._replace(y=jnp.full((B,), 2, jnp.int32))
    first, metrics = update(state, only_one, hp, jax.random.PRNGKey(1))
    assert float(metrics["loss"]) == 0.0
    for a, b in zip(jax.tree.leaves(first.net.params), jax.tree.leaves(state.net.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    p0, p1 = np.asarray(state.prototypes), np.asarray(first.prototypes)
    assert not np.allclose(p1[2], p0[2])
    np.testing.assert_array_equal(np.delete(p1, 2, 0), np.delete(p0, 2, 0))
    assert (np.asarray(learner.predict(first, bs.x[1], hp)).argmax(1) == 2).all()
    two = step_of(bs, 1)._replace(y=jnp.asarray([0, 2, 0, 2], jnp.int32))
    second, metrics = update(first, two, hp, jax.random.PRNGKey(2))
    assert float(metrics["loss"]) > 0.0
    predicted = np.asarray(learner.predict(second, bs.x[2], hp)).argmax(1)
    assert set(predicted.tolist()) <= {0, 2}


def test_prediction_is_the_dot_product_with_unnormalised_prototypes():
    """Prototypes are momentum averages of unit vectors, so their norms differ by class; the
    code scores ``f . p_c`` (not the cosine), and so does ``predict``. Initial prototypes are
    unit vectors."""
    model = tiny_model()
    learner = cope.make(model, cope.Config(buffer_size=8, replay_batch=3, embed_dim=5))
    hp, bs = cope.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state.prototypes), axis=1), 1.0,
                               rtol=1e-6)
    scales = jnp.asarray([0.2, 1.0, 0.5, 3.0])[:, None]
    state = state._replace(prototypes=state.prototypes * scales,
                           seen=jnp.asarray([True, True, True, False]))
    params = state.net.params
    _, feats, _ = model.apply(params["net"], {}, bs.x[1], False)
    f = np.asarray(cope.embed(params["embed"], feats))
    want = f @ np.asarray(state.prototypes).T
    got = np.asarray(learner.predict(state, bs.x[1], hp))
    np.testing.assert_allclose(got[:, :3], want[:, :3], rtol=1e-5)
    assert np.all(got[:, 3] == cope.UNSEEN)


def test_no_optimizer_step_before_two_classes_even_for_adam():
    """With one class the PPP loss and its gradient are 0, so SGD would not move anyway; Adam
    would still count a step (and its bias corrections would shift): the gate keeps it out."""
    model = tiny_model()
    learner = cope.make(model, cope.Config(buffer_size=8, replay_batch=3, optimizer="adam"))
    hp, bs = cope.HParams(), batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    one = step_of(bs, 0)._replace(y=jnp.full((B,), 1, jnp.int32))
    after, _ = jax.jit(learner.update)(state, one, hp, jax.random.PRNGKey(1))
    for a, b in zip(jax.tree.leaves(after.net), jax.tree.leaves(state.net), strict=True):
        np.testing.assert_array_equal(a, b)
    two = step_of(bs, 1)._replace(y=jnp.asarray([0, 1, 0, 1], jnp.int32))
    later, _ = jax.jit(learner.update)(after, two, hp, jax.random.PRNGKey(2))
    counts = [leaf for leaf in jax.tree.leaves(later.net.opt_state) if leaf.dtype == jnp.int32]
    assert counts and all(int(c) == 1 for c in counts)


def test_prototypes_end_nearest_their_own_class_after_a_stream():
    """Two classes of distinct inputs, 40 steps: each class's prototype is closer (cosine) to
    its class's mean embedding than to the other class's, and prediction sorts the inputs."""
    rng = np.random.default_rng(5)
    model = tiny_model()
    learner = cope.make(model, cope.Config(buffer_size=16, replay_batch=4, embed_dim=8))
    hp = cope.HParams(lr=0.05, momentum=0.9)
    means = rng.integers(0, 255, size=(2, 4, 4, 1))

    def data(n):
        y = rng.integers(0, 2, size=n)
        x = np.clip(means[y] + rng.normal(0, 20, size=(n, 4, 4, 1)), 0, 255).astype(np.uint8)
        return jnp.asarray(x), jnp.asarray(y, jnp.int32)

    update = jax.jit(learner.update)
    x0, _ = data(B)
    state = learner.init(jax.random.PRNGKey(0), x0, hp)
    batch = step_of(batches(), 0)
    for i in range(40):
        x, y = data(B)
        state, _ = update(state, batch._replace(x=x, y=y), hp, jax.random.PRNGKey(i))
    x, y = data(64)
    params = state.net.params
    _, feats, _ = model.apply(params["net"], {}, x, False)
    f = np.asarray(cope.embed(params["embed"], feats))
    class_mean = unit(np.stack([f[np.asarray(y) == c].mean(0) for c in (0, 1)]))
    protos = unit(np.asarray(state.prototypes)[:2])
    cos = protos @ class_mean.T
    assert cos[0, 0] > cos[0, 1] and cos[1, 1] > cos[1, 0]
    accuracy = (np.asarray(learner.predict(state, x, hp)).argmax(1) == np.asarray(y)).mean()
    assert accuracy > 0.9


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="embed_dim"):
        cope.make(tiny_model(), cope.Config(embed_dim=0))
    with pytest.raises(ConfigError, match="replay_batch"):
        cope.make(tiny_model(), cope.Config(buffer_size=4, replay_batch=8))
    with pytest.raises(ConfigError, match="quota of 0"):
        cope.make(tiny_model(), cope.Config(buffer_size=3, replay_batch=2))
