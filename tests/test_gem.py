"""Behaviour that makes GEM that method: the step's gradient is projected onto the cone of
directions that do not increase any completed task's memory loss (Lopez-Paz & Ranzato 2017,
Eq. 6-13), through the dual QP; memories are the last rows of each task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from test_learner_contract import batches, step_of

from ocljax import models
from ocljax.errors import ConfigError
from ocljax.learners import agem, gem
from ocljax.losses import cross_entropy


def dual_objective(v, gg, gv, eps):
    return 0.5 * v @ (gg + eps * np.eye(len(v))) @ v + gv @ v


def random_task_gradients(seed, t, p, collinear=False):
    rng = np.random.default_rng(seed)
    gs = rng.normal(size=(t, p))
    if collinear:  # nearly parallel task gradients: an ill-conditioned G G'
        gs = gs[:1] + 1e-2 * gs
    g = -gs.mean(0) + 0.3 * rng.normal(size=p)  # conflicts with most of them
    return gs.astype(np.float32), g.astype(np.float32)


@pytest.mark.parametrize("seed,t,collinear", [(0, 3, False), (1, 8, False), (2, 6, True),
                                              (3, 12, False)])
def test_dual_solution_matches_a_generic_bounded_solver(seed, t, collinear):
    gs, g = random_task_gradients(seed, t, 40, collinear)
    gg, gv = (gs @ gs.T).astype(np.float64), (gs @ g).astype(np.float64)
    active = np.ones(t, bool)
    active[-1] = False  # a task not completed yet takes no part
    v = np.asarray(gem.solve_dual(jnp.asarray(gg, jnp.float32), jnp.asarray(gv, jnp.float32),
                                  jnp.asarray(active), 0.5, 1e-3, 20), np.float64)
    assert v[-1] == 0.0 and np.all(v[:-1] >= 0.5)
    a = active
    ref = scipy.optimize.minimize(
        dual_objective, np.full(a.sum(), 0.5), args=(gg[np.ix_(a, a)], gv[a], 1e-3),
        jac=lambda v_, gg_, gv_, e: (gg_ + e * np.eye(len(v_))) @ v_ + gv_,
        bounds=[(0.5, None)] * a.sum(), method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12,
                                                                   "maxiter": 10000})
    ours = dual_objective(v[a], gg[np.ix_(a, a)], gv[a], 1e-3)
    assert ours <= ref.fun + 1e-4 * max(1.0, abs(ref.fun))


@pytest.mark.parametrize("seed,collinear", [(4, False), (5, True), (6, False)])
def test_projected_gradient_does_not_increase_any_completed_tasks_loss(seed, collinear):
    """``g_k . g~ >= 0`` for every active task k, up to the ridge's ``eps v_k`` (module
    docstring); the inactive task's gradient is ignored."""
    gs, g = random_task_gradients(seed, 6, 30, collinear)
    active = jnp.asarray([1, 1, 1, 1, 1, 0], bool)
    assert np.any((gs[:5] @ g) < 0)
    tilde = np.asarray(gem.project({"w": jnp.asarray(gs)}, {"w": jnp.asarray(g)}, active, 0.0,
                                   1e-3, 20)["w"])
    gg, gv = gs @ gs.T, gs @ g
    v = np.asarray(gem.solve_dual(jnp.asarray(gg), jnp.asarray(gv), active, 0.0, 1e-3, 20))
    dots = gs[:5] @ tilde
    scale = np.linalg.norm(gs[:5], axis=1) * np.linalg.norm(g)
    assert np.all(dots >= -1e-3 * v[:5] - 1e-4 * scale)
    # and it is the closest such vector: moving toward g breaks a constraint or gains nothing
    assert np.linalg.norm(tilde - g) <= np.linalg.norm(g) * 10


def exact_dual(gg, gv, gamma, ridge):
    """The dual solved exactly in float64 (what quadprog returns): NNLS on ``w = v - gamma``
    through the Cholesky factor of ``gg + ridge I``."""
    import scipy.linalg

    p = gg + ridge * np.eye(len(gv))
    c = gv + p @ np.full(len(gv), gamma)
    lower = np.linalg.cholesky(p)
    w, _ = scipy.optimize.nnls(lower.T, -scipy.linalg.solve_triangular(lower, c, lower=True),
                               maxiter=100 * len(gv))
    return w + gamma


@pytest.mark.parametrize("t,rank", [(4, 2), (6, 3), (8, 4), (15, 5)])
def test_dual_is_exact_on_nearly_low_rank_gradients(t, rank):
    """Task gradients spanning few directions (an ill-conditioned G G'), where a primal-dual
    active-set method can cycle: the solver must match the exact solution on every draw."""
    rng = np.random.default_rng(t)
    worst = 0.0
    for _ in range(40):
        gs = (rng.normal(size=(t, rank)) @ rng.normal(size=(rank, 200))) * 0.05
        g = -gs.mean(0) + 0.3 * rng.normal(size=200) * np.linalg.norm(gs.mean(0)) / np.sqrt(200)
        gg, gv = gs @ gs.T, gs @ g
        ridge = max(1e-3, 1e-5 * np.diag(gg).max())
        ref = exact_dual(gg, gv, 0.5, ridge)
        v = np.asarray(gem.solve_dual(jnp.asarray(gg, jnp.float32), jnp.asarray(gv, jnp.float32),
                                      jnp.ones(t, bool), 0.5, 1e-3, 3 * t), np.float64)
        gap = dual_objective(v, gg, gv, ridge) - dual_objective(ref, gg, gv, ridge)
        worst = max(worst, gap / max(1.0, abs(dual_objective(ref, gg, gv, ridge))))
        assert np.all(gs @ (g + v @ gs) >= -ridge * v - 1e-3 * np.linalg.norm(g) *
                      np.linalg.norm(gs, axis=1))
    assert worst < 1e-4


def test_large_duplicate_gradients_do_not_give_nan():
    """Identical task gradients of norm 300: the code's ridge of 1e-3 is below float32's
    resolution of G G' there; the floored ridge keeps the solve finite."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=1000)
    a /= np.linalg.norm(a)
    gs = np.repeat(a[None] * 300, 3, 0).astype(np.float32)
    g = (-a * 300 + rng.normal(size=1000)).astype(np.float32)
    out = np.asarray(gem.project({"w": jnp.asarray(gs)}, {"w": jnp.asarray(g)},
                                 jnp.ones(3, bool), 0.5, 1e-3, 9)["w"])
    assert np.all(np.isfinite(out)) and float(gs[0] @ out) >= -1e-2 * 300 * np.linalg.norm(g)


def test_no_conflict_leaves_the_gradient_unchanged():
    gs, g = random_task_gradients(7, 4, 20)
    g = gs.sum(0)  # positive inner product with every task gradient here
    assert np.all(gs @ g > 0)
    out = gem.project({"w": jnp.asarray(gs)}, {"w": jnp.asarray(g)}, jnp.ones(4, bool), 0.5,
                      1e-3, 20)["w"]
    np.testing.assert_array_equal(np.asarray(out), g)


def test_one_task_without_margin_is_the_a_gem_rule():
    """With a single memory gradient and gamma = 0, GEM's projection is A-GEM's Eq. 11 (up to
    the ridge, at least 1e-5 |g_k|^2)."""
    gs, g = random_task_gradients(8, 1, 25)
    assert float(gs[0] @ g) < 0
    ours = gem.project({"w": jnp.asarray(gs)}, {"w": jnp.asarray(g)}, jnp.ones(1, bool), 0.0,
                       1e-8, 5)["w"]
    theirs = agem.project({"w": jnp.asarray(g)}, {"w": jnp.asarray(gs[0])})["w"]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-4)


def test_the_margin_pushes_toward_positive_backward_transfer():
    gs, g = random_task_gradients(9, 3, 25)
    tight = gem.project({"w": jnp.asarray(gs)}, {"w": jnp.asarray(g)}, jnp.ones(3, bool), 0.0,
                        1e-3, 20)["w"]
    margin = gem.project({"w": jnp.asarray(gs)}, {"w": jnp.asarray(g)}, jnp.ones(3, bool), 0.5,
                         1e-3, 20)["w"]
    assert (gs @ np.asarray(margin)).sum() > (gs @ np.asarray(tight)).sum()


def tiny_gem(**kw):
    model = models.make_model("mlp", 4, width=16, depth=1)
    cfg = gem.Config(**{"patterns_per_task": 5, "max_tasks": 3, **kw})
    return model, cfg, gem.make(model, cfg)


def test_memory_is_written_as_the_authors_observe_does_and_closed_at_the_boundary():
    """Regions of 5 rows, batches of 4, boundaries at steps 0 and 3. As the code's ``observe``:
    a batch fills from ``mem_cnt`` up to the region's end (the rest is dropped), ``mem_cnt``
    wraps to 0 there and is not reset when a task starts; unwritten rows are masked."""
    _, cfg, learner = tiny_gem()
    bs = batches(n=6)
    hp = gem.HParams()
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    states = [state]
    for i in range(5):
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
        states.append(state)
    rows = np.asarray(bs.x[:4]).reshape(16, *bs.x.shape[2:])  # batch rows in stream order
    after3, after4 = states[4], states[5]
    assert int(after3.n_tasks) == 1  # step 3 wrote batch 2, then closed task 0
    # batch 0 -> rows 0-3; batch 1 -> row 4 (3 rows dropped), wrap; batch 2 -> rows 0-3
    expected0 = rows[[8, 9, 10, 11, 4]]
    np.testing.assert_array_equal(np.asarray(after3.buffer.data["x"][:5]), expected0)
    assert bool(after3.filled[:5].all()) and int(after3.mem_cnt) == 4
    # task 1 starts at mem_cnt 4: batch 3 writes region 1's row 4 only, then wraps
    np.testing.assert_array_equal(np.asarray(after4.buffer.data["x"][9]), rows[12])
    np.testing.assert_array_equal(np.asarray(after4.filled[5:10]), [0, 0, 0, 0, 1])
    assert int(after4.mem_cnt) == 0


def test_a_gem_step_does_not_raise_the_completed_tasks_memory_loss_where_sgd_does():
    """The constraint (Eq. 6-7) on a real step: after learning task 0, one small step on task
    1 raises task 0's memory loss under plain SGD, and not to first order under GEM."""
    model, cfg, learner = tiny_gem(memory_strength=0.0, eps=1e-6)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(0, 255, size=(8, 4, 4, 4, 1), dtype=np.uint8))
    y = jnp.asarray(np.r_[np.zeros((4, 4)), np.ones((4, 4))].astype(np.int32))
    bs = batches(n=8)._replace(x=x, y=y, boundary=jnp.asarray([1, 0, 0, 0, 1, 0, 0, 0], bool))
    hp = gem.HParams(lr=0.5)
    state = learner.init(jax.random.PRNGKey(0), bs.x[0], hp)
    update = jax.jit(learner.update)
    for i in range(5):  # task 0, then the first step of task 1 closes it
        state, _ = update(state, step_of(bs, i), hp, jax.random.PRNGKey(i))
    assert int(state.n_tasks) == 1
    mem = jax.tree.map(lambda a: a[:cfg.patterns_per_task], state.buffer.data)

    def memory_loss(params):
        return float(cross_entropy(model.apply(params, {}, mem["x"], False)[0], mem["y"]))

    small = gem.HParams(lr=1e-3)
    after_gem, _ = update(state, step_of(bs, 5), small, jax.random.PRNGKey(9))
    grads = jax.grad(lambda p: cross_entropy(model.apply(p, {}, bs.x[5], True)[0], bs.y[5]))(
        state.net.params)
    after_sgd = jax.tree.map(lambda p, g: p - 1e-3 * g, state.net.params, grads)
    before = memory_loss(state.net.params)
    assert memory_loss(after_sgd) > before + 1e-6
    raised_by_sgd = memory_loss(after_sgd) - before
    assert raised_by_sgd > 1e-3
    # GEM: no first-order increase, up to the ridge's lr * r * v
    assert memory_loss(after_gem.net.params) - before < 0.01 * raised_by_sgd
    g_mem = jax.grad(lambda p: cross_entropy(model.apply(p, {}, mem["x"], False)[0], mem["y"]))(
        state.net.params)
    moved = jax.tree.map(lambda a, b: a - b, after_gem.net.params, state.net.params)
    first_order = sum(float(jnp.vdot(a, b)) for a, b in zip(
        jax.tree.leaves(g_mem), jax.tree.leaves(moved), strict=True))
    assert first_order <= 1e-6  # lr * ridge * v, the ridge at least 1e-5 |g_k|^2


def test_check_config_and_boundaries():
    model = models.make_model("mlp", 4, width=8, depth=1)
    for bad in (dict(patterns_per_task=0), dict(max_tasks=0), dict(memory_strength=-1.0),
                dict(eps=0.0), dict(qp_iters=0), dict(optimizer="lion")):
        with pytest.raises(ConfigError):
            gem.make(model, gem.Config(**bad))
    assert gem.requires_boundaries(gem.Config())


def test_command_line_fits_max_tasks_to_the_stream_unless_set(capsys):
    from ocljax.cli import build_parser, plan

    preset = {"seeds": 1, "seed": 0, "learner": "gem", "dataset": "synthetic",
              "stream": "permuted", "n_tasks": 3, "task_free": False}
    (variant,) = plan(build_parser("t", "", preset).parse_args([]), preset)[1]
    assert variant.learner_config.max_tasks == 2  # the last task's memory is never read
    assert "gem: max_tasks 20 -> 2" in capsys.readouterr().err
    (variant,) = plan(build_parser("t", "", preset).parse_args(["--set", "max_tasks=7"]),
                      preset)[1]
    assert variant.learner_config.max_tasks == 7
