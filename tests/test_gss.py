"""Behaviour that makes GSS-Greedy that method: gradient-diversity scores decide the memory."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_learner
from test_learner_contract import B, batches, step_of

from ocljax import models
from ocljax.learners import gss
from ocljax.learners.supervised import init_net
from ocljax.memory import reservoir

CAP = 8  # TINY_CONFIG buffer_size
GSS, LEARNER = tiny_learner("gss")
UPDATE = jax.jit(LEARNER.update)
MODEL = models.make_model("mlp", 4, width=16, depth=1)  # the tiny learner's network


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def row_loss(model, params, xi, yi):
    logits = model.apply(params, {}, xi[None], False)[0][0]
    return -jax.nn.log_softmax(logits)[yi]


row_grad = jax.jit(jax.grad(row_loss, argnums=1), static_argnums=0)


def loop_grads(model, params, x, y):
    """Per-row gradients of the softmax cross-entropy, one ``jax.grad`` call per row."""
    return np.stack([flat(row_grad(model, params, x[i], y[i])) for i in range(len(y))])


def numpy_scores(g, G):
    """Algorithm 2's score: max cosine similarity to the candidates, plus one."""
    g, G = np.asarray(g, np.float64), np.asarray(G, np.float64)
    cos = (g @ G.T) / np.outer(np.linalg.norm(g, axis=1), np.linalg.norm(G, axis=1))
    return cos.max(axis=1) + 1.0


def test_scores_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    g, G = rng.normal(size=(3, 7)), rng.normal(size=(5, 7))
    mask = np.array([True, False, True, True, False])
    got = gss.gss_scores(jnp.asarray(g, jnp.float32), jnp.asarray(G, jnp.float32),
                         jnp.asarray(mask))
    np.testing.assert_allclose(got, numpy_scores(g, G[mask]), rtol=1e-5)
    empty = gss.gss_scores(jnp.asarray(g, jnp.float32), jnp.asarray(G, jnp.float32),
                           jnp.zeros(5, bool))
    np.testing.assert_allclose(empty, [0.1] * 3)


def test_per_sample_gradients_match_a_loop():
    bs = batches()
    state = LEARNER.init(jax.random.PRNGKey(0), bs.x[0], GSS.HParams())
    got = jax.jit(gss.per_sample_grads, static_argnums=0)(MODEL, state.net, bs.x[0], bs.y[0])
    np.testing.assert_allclose(got, loop_grads(MODEL, state.net.params, bs.x[0], bs.y[0]),
                               rtol=1e-5, atol=1e-7)


def test_dense_gram_is_the_gram_of_per_sample_gradients():
    model = models.make_model("mlp", 5, width=12, depth=2)
    bs = batches()
    x, y = jnp.concatenate([bs.x[0], bs.x[1]]), jnp.concatenate([bs.y[0], bs.y[1]]) % 5
    net = init_net(model, "sgd", jax.random.PRNGKey(3), x, 0.1)
    gram = jax.jit(gss.dense_gram, static_argnums=0)(model, net, x, y)
    g = loop_grads(model, net.params, x, y)
    assert gram.shape == (len(y), len(y))
    np.testing.assert_allclose(gram, g @ g.T, rtol=1e-4, atol=1e-6)


def test_dense_gram_of_a_cnn_adds_the_per_sample_gradients_of_its_other_parameters():
    x = jax.random.randint(jax.random.PRNGKey(1), (6, 8, 8, 1), 0, 255).astype(jnp.uint8)
    y = jnp.arange(6, dtype=jnp.int32) % 4
    for name in ("cnn", "cnn_bn"):
        model = models.make_model(name, 4, width=8)
        net = init_net(model, "sgd", jax.random.PRNGKey(0), x, 0.1)
        if net.model_state:  # non-trivial running statistics for evaluation mode
            net = net._replace(model_state=jax.tree.map(lambda a: a + 0.3, net.model_state))
        gram = jax.jit(gss.dense_gram, static_argnums=0)(model, net, x, y)
        g = loop_grads(model, net.params, x, y) if not net.model_state else \
            np.asarray(gss.per_sample_grads(model, net, x, y))
        np.testing.assert_allclose(gram, g @ g.T, rtol=1e-4, atol=1e-6, err_msg=name)
        # the convolutions' share is really there: the Dense layers alone give less
        rest = gss.rest_grads(model, net, x, y, [("Dense_0",), ("Dense_1",)])
        assert rest.shape[1] == sum(
            leaf.size for key, sub in net.params.items() if not key.startswith("Dense")
            for leaf in jax.tree.leaves(sub))
        assert float(jnp.abs(rest @ rest.T).max()) > 1e-3 * float(jnp.abs(gram).max())


def test_dense_gram_declines_a_dense_layer_on_a_sequence():
    from flax import linen as nn

    from ocljax.models.adapter import from_linen

    class Tokens(nn.Module):  # a Dense on [N, 4, features]: not one gradient row per input row
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.relu(nn.Dense(5)(x.reshape(x.shape[0], 4, -1)))
            h = h.reshape(h.shape[0], -1)
            return nn.Dense(3)(h), h

    model = from_linen(Tokens(), 3, 20)
    x, y = jnp.ones((3, 4, 4, 1), jnp.uint8), jnp.zeros((3,), jnp.int32)
    net = init_net(model, "sgd", jax.random.PRNGKey(0), x, 0.1)
    assert gss.dense_gram(model, net, x, y) is None


def fill_with(second):
    """Steps on batch 0, ``second``, batch 2: returns the state after them (batches 0 and
    ``second`` selected) and the parameters ``second`` was scored with."""
    hp, bs, update = GSS.HParams(), batches(), UPDATE
    state = LEARNER.init(jax.random.PRNGKey(0), bs.x[0], hp)
    state, _ = update(state, step_of(bs, 0), hp, jax.random.PRNGKey(0))
    assert int(state.buffer.n_seen) == 0  # batch 0 waits; it is selected at the next step
    state, _ = update(state, second, hp, jax.random.PRNGKey(1))
    params = state.net.params  # selection of ``second`` happens before the next step trains
    state, _ = update(state, step_of(bs, 2), hp, jax.random.PRNGKey(2))
    return state, params


def test_buffer_fills_first_with_every_sample_and_numpy_scores():
    bs, model = batches(), MODEL
    state, params = fill_with(step_of(bs, 1))
    assert int(state.buffer.n_seen) == CAP
    np.testing.assert_array_equal(state.buffer.data["x"], np.concatenate([bs.x[0], bs.x[1]]))
    np.testing.assert_allclose(state.scores[:B], 0.1)  # offered to an empty memory
    # batch 1 against the candidates: all B rows of batch 0 (candidates >= rows stored)
    g = loop_grads(model, params, bs.x[1], bs.y[1])
    G = loop_grads(model, params, bs.x[0], bs.y[0])
    np.testing.assert_allclose(state.scores[B:], numpy_scores(g, G), rtol=1e-4, atol=1e-5)
    # a duplicate of the memory (score 2, the worst) is still added while the memory fills
    dup, _ = fill_with(step_of(bs, 1)._replace(x=bs.x[0], y=bs.y[0]))
    np.testing.assert_array_equal(dup.buffer.data["x"], np.concatenate([bs.x[0], bs.x[0]]))
    np.testing.assert_allclose(dup.scores[B:], 2.0, rtol=1e-5)


def opposite_setup():
    """2 classes, last layer zeroed: every gradient is [h (x) d, d] with d = p - e_y =
    +-(0.5, -0.5), so same-label rows have cosine > 0 and a flipped label on the same image
    has cosine exactly -1 (score 0)."""
    module, learner = tiny_learner("gss", num_classes=2)
    hp, bs = module.HParams(), batches()
    x0, x1 = bs.x[0][0], bs.x[0][1]
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    params = dict(state.net.params)
    params["Dense_1"] = jax.tree.map(jnp.zeros_like, params["Dense_1"])
    data = {"x": jnp.broadcast_to(x0, (CAP, *x0.shape)), "y": jnp.zeros((CAP,), jnp.int32)}
    state = state._replace(
        net=state.net._replace(params=params),
        buffer=reservoir.ReservoirState(data, jnp.asarray(CAP, jnp.int32)),  # full
        scores=jnp.full((CAP,), 1.5, jnp.float32),
        # incoming: a duplicate, an opposite, a look-alike, an opposite
        pending={"x": jnp.stack([x0, x0, x1, x0]), "y": jnp.array([0, 1, 0, 1], jnp.int32)},
        pending_valid=jnp.ones((B,), bool),
    )
    return module, learner, hp, bs, state


def test_duplicate_gradient_is_rejected_and_opposite_gradient_is_accepted():
    module, learner, hp, bs, state = opposite_setup()
    model = models.make_model("mlp", 2, width=16, depth=1)
    g = loop_grads(model, state.net.params, state.pending["x"], state.pending["y"])
    G = loop_grads(model, state.net.params, state.buffer.data["x"][:1],
                   state.buffer.data["y"][:1])
    c = numpy_scores(g, G)
    np.testing.assert_allclose(c[[0, 1, 3]], [2.0, 0.0, 0.0], atol=1e-5)
    assert 1.0 < c[2] < 2.0  # the look-alike (same label, other image) is also rejected
    update = jax.jit(learner.update)
    for seed in range(5):
        new, _ = update(state, step_of(bs, 1), hp, jax.random.PRNGKey(seed))
        y, x = np.asarray(new.buffer.data["y"]), np.asarray(new.buffer.data["x"])
        assert (y == 1).sum() == 2  # both opposite samples replaced a slot
        np.testing.assert_array_equal(x[y == 1], np.stack([state.pending["x"][1]] * 2))
        assert not (x == np.asarray(state.pending["x"][2])).all(axis=(1, 2, 3)).any()
        scores = np.asarray(new.scores)
        np.testing.assert_allclose(np.sort(scores)[:2], 0.0, atol=1e-5)  # new rows' scores
        np.testing.assert_allclose(np.sort(scores)[2:], 1.5)  # no duplicate got a slot


def test_replacement_draws_slots_in_proportion_to_their_scores():
    scores = jnp.array([1.0, 3.0])

    @jax.jit
    @jax.vmap
    def draw(key, c):
        slot, _, _ = gss.select(key, jnp.asarray(2, jnp.int32), scores, c[None],
                                jnp.ones(1, bool))
        return slot[0]

    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    slots = np.asarray(draw(keys, jnp.full(20000, 0.5)))
    freq = np.bincount(slots, minlength=3) / len(slots)
    # slot i drawn w.p. C_i / sum C, kept w.p. C_i / (C_i + c); else rejected (slot = cap)
    expected = [1 / 4 * 1 / 1.5, 3 / 4 * 3 / 3.5]
    np.testing.assert_allclose(freq, [*expected, 1 - sum(expected)], atol=0.012)
    # a score >= 1 is never admitted into a full memory
    assert (np.asarray(draw(keys, jnp.full(20000, 1.0))) == 2).all()


def test_same_key_same_run_and_keys_matter():
    hp, bs, update = GSS.HParams(), batches(), UPDATE

    def run(seed):
        state = LEARNER.init(jax.random.PRNGKey(0), bs.x[0], hp)
        for i in range(6):
            state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(seed * 100 + i))
        return state

    a, b, c = run(0), run(0), run(1)
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), a, b)
    assert int(a.buffer.n_seen) == 5 * B > CAP  # the selection rule has been exercised
    assert any(not np.array_equal(u, v) for u, v in
               zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True))
