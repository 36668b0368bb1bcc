"""Behaviour that makes RAR that method: replay rows pulled, within an L-inf ball, towards the
representation of their nearest incoming row under the look-ahead model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_learner_contract import B
from test_mir import np_params, np_sgd_step

from ocljax import augment, models
from ocljax.errors import ConfigError
from ocljax.learners import er, rar
from ocljax.types import Batch

MODEL = models.make_model("mlp", 4, width=16, depth=1)
CFG = rar.Config(buffer_size=8, replay_batch=3)
LEARNER = rar.make(MODEL, CFG)
UPDATE = jax.jit(LEARNER.update)
PERTURB = jax.jit(lambda net, s, r, hp: rar.perturb_replay(MODEL, CFG, net, s, r, hp))
PATTERNS = np.random.default_rng(0).integers(0, 256, size=(4, 4, 4, 1))


def batch_of(labels, seed, t=0):
    """Class-structured 4x4 images: a per-class pattern plus noise."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, np.int32)
    x = np.clip(PATTERNS[y] + rng.normal(0, 40, size=(len(y), 4, 4, 1)), 0, 255)
    return Batch(x=jnp.asarray(x.astype(np.uint8)), y=jnp.asarray(y), task=jnp.asarray(0),
                 boundary=jnp.asarray(False), t=jnp.asarray(t), fresh=jnp.asarray(True))


@pytest.fixture(scope="module")
def old_task_state():
    """Trained on classes 2 and 3 for a few steps; the buffer holds only those classes."""
    hp = rar.HParams()
    state = LEARNER.init(jax.random.PRNGKey(0), batch_of([2, 3, 2, 3], 0).x, hp)
    for i in range(6):
        state, _ = UPDATE(state, batch_of([2, 3, 3, 2], 10 + i, i), hp, jax.random.PRNGKey(i))
    return state


NEW = batch_of([0, 1, 1, 0], 99, 6)  # an incoming batch of the new task
STREAM = {"x": NEW.x, "y": NEW.y}


def replay_of(state, rows=(0, 3, 5)):
    idx = np.asarray(rows)
    return {"x": state.buffer.data["x"][idx], "y": state.buffer.data["y"][idx]}


def np_features(p, xf):
    xf = np.asarray(xf, np.float64).reshape(len(xf), -1)
    return np.maximum(xf @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)


def assert_trees_close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw),
                 a, b)


def test_perturbation_stays_in_the_epsilon_ball_and_the_unit_box(old_task_state):
    replay = replay_of(old_task_state)
    x = np.asarray(replay["x"]).copy()
    x[0, 0, :2], x[1, 1, :2] = 0, 255  # pixels at the box edges
    replay["x"] = jnp.asarray(x)
    hp = rar.HParams(epsilon=0.05, step_size=0.03)  # steps overshoot: the projection bites
    x_clean, x_adv, _, attacked = PERTURB(old_task_state.net, STREAM, replay, hp)
    assert bool(attacked.all())  # old classes only
    np.testing.assert_allclose(x_clean, x / 255.0, rtol=1e-6)
    x_clean, x_adv = np.asarray(x_clean), np.asarray(x_adv)
    delta = np.abs(x_adv - x_clean)
    assert delta.max() <= 0.05 + 1e-6
    assert ((x_adv >= 0) & (x_adv <= 1)).all()
    assert np.isclose(delta.max(), 0.05, atol=1e-6)  # the bound is reached
    assert (x_adv[0, 0, :2] >= 0).all() and (x_adv[1, 1, :2] <= 1).all()


def np_attack(p, x0, target, eps, step, n_steps, mu=0.0):
    """The sign-gradient attack by hand, with
    grad_x ||relu(x W + b) - t||^2 = (2 (f - t) * 1[f > 0]) W^T; with ``mu`` > 0, MI-FGSM:
    the step follows the sign of g <- mu g + grad / ||grad||_1 (per row)."""
    x = x0.copy()
    w, b = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
    acc = np.zeros_like(x)
    for _ in range(n_steps):
        pre = x.reshape(len(x), -1) @ w + b
        g = ((2 * (np.maximum(pre, 0) - target) * (pre > 0)) @ w.T).reshape(x.shape)
        l1 = np.abs(g).reshape(len(g), -1).sum(1).reshape(-1, *([1] * (g.ndim - 1)))
        acc = mu * acc + g / np.maximum(l1, 1e-12)
        x = np.clip(np.clip(x - step * np.sign(acc), x0 - eps, x0 + eps), 0, 1)
    return x


def test_attack_pulls_replay_rows_towards_their_nearest_incoming_row(old_task_state):
    hp = rar.HParams(lr=1.0)  # a large look-ahead step, so that theta_v differs from theta
    replay = replay_of(old_task_state)
    x_clean, x_adv, nearest, attacked = PERTURB(old_task_state.net, STREAM, replay, hp)
    # reference: hand-made look-ahead step, nearest neighbour in its hidden features
    p = np_params(old_task_state.net.params)
    look = np_sgd_step(p, np.asarray(NEW.x), np.asarray(NEW.y), hp.lr)
    fs = np_features(look, np.asarray(NEW.x) / 255.0)
    fr = np_features(look, x_clean)
    d_clean = ((fr[:, None] - fs[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nearest, d_clean.argmin(1))
    target = fs[d_clean.argmin(1)]
    assert bool(attacked.all())
    expected = np_attack(look, np.asarray(x_clean, np.float64), target, hp.epsilon,
                         hp.step_size, CFG.attack_steps)
    np.testing.assert_allclose(x_adv, expected, atol=1e-5)
    # the attacked objective: squared feature distance to the target drops for every row
    before = ((fr - target) ** 2).sum(-1)
    after = ((np_features(look, x_adv) - target) ** 2).sum(-1)
    assert (after < 0.9 * before).all(), (before, after)


def test_momentum_attack_is_mi_fgsm(old_task_state):
    """With momentum the attack follows the accumulated L1-normalised gradient (the authors'
    ``--d_momentum``), which takes a different path than the plain sign gradient."""
    replay = replay_of(old_task_state)
    plain = PERTURB(old_task_state.net, STREAM, replay, rar.HParams(lr=1.0, epsilon=0.3,
                                                                     step_size=0.02))
    hp = rar.HParams(lr=1.0, epsilon=0.3, step_size=0.02, momentum=1.0)
    x_clean, x_adv, nearest, _ = PERTURB(old_task_state.net, STREAM, replay, hp)
    p = np_params(old_task_state.net.params)
    look = np_sgd_step(p, np.asarray(NEW.x), np.asarray(NEW.y), hp.lr)
    target = np_features(look, np.asarray(NEW.x) / 255.0)[np.asarray(nearest)]
    x0 = np.asarray(x_clean, np.float64)
    expected = np_attack(look, x0, target, hp.epsilon, hp.step_size, CFG.attack_steps, mu=1.0)
    np.testing.assert_allclose(x_adv, expected, atol=1e-5)
    assert not np.allclose(x_adv, plain[1])  # momentum changes the path
    np.testing.assert_allclose(  # momentum 0 is the plain attack
        plain[1], np_attack(look, x0, target, 0.3, 0.02, CFG.attack_steps), atol=1e-5)


def test_rows_of_classes_in_the_incoming_batch_stay_clean(old_task_state):
    replay = replay_of(old_task_state)
    replay["y"] = jnp.asarray([0, 2, 1])  # rows 0 and 2 share a label with the stream
    x_clean, x_adv, _, attacked = PERTURB(old_task_state.net, STREAM, replay, rar.HParams())
    assert list(np.asarray(attacked)) == [False, True, False]
    np.testing.assert_array_equal(x_adv[0], x_clean[0])
    np.testing.assert_array_equal(x_adv[2], x_clean[2])
    assert not np.array_equal(x_adv[1], x_clean[1])


@pytest.mark.parametrize("adv_weight", [1.0, 0.3])
def test_epsilon_zero_is_experience_replay(old_task_state, adv_weight):
    er_learner = er.make(MODEL, er.Config(buffer_size=8, replay_batch=3))
    key = jax.random.PRNGKey(42)
    e, em = jax.jit(er_learner.update)(old_task_state, NEW, er.HParams(), key)
    r, rm = UPDATE(old_task_state, NEW, rar.HParams(epsilon=0.0, adv_weight=adv_weight), key)
    assert_trees_close(r.net.params, e.net.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rm["loss"], em["loss"], rtol=1e-5)
    np.testing.assert_allclose(rm["stream_logits"], em["stream_logits"], rtol=1e-5, atol=1e-6)
    assert_trees_close(r.buffer, e.buffer, rtol=0, atol=0)
    # with a perturbation budget the update differs from ER
    a, _ = UPDATE(old_task_state, NEW, rar.HParams(adv_weight=adv_weight), key)
    assert not np.allclose(a.net.params["Dense_0"]["kernel"], e.net.params["Dense_0"]["kernel"])


def weighted_step(net, stream_x, y_stream, clean, adv, y_rep, mask, adv_weight, lr):
    """Reference update: clean stream rows, clean and perturbed replay rows, one SGD step."""

    def loss(params):
        def ce(x, y):
            return optax.softmax_cross_entropy_with_integer_labels(
                MODEL.apply(params, {}, x, True)[0], y)

        m = mask.astype(jnp.float32)
        total = (ce(stream_x, y_stream).sum() + ((1 - adv_weight) * ce(clean, y_rep) * m).sum()
                 + (adv_weight * ce(adv, y_rep) * m).sum())
        return total / (len(y_stream) + m.sum())

    value, grads = jax.value_and_grad(loss)(net.params)
    return jax.tree.map(lambda p, g: p - lr * g, net.params, grads), value


def test_update_trains_on_clean_stream_and_perturbed_replay(old_task_state):
    hp = rar.HParams(epsilon=0.2, step_size=0.05, adv_weight=0.5)
    key = jax.random.PRNGKey(7)
    new, metrics = UPDATE(old_task_state, NEW, hp, key)
    # the rows the update replays: ER's write-then-read with the same keys
    k_write, k_read = jax.random.split(key)
    flushed = jax.jit(er.flush)(old_task_state, k_write)
    replay, mask = jax.jit(er.replay_rows, static_argnums=2)(flushed.buffer, k_read, 3, STREAM)
    x_clean, x_adv, _, attacked = PERTURB(flushed.net, STREAM, replay, hp)
    assert bool(mask.all()) and bool(attacked.any())
    assert not np.allclose(x_adv, x_clean)
    params, loss = jax.jit(weighted_step)(old_task_state.net, NEW.x, NEW.y, x_clean, x_adv,
                                          replay["y"], mask, hp.adv_weight, hp.lr)
    assert_trees_close(new.net.params, params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    # the incoming rows enter unperturbed: their logits are those of the clean uint8 batch
    clean_logits = MODEL.apply(old_task_state.net.params, {}, NEW.x, True)[0]
    np.testing.assert_allclose(metrics["stream_logits"], clean_logits, rtol=1e-5, atol=1e-6)
    assert metrics["stream_logits"].shape == (B, 4)


def test_sum_replay_loss_adds_the_stream_mean_and_the_replay_views_means(old_task_state):
    """``replay_loss="sum"``: mean CE(stream) + (1 - a) mean CE(clean) + a mean CE(perturbed),
    the authors' ``retrieve_er_rar`` loss."""
    cfg = rar.Config(buffer_size=8, replay_batch=3, replay_loss="sum")
    learner = rar.make(MODEL, cfg)
    hp, key = rar.HParams(epsilon=0.2, step_size=0.05, adv_weight=0.3), jax.random.PRNGKey(7)
    new, metrics = jax.jit(learner.update)(old_task_state, NEW, hp, key)
    k_write, k_read = jax.random.split(key)
    flushed = jax.jit(er.flush)(old_task_state, k_write)
    replay, mask = jax.jit(er.replay_rows, static_argnums=2)(flushed.buffer, k_read, 3, STREAM)
    x_clean, x_adv, _, _ = PERTURB(flushed.net, STREAM, replay, hp)
    assert bool(mask.all())

    def loss(params):
        def ce(x, y):
            return optax.softmax_cross_entropy_with_integer_labels(
                MODEL.apply(params, {}, x, True)[0], y).mean()

        return (ce(NEW.x, NEW.y) + (1 - hp.adv_weight) * ce(x_clean, replay["y"])
                + hp.adv_weight * ce(x_adv, replay["y"]))

    value, grads = jax.value_and_grad(loss)(old_task_state.net.params)
    expected = jax.tree.map(lambda p, g: p - hp.lr * g, old_task_state.net.params, grads)
    assert_trees_close(new.net.params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)


def test_augment_spec_transforms_the_replay_rows(old_task_state):
    cfg = rar.Config(buffer_size=8, replay_batch=3, augment="crop1")
    learner = rar.make(MODEL, cfg)
    hp, key = rar.HParams(epsilon=0.0), jax.random.PRNGKey(3)
    new, _ = jax.jit(learner.update)(old_task_state, NEW, hp, key)
    # the augmentation's key is a third key of the step's split, none of the replay draw's
    # (fold_in(key, 1) was split(key)[1], the draw's own key: crops followed the drawn rows)
    k_write, k_read, k_aug = jax.random.split(key, 3)
    assert not np.array_equal(k_aug, jax.random.split(key)[1])
    flushed = jax.jit(er.flush)(old_task_state, k_write)
    replay, mask = jax.jit(er.replay_rows, static_argnums=2)(flushed.buffer, k_read, 3, STREAM)
    views = augment.augment(k_aug, replay["x"], "crop1")
    assert not np.array_equal(views, replay["x"])
    xf = views.astype(jnp.float32) / 255.0
    params, _ = jax.jit(weighted_step)(old_task_state.net, NEW.x, NEW.y, xf, xf, replay["y"],
                                       mask, 1.0, hp.lr)
    assert_trees_close(new.net.params, params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(augment="bogus"), dict(attack_space="pixels"),
                                dict(attack_steps=-1), dict(replay_loss="mean")])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ConfigError):
        rar.check_config(rar.Config(**kw))
