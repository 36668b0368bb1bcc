"""Behaviour that makes OCM that method: every transformed copy of an image is its own class in
the contrastive losses (the code's 16 half-and-rotation copies on MNIST), the incoming and the
memory rows are contrasted apart with the code's three losses, the model of the previous task
(a snapshot at the boundary, never trained) anchors the memory's projections, the
cross-entropy moves from the incoming rows to the memory after the first task, and the
optimizer is Adam with PyTorch's coupled weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_learner_contract import batches, step_of

from ocljax import models
from ocljax.errors import ConfigError
from ocljax.learners import er, ocm
from ocljax.losses import cross_entropy
from ocljax.memory import reservoir

C = 4


def tiny_model():
    return models.make_model("mlp", C, width=16, depth=1)


def code_terms(s, labels, keep_self, temperature):
    """The code's ``l`` and positive mask, float64, written from its definition."""
    s = np.asarray(s, np.float64) / temperature
    e = np.exp(s - s.max(1, keepdims=True))
    if not keep_self:
        np.fill_diagonal(e, 0.0)
    ell = -np.log(e / (e.sum(1, keepdims=True) + 1e-8) + 1e-8)
    pos = (labels[:, None] == labels[None, :]).astype(np.float64)
    return ell, pos / pos.sum(1, keepdims=True)


def code_nt_xent_n(s, labels, temperature):
    both = np.tile(labels, 2)
    ell, w = code_terms(s, both, False, temperature)
    n = len(labels)
    pairs = np.mean([ell[i, i + n] for i in range(n)] + [ell[i + n, i] for i in range(n)])
    return pairs + 2.0 * (w * ell).sum(1).mean()


def code_nt_xent_uni(s, labels, temperature):
    ell, w = code_terms(s, labels, True, temperature)
    return (w * ell).sum(1).mean()


def test_halves_make_16_distinct_copies_in_the_codes_order():
    x = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.uint8)
    got = np.asarray(ocm.transform(jnp.asarray(x), "halves")).reshape(16, 2, 4, 4, 1)
    turn = lambda a: a[::-1, ::-1]  # noqa: E731
    img = x[1]
    left_turned = np.concatenate([turn(img[:, :2]), img[:, 2:]], 1)
    both = np.concatenate([turn(img[:, :2]), turn(img[:, 2:])], 1)
    right_turned = np.concatenate([img[:, :2], turn(img[:, 2:])], 1)
    for r in range(4):
        for v, want in enumerate([img, left_turned, both, right_turned]):
            np.testing.assert_array_equal(got[4 * r + v, 1], np.rot90(want, r, axes=(0, 1)))
    flat = got[:, 1].reshape(16, -1)
    assert len({row.tobytes() for row in flat}) == 16
    rot = np.asarray(ocm.transform(jnp.asarray(x), "rotations")).reshape(4, 2, 4, 4, 1)
    np.testing.assert_array_equal(rot[:, 1], got[[0, 4, 8, 12], 1])
    labels = np.asarray(ocm.copy_labels(jnp.asarray([1, 3]), 16, C))
    np.testing.assert_array_equal(labels[[0, 1, 2, 3, 30, 31]], [1, 3, 5, 7, 61, 63])


def test_similarity_mixes_projection_and_a_feature_window():
    rng = np.random.default_rng(0)
    z, h = rng.normal(size=(5, 3)), rng.normal(size=(5, 7))
    got = np.asarray(ocm.similarity(jnp.asarray(z), jnp.asarray(h), 2))
    np.testing.assert_allclose(got, 0.5 * z @ h[:, 2:5].T + 0.5 * z @ z.T, rtol=1e-5)


def test_losses_equal_the_codes_three_contrastive_losses():
    rng = np.random.default_rng(1)
    n = 6
    labels = np.array([0, 1, 0, 4, 5, 4])
    s = rng.uniform(-1, 1, size=(2 * n, 2 * n))
    for t in (0.07, 0.5):
        got = ocm.contrast_new(jnp.asarray(s, jnp.float32), jnp.asarray(labels), t)
        np.testing.assert_allclose(float(got), code_nt_xent_n(s, labels, t), rtol=1e-5)
    both = np.tile(labels, 2)
    valid = np.array([True] * 4 + [False, True] * 4)
    got = ocm.contrast_all(jnp.asarray(s, jnp.float32), jnp.asarray(both), jnp.asarray(both),
                           jnp.asarray(valid), 0.07)
    keep = np.flatnonzero(valid)
    np.testing.assert_allclose(float(got), code_nt_xent_uni(s[np.ix_(keep, keep)], both[keep],
                                                            0.07), rtol=1e-5)


def test_adam_with_coupled_weight_decay_is_pytorchs_first_step():
    cfg = ocm.Config(weight_decay=0.1, adam_b2=0.99)
    p, g = jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 0.25])
    tx = ocm.optimizer(cfg, 0.01)
    updates, _ = tx.update(g, tx.init(p), p)
    g2 = np.asarray(g) + 0.1 * np.asarray(p)  # torch: grad += weight_decay * p
    m, v = 0.1 * g2 / (1 - 0.9), 0.01 * g2**2 / (1 - 0.99)
    np.testing.assert_allclose(np.asarray(optax.apply_updates(p, updates)),
                               np.asarray(p) - 0.01 * m / (np.sqrt(v) + 1e-8), rtol=1e-5)


def reference_loss(model, cfg, state, batch, hp, key):
    """OCM's loss of one step recomputed from the module's pieces (with crops replaced by
    ``255 - x``): which rows go into which loss."""
    k_write, k_read, _, _, _, k_off1, k_off2 = jax.random.split(key, 7)
    state = er.flush(state, k_write, batch.fresh)
    later = state.tasks_done + batch.boundary > 0
    previous = state.net.params if bool(batch.boundary) else state.previous
    seen = np.asarray(state.seen) | np.isin(np.arange(C), np.asarray(batch.y))
    n_read = min(cfg.replay_max, cfg.replay_per_class * int(seen.sum()))
    idx, mask = reservoir.subset_indices(
        k_read, jnp.arange(cfg.buffer_size) < reservoir.size(state.buffer), cfg.replay_max)
    mask = np.asarray(mask) & (np.arange(cfg.replay_max) < n_read)
    keep = np.asarray(idx)[mask]
    mem_x, mem_y = state.buffer.data["x"][keep], state.buffer.data["y"][keep]
    F, P = model.feature_dim, cfg.proj_dim
    off1 = int(jax.random.randint(k_off1, (), 0, F - P))  # the code: randperm(F - P)[0]
    off2 = int(jax.random.randint(k_off2, (), 0, F - P))

    def proj(params, x):
        logits, h, _ = model.apply(params["net"], {}, x, True)
        z = h @ params["head"]["w"] + params["head"]["b"]
        unit = lambda a: a / jnp.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        return logits, unit(h), unit(z)

    params = state.net.params
    k = ocm.TRANSFORMS[cfg.transforms]
    copies = ocm.transform(batch.x, cfg.transforms)
    _, h, z = proj(params, jnp.concatenate([copies, 255 - copies]))
    labels = ocm.copy_labels(batch.y, k, C)
    loss = float(ocm.contrast_new(ocm.similarity(z, h, off1), labels, hp.temperature))
    if not later:
        logits, _, _ = proj(params, 255 - batch.x)
        return loss + float(cross_entropy(logits, batch.y)), mask
    mem_copies = ocm.transform(mem_x, cfg.transforms)
    mem_labels = np.asarray(ocm.copy_labels(mem_y, k, C))
    _, hm, zm = proj(params, jnp.concatenate([mem_copies, 255 - mem_copies]))
    both = np.tile(mem_labels, 2)
    loss += code_nt_xent_uni(ocm.similarity(zm, hm, off2), both, hp.temperature)
    _, _, z_prev = proj(previous, mem_copies)
    loss += code_nt_xent_uni(zm[:len(mem_labels)] @ z_prev.T, mem_labels, hp.temperature)
    logits, _, _ = proj(params, 255 - mem_x)
    return loss + float(cross_entropy(logits, mem_y)), mask


def test_step_losses_take_the_rows_the_code_gives_them_across_a_boundary(monkeypatch):
    """Task 0: cross-entropy on the incoming rows plus L_new; from the boundary on, the memory
    terms join (L_buf, L_pre against the snapshot taken at the boundary) and the
    cross-entropy moves to the memory rows; the snapshot is not trained."""
    monkeypatch.setattr(ocm.aug, "augment", lambda key, x, spec: 255 - x)
    model = tiny_model()
    cfg = ocm.Config(buffer_size=16, replay_max=6, replay_per_class=2, proj_dim=8,
                     weight_decay=0.0, transforms="rotations")  # the copies: tested above
    hp = ocm.HParams()
    learner = ocm.make(model, cfg)
    bs = batches(n=6)
    two_classes = np.arange(6)[:, None] < 4  # classes 0 and 1 only until step 3
    bs = bs._replace(boundary=jnp.asarray(np.arange(6) == 3),  # task 1 from step 3
                     y=jnp.where(two_classes, bs.y % 2, bs.y))
    update = jax.jit(learner.update)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    reads = []
    for i in range(6):
        batch, key = step_of(bs, i), jax.random.PRNGKey(10 + i)
        want, mask = reference_loss(model, cfg, state, batch, hp, key)
        reads.append(int(mask.sum()))
        new, metrics = update(state, batch, hp, key)
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4)
        assert int(new.tasks_done) == (i >= 3)
        snapshot = state.net.params if i == 3 else state.previous
        for a, b in zip(jax.tree.leaves(new.previous), jax.tree.leaves(snapshot), strict=True):
            np.testing.assert_array_equal(a, b)
        state = new
    assert reads[3] == 4 and reads[5] == 6  # 2 per class seen, at most 6


def test_window_offset_covers_the_codes_range():
    offsets = jax.vmap(lambda k: ocm.window_offset(k, 12, 8))(
        jax.random.split(jax.random.PRNGKey(0), 400))
    assert set(np.asarray(offsets).tolist()) == {0, 1, 2, 3}  # randperm(12 - 8)[0]
    assert int(ocm.window_offset(jax.random.PRNGKey(1), 8, 8)) == 0


def test_gradients_stay_finite_at_a_low_temperature_with_an_empty_memory():
    """The first task computes the memory terms on rows that do not exist (masked, then
    dropped): at a temperature of 0.01 their exponentials overflow unless they are never
    taken."""
    s = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, size=(6, 6)), jnp.float32)
    labels = jnp.asarray([0, 1, 0, 1, 2, 2])
    for valid in (np.zeros(6, bool), np.array([True, True, False, True, False, False])):
        mask = jnp.asarray(valid)
        g = jax.grad(lambda a, m=mask: ocm.contrast_all(a, labels, labels, m, 0.01))(s)
        assert np.isfinite(np.asarray(g)).all()
    model = tiny_model()
    learner = ocm.make(model, ocm.Config(buffer_size=16, replay_max=6, proj_dim=8,
                                         transforms="rotations"))
    hp = ocm.HParams(temperature=0.01)
    bs = batches()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(2):
        state, metrics = jax.jit(learner.update)(state, step_of(bs, i), hp,
                                                 jax.random.PRNGKey(i))
    assert np.isfinite(float(metrics["loss"]))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.net))
    # predictions are the network's own classifier; the online logits its pre-update ones
    logits = learner.predict(state, bs.x[0], hp)
    want = model.apply(state.net.params["net"], state.net.model_state, bs.x[0], False)[0]
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
    assert np.asarray(state.seen).sum() >= 2


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="proj_dim"):
        ocm.make(tiny_model(), ocm.Config(proj_dim=32))  # wider than the 16 features
    with pytest.raises(ConfigError, match="transforms"):
        ocm.make(tiny_model(), ocm.Config(transforms="flips", proj_dim=8))
    with pytest.raises(ConfigError, match="replay_max"):
        ocm.make(tiny_model(), ocm.Config(buffer_size=8, proj_dim=8))
    learner = ocm.make(tiny_model(), ocm.Config(proj_dim=8))
    with pytest.raises(ConfigError, match="square"):
        learner.init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 6, 1), jnp.uint8), ocm.HParams())
    assert ocm.requires_boundaries(ocm.Config())
