"""Behaviour that makes OnPro that method: the online prototype equilibrium (a contrast between
the batch's class prototypes in two views, through which gradients flow), adaptive prototypical
feedback (memory rows of the classes whose prototypes are closest mixed more often, the rest
mixed among themselves as kornia's mixup does), OCM's copy contrast on incoming and memory rows,
and the cross-entropy moving to the fed-back memory after the first task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_learner_contract import batches, step_of

from ocljax import models
from ocljax.errors import ConfigError
from ocljax.learners import er, ocm, onpro
from ocljax.losses import cross_entropy
from ocljax.memory import reservoir
from ocljax.models.adapter import to_float

C = 4


def tiny_model():
    return models.make_model("mlp", C, width=16, depth=1)


def unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def ope_reference(z1, z2, labels, temperature):
    """The code's ``OPELoss``: per-class means of each view, normalised; NT-Xent over the 2K
    prototypes, each one's positive its class in the other view."""
    classes = np.unique(labels)
    p1 = unit(np.stack([z1[labels == c].mean(0) for c in classes]))
    p2 = unit(np.stack([z2[labels == c].mean(0) for c in classes]))
    protos = np.concatenate([p1, p2])
    k = len(classes)
    logits = protos @ protos.T / temperature
    losses = []
    for i in range(2 * k):
        others = [j for j in range(2 * k) if j != i]
        pos = (i + k) % (2 * k)
        losses.append(np.log(np.exp(logits[i, others]).sum()) - logits[i, pos])
    return np.mean(losses)


def test_prototype_equilibrium_is_the_codes_loss_and_trains_the_projections():
    rng = np.random.default_rng(0)
    z1, z2 = unit(rng.normal(size=(9, 5))), unit(rng.normal(size=(9, 5)))
    labels = np.array([0, 2, 2, 3, 0, 3, 3, 2, 1])
    valid = np.array([True] * 8 + [False])  # class 1 only in a masked row
    args = (jnp.asarray(labels), jnp.asarray(valid), C, 0.5)
    loss, means, present = onpro.ope_loss(jnp.asarray(z1, jnp.float32),
                                          jnp.asarray(z2, jnp.float32), *args)
    np.testing.assert_allclose(float(loss), ope_reference(z1[:8], z2[:8], labels[:8], 0.5),
                               rtol=1e-5)
    np.testing.assert_array_equal(present, [True, False, True, True])
    np.testing.assert_allclose(np.asarray(means)[2], (z1[[1, 2, 7]].mean(0)
                                                      + z2[[1, 2, 7]].mean(0)) / 2, rtol=1e-5)
    g = jax.grad(lambda a: onpro.ope_loss(a, jnp.asarray(z2, jnp.float32), *args)[0])(
        jnp.asarray(z1, jnp.float32))
    assert np.abs(np.asarray(g)[:8]).sum() > 1e-3 and np.all(np.asarray(g)[8] == 0.0)
    one = onpro.ope_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                         jnp.zeros(9, jnp.int32), jnp.ones(9, bool), C, 0.5)[0]
    assert float(one) == pytest.approx(0.0, abs=1e-6)  # one class: nothing to balance


def test_base_mixup_pairs_used_rows_among_themselves():
    x = jnp.arange(8, dtype=jnp.float32).reshape(8, 1, 1, 1) * 10.0
    y = jnp.arange(8, dtype=jnp.int32)
    use = jnp.asarray([True, True, True, True, True, False, False, False])

    def draw(key):
        return onpro.base_mixup(key, x, y, use, 1.0, 0.6)

    xs, partners, lam = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.PRNGKey(0), 300))
    partners, lam = np.asarray(partners), np.asarray(lam)
    assert np.all(lam[:, 5:] == 0.0) and np.all((lam[:, :5] >= 0) & (lam[:, :5] < 0.6))
    for row in partners[:, :5]:
        assert sorted(row.tolist()) == [0, 1, 2, 3, 4]  # a permutation of the used rows
    want = (1 - lam[:, :, None, None, None]) * np.asarray(x)[None] + \
        lam[:, :, None, None, None] * np.asarray(x)[partners]
    np.testing.assert_allclose(np.asarray(xs), want, rtol=1e-6)
    # p = 0.6: the group is left alone 40% of the time, each row of a mixed group 40%
    _, _, lam = jax.jit(jax.vmap(lambda k: onpro.base_mixup(k, x, y, use, 0.6, 0.6)))(
        jax.random.split(jax.random.PRNGKey(1), 2000))
    untouched = (np.asarray(lam)[:, :5] == 0).all(1).mean()
    assert 0.4 < untouched < 0.47  # 0.4 + 0.6 * 0.4^5


def test_pair_counts_favour_the_closest_classes_and_sum_to_n():
    means = jnp.asarray([[0.0, 0.0], [0.1, 0.0], [3.0, 0.0], [0.0, 9.0]])
    valid = jnp.asarray([True, True, True, False])
    for n in (0, 1, 7, 16):
        a, b, counts = jax.jit(onpro.pair_counts)(jax.random.PRNGKey(n), means, valid, n)
        counts = np.asarray(counts)
        assert counts.sum() == n
        assert np.all(counts[(np.asarray(a) == 3) | (np.asarray(b) == 3)] == 0)
    inv = 1 / np.array([0.1, 3.0, 2.9])  # pairs (0,1), (0,2), (1,2)
    p = np.exp(inv - inv.max()) / np.exp(inv - inv.max()).sum()
    a, b, counts = onpro.pair_counts(jax.random.PRNGKey(3), means, valid, 16)
    got = {(int(i), int(j)): int(c) for i, j, c in zip(a, b, counts, strict=True)}
    assert got[(0, 1)] == 16 and abs(16 * p[0] - 16) < 1
    equal = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(0.75)]])  # equidistant
    for n, key in ((7, 5), (8, 6)):  # round(7/3) * 3 = 6 and round(8/3) * 3 = 9: fixed to n
        _, _, counts = onpro.pair_counts(jax.random.PRNGKey(key), equal, jnp.ones(3, bool), n)
        assert int(counts.sum()) == n and set(np.asarray(counts).tolist()) <= {2, 3}
    _, _, none = onpro.pair_counts(jax.random.PRNGKey(4), means, jnp.asarray(
        [True, False, False, False]), 5)
    assert int(np.asarray(none).sum()) == 0  # no pair of known classes: no guided rows


def test_guided_feedback_mixes_memory_rows_of_the_paired_classes():
    model_x = np.zeros((12, 2, 2, 1), np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], np.int32)
    model_x[..., 0] = (labels * 100)[:, None, None]
    example = {"x": jnp.zeros((2, 2, 2, 1), jnp.uint8), "y": jnp.zeros((2,), jnp.int32)}
    buffer = reservoir.add(reservoir.init(12, example),
                           {"x": jnp.asarray(model_x), "y": jnp.asarray(labels)},
                           jax.random.PRNGKey(0))
    cfg = onpro.Config(buffer_size=12, replay_max=8, mixup_p=1.0, mixup_base_rate=0.5)
    means = jnp.asarray([[0.0, 0.0], [5.0, 0.0], [0.0, 0.05]])  # classes 0 and 2 closest
    x = jnp.full((8, 2, 2, 1), 0.5, jnp.float32).at[:4].set(
        jnp.asarray([0.1, 0.2, 0.3, 0.4])[:, None, None, None])
    y = jnp.asarray([0, 1, 2, 0, 1, 1, 1, 1], jnp.int32)
    read = jnp.arange(8) < 8
    feedback = jax.jit(onpro.feedback_rows, static_argnums=1)
    out, y_a, y_b, lam = feedback(jax.random.PRNGKey(1), cfg, buffer, x, y, read, 8, means,
                                  jnp.ones(3, bool))
    out, y_a, y_b, lam = map(np.asarray, (out, y_a, y_b, lam))
    guided = slice(4, 8)
    assert set(zip(y_a[guided], y_b[guided], strict=True)) == {(0, 2)}
    want = ((1 - lam[guided]) * y_a[guided] * 100 + lam[guided] * y_b[guided] * 100) / 255
    np.testing.assert_allclose(out[guided, 0, 0, 0], want, rtol=1e-5)
    np.testing.assert_array_equal(y_a[:4], [0, 1, 2, 0])  # base rows keep their own label
    base_x = np.asarray(x)[:4, 0, 0, 0]
    assert set(y_b[:4].tolist()) <= {0, 1, 2}  # partners among the base rows
    for i in range(4):  # (1 - lam) x_i + lam x_partner, the partner one of the base rows
        options = [(1 - lam[i]) * base_x[i] + lam[i] * base_x[j] for j in range(4)
                   if int(np.asarray(y)[j]) == int(y_b[i])]
        assert min(abs(out[i, 0, 0, 0] - o) for o in options) < 1e-5


def reference_loss(model, cfg, state, batch, hp, key, feedback=False):
    """OnPro's loss of one step from the module's pieces, with crops replaced by ``1 - x``;
    with ``feedback`` the memory rows of later tasks but their first batch go through
    ``feedback_rows`` (with the step's key), else they are the rows read."""
    keys = jax.random.split(key, 8)
    state = er.flush(state, keys[0], batch.fresh)
    later = int(state.tasks_done + batch.boundary) > 0
    seen = np.asarray(state.seen) | np.isin(np.arange(C), np.asarray(batch.y))
    R = cfg.replay_max
    n_read = min(R, cfg.replay_per_class * int(seen.sum())) if later else R
    idx, stored = reservoir.subset_indices(
        keys[1], jnp.arange(cfg.buffer_size) < reservoir.size(state.buffer), R)
    keep = np.asarray(idx)[np.asarray(stored) & (np.arange(R) < n_read)]
    mem_x = to_float(state.buffer.data["x"][keep])
    mem_y = state.buffer.data["y"][keep]
    F, P = model.feature_dim, cfg.proj_dim
    k_off1, k_off2 = jax.random.split(keys[7])
    off1, off2 = ocm.window_offset(k_off1, F, P), ocm.window_offset(k_off2, F, P)
    params = state.net.params

    def proj(x):
        logits, h, _ = model.apply(params["net"], {}, x, True)
        z = h @ params["head"]["w"] + params["head"]["b"]
        return logits, unit(h), unit(z)

    x_in = to_float(batch.x)
    k = ocm.TRANSFORMS[cfg.transforms]
    copies = ocm.transform(x_in, cfg.transforms)
    _, h, z = proj(jnp.concatenate([copies, 1 - copies]))
    weight = cfg.sim_lambda if later else 1.0
    labels = ocm.copy_labels(batch.y.astype(jnp.float32), k, C)
    loss = float(ocm.contrast_new(ocm.similarity(z, h, off1, weight), labels, hp.temperature))
    half = len(z) // 2
    loss += float(onpro.ope_loss(z[:4], z[half:half + 4], batch.y, jnp.ones(4, bool), C,
                                 hp.proto_temperature)[0])
    if len(keep):
        _, _, zp = proj(jnp.concatenate([mem_x, 1 - mem_x]))
        loss += float(onpro.ope_loss(zp[:len(keep)], zp[len(keep):], mem_y,
                                     jnp.ones(len(keep), bool), C, hp.proto_temperature)[0])
    if not later:
        return loss + float(cross_entropy(proj(1 - x_in)[0], batch.y))
    y_a = y_b = mem_y
    lam = jnp.zeros(len(keep))
    if feedback and not bool(batch.boundary):
        read = jnp.asarray(np.asarray(stored) & (np.arange(R) < n_read))
        full = er.with_filler({"x": to_float(state.buffer.data["x"][idx]),
                               "y": state.buffer.data["y"][idx]}, stored,
                              {"x": x_in, "y": batch.y})
        fed = onpro.feedback_rows(keys[2], cfg, state.buffer, full["x"], full["y"], read,
                                  n_read, state.class_means, state.class_means_valid)
        at = np.flatnonzero(np.asarray(read))
        mem_x, y_a, y_b, lam = (a[at] for a in fed)
        assert float(jnp.abs(lam).sum()) > 0  # something was mixed
    blend = (1 - lam) * y_a + lam * y_b
    mem_copies = ocm.transform(mem_x, cfg.transforms)
    _, hm, zm = proj(jnp.concatenate([mem_copies, 1 - mem_copies]))
    both = jnp.tile(ocm.copy_labels(blend, k, C), 2)
    loss += float(ocm.contrast_all(ocm.similarity(zm, hm, off2, weight), both, both,
                                   jnp.ones(len(both), bool), hp.temperature))
    logits = proj(1 - mem_x)[0]
    ce = (1 - lam) * optax.softmax_cross_entropy_with_integer_labels(logits, y_a) + \
        lam * optax.softmax_cross_entropy_with_integer_labels(logits, y_b)
    return loss + float(ce.mean())


def test_feedback_rows_enter_the_memory_losses_with_blended_labels(monkeypatch):
    """Every step's loss recomputed from the module's pieces. First task: cross-entropy on
    the incoming rows, the copy contrast at weight 1, the prototype equilibrium on the
    incoming rows and on up to ``replay_max`` rows read for it. Later: the memory contrast and
    cross-entropy join, on the rows as read at the task's first batch (the boundary), then on
    the fed-back rows (feedback on for every group and pair), the contrast with the blended
    labels and the cross-entropy weighted by the mixing weight; reads grow with the classes
    seen."""
    monkeypatch.setattr(onpro.aug, "augment", lambda key, x, spec: 1 - x)
    model = tiny_model()
    cfg = onpro.Config(buffer_size=16, replay_max=6, replay_per_class=2, proj_dim=8,
                       weight_decay=0.0, transforms="rotations", mixup_p=1.0)
    hp = onpro.HParams()
    learner = onpro.make(model, cfg)
    bs = batches(n=6)
    bs = bs._replace(boundary=jnp.asarray(np.arange(6) == 3),  # task 1 from step 3
                     y=jnp.where(np.arange(6)[:, None] < 3, bs.y % 2, bs.y))
    update = jax.jit(learner.update)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    for i in range(6):
        batch, key = step_of(bs, i), jax.random.PRNGKey(20 + i)
        want = reference_loss(model, cfg, state, batch, hp, key, feedback=True)
        state, metrics = update(state, batch, hp, key)
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4)
        assert int(state.tasks_done) == (i >= 3)
    assert int(state.class_means_valid.sum()) >= 2  # the last read's classes


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="mixup_p"):
        onpro.make(tiny_model(), onpro.Config(mixup_p=1.5, proj_dim=8))
    with pytest.raises(ConfigError, match="sim_lambda"):
        onpro.make(tiny_model(), onpro.Config(sim_lambda=0.0, proj_dim=8))
    with pytest.raises(ConfigError, match="proj_dim"):
        onpro.make(tiny_model(), onpro.Config())
    with pytest.raises(ConfigError, match="augmentation"):
        onpro.make(tiny_model(), onpro.Config(augment="blur", proj_dim=8))
    assert onpro.crop_spec(onpro.Config(), 1) == "rrc30"
    assert onpro.crop_spec(onpro.Config(), 3) == "flip,gray25,rrc30"
    assert onpro.crop_spec(onpro.Config(augment="flip,rrc50"), 1) == "flip,rrc50"


def test_on_a_permuted_stream_the_crop_is_dropped_and_a_note_warns():
    from ocljax import learners, streams

    for name, module in (("ocm", ocm), ("onpro", onpro)):
        cfg, note = learners.fit_augment_to_stream(name, module.Config(), "permuted", False)
        assert not onpro.aug.moves_pixels(cfg.augment) and "permuted" in note
        stream = streams.StreamConfig(kind="permuted")
        assert "permuted" in module.stream_note(cfg, stream)
        assert module.stream_note(cfg, streams.StreamConfig(kind="split")) is None
