"""Online Continual learning through Mutual information maximisation (OCM): supervised
contrastive losses over many transformed copies of each image (every copy its own class, so
features must keep what tells the copies apart), a contrast of the current model against the
model of the previous task on the memory, and cross-entropy on the memory.

Guo, Liu & Zhao 2022, "Online Continual Learning through Mutual Information Maximization"
(ICML 2022, PMLR 162), checked against the authors' code (``gydpku/OCM``: ``test_mnist.py``,
the split-MNIST script, with ``InfoNCE/contrastive_learning.py`` for the three contrastive
losses and ``buffer.py`` for the memory). OCM needs the task boundaries: the previous model is
a snapshot taken when a task ends, and the first task trains without the memory terms. Each
step, with ``x`` the incoming batch of B rows and ``m`` up to ``replay_max`` rows read at random
from a reservoir memory:

1. ``transforms(x)``: ``"halves"`` (the MNIST code) makes 16 copies of each image: its left and
   right halves each left alone or turned 180 degrees in place (4 variants), each variant
   rotated by 0, 90, 180, 270 degrees; ``"rotations"`` makes the 4 rotations alone (the paper's
   description). Copy k of an image of class y has the label ``y + C k``. Each copy also gets a
   random resized crop (area 0.3-1, the code's only augmentation on MNIST): the views are
   ``P = [T(x); crop(T(x))]``, 2N rows;
2. features ``h`` (the network's penultimate layer) and projections ``z`` (a Linear F ->
   ``proj_dim`` head), both L2-normalised; the similarity of rows i and j is
   ``S_ij = 0.5 z_i . h_j[o:o+P] + 0.5 z_i . z_j`` with a random offset ``o`` drawn each step
   (one for the incoming rows, one for the memory rows) into the normalised features;
3. ``L_new`` (``contrast_new``) on the incoming views: each row's softmax over the other rows
   (its own similarity removed), ``l_ij = -log(e_ij / (sum_k e_ik + 1e-8) + 1e-8)``; the SimCLR
   term (each copy against its crop, both ways, mean) plus twice the supervised term (mean over
   rows of the mean of ``l_ij`` over the rows j sharing i's label, i itself included as the
   code's constant ``-log 1e-8`` term);
4. from the second task on, also ``L_buf`` (the supervised term on the memory's views, with
   each row's own similarity kept in its softmax) and ``L_pre``: for each of the current
   model's projections of the memory copies (uncropped), a softmax over the previous task's
   model's projections of the same copies, the supervised term with those as candidates;
5. cross-entropy of the network's classifier on a fresh crop of the incoming rows in the first
   task, of the memory rows afterwards (the incoming rows then get no cross-entropy);
6. one Adam step on the network and the head together (the code: Adam, lr 1e-3, betas 0.9 /
   0.99, PyTorch's coupled weight decay 1e-4);
7. the incoming batch is written to the reservoir (at the next step, as ER's pending rows).

The memory read is ``min(replay_max, replay_per_class x classes seen)`` rows (the code: 64 and
7, so 28, 42, 56, 64 rows in split MNIST's tasks 2-5), uniformly without replacement. The
incoming and the memory rows are contrasted in separate matrices, never against each other.
Prediction (``predict``) is the network's own classifier on the clean image.

Deviations from the authors' code:

- One forward pass of the network computes every view (the code uses one for the contrastive
  views and another for the cross-entropy crop); identical without BatchNorm (the MNIST MLP).
  With BatchNorm the batch statistics also cover the rows computed and masked (the memory
  copies in the first task, read slots beyond the read count).
- The memory is ocljax's exact reservoir (the code counts a batch's rows after drawing their
  slots, so rows of one batch can collide).
- The crop is ``ocljax.augment``'s ``rrc30`` (bilinear, window inside the image); the code's
  crop layer samples with reflection padding and pixel-rounded window sizes. On a permuted
  stream the command line drops it (a crop of permuted pixels is no view of the image) and
  warns that the copies themselves move pixels there (``stream_note``).
- The code normalises MNIST with mean 0.1307 / std 0.3081; the library's default inputs are in
  [0, 1] (``--set input_norm=standard`` for the code's).
- Labels of copies are ``y + C k`` (the code: ``y + 100 k``); only their equality matters.
- Crops of uint8 images are rounded back to uint8 (the code crops normalised floats); the
  code's mixed precision (apex O1) is not reproduced.
- The code's MNIST network is an MLP 784-400-400 (``--set width=400``); the library's preset
  uses 256. ``transforms="rotations"`` (the paper's four rotations) is in none of the authors'
  scripts; their CIFAR script also uses the 16 copies, with flip and grayscale added.
- The first task computes the memory terms and masks them (fixed shapes under ``vmap``), so
  it costs as much per step as the later tasks.

Cost: each step runs ``2 x 16 x (B + replay_max)`` rows through the network (2,368 rows for
split MNIST, against ER's 20) plus the previous model's ``16 x replay_max`` rows: about 150
times ER's compute per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ocljax import augment as aug
from ocljax.errors import ConfigError, require_positive, unknown_choice
from ocljax.learners import er
from ocljax.learners.er_ncm import unit_rows
from ocljax.learners.supervised import NetState, classifier_learner, online_logits
from ocljax.losses import cross_entropy
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model

__all__ = ["Config", "HParams", "State", "TASK_FREE_HINT", "check_config", "check_fits",
           "check_optimizer",
           "classifier_learner", "contrast_all", "contrast_new", "contrast_terms", "copy_labels",
           "init_net", "make", "optimizer", "optimizer_step", "projections",
           "requires_boundaries", "similarity", "stream_note", "transform", "window_offset"]

TASK_FREE_HINT = "use scr or pcr (contrastive replay without task boundaries) or er"
TRANSFORMS = {"halves": 16, "rotations": 4}
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_max: int = 64  # most memory rows read per step (the code's cap)
    replay_per_class: int = 7  # memory rows read per class seen (the code's buffer_per_class)
    transforms: str = "halves"  # "halves" (16 copies, the MNIST code) | "rotations" (4)
    augment: str = "rrc30"  # the crop view (ocljax.augment spec): resized crop, area 0.3-1
    proj_dim: int = 128
    optimizer: str = "adam"  # "adam" (the code's, betas 0.9 / adam_b2) | "sgd"
    adam_b2: float = 0.99
    weight_decay: float = 1e-4  # PyTorch's coupled L2: weight_decay * w added to the gradient


class HParams(NamedTuple):
    lr: float = 1e-3
    temperature: float = 0.07


class State(NamedTuple):
    net: NetState  # params = {"net": model params, "head": {"w", "b"}}
    buffer: reservoir.ReservoirState  # data = {"x", "y"}
    pending: dict
    pending_valid: Array  # [B] bool
    previous: dict  # params of the model as the last task ended (the initial ones in task 0)
    tasks_done: Array  # [] int32, task boundaries passed
    seen: Array  # [C] bool, classes that have been in an incoming batch


def requires_boundaries(cfg: Config) -> bool:
    """OCM's previous model and its first-task branch are per task: always True."""
    del cfg
    return True


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes or unknown choices."""
    require_positive(cfg, "buffer_size", "replay_max", "replay_per_class", "proj_dim")
    if cfg.replay_max > cfg.buffer_size:
        raise ConfigError(f"replay_max={cfg.replay_max} rows cannot be drawn without "
                          f"replacement from a buffer of {cfg.buffer_size}")
    if cfg.transforms not in TRANSFORMS:
        raise ConfigError(unknown_choice("transforms", cfg.transforms, sorted(TRANSFORMS)))
    aug.parse(cfg.augment)
    check_optimizer(cfg)


def check_optimizer(cfg) -> None:
    """``ConfigError`` unless ``cfg``'s ``optimizer``, ``adam_b2`` and ``weight_decay`` make an
    ``optimizer(cfg, lr)`` (OCM's, OnPro's and GSA's)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(unknown_choice("optimizer", cfg.optimizer, OPTIMIZERS))
    if not 0.0 <= cfg.adam_b2 < 1.0 or cfg.weight_decay < 0:
        raise ConfigError(f"adam_b2 must be in [0, 1) and weight_decay >= 0, got "
                          f"{cfg.adam_b2} and {cfg.weight_decay}")


def optimizer(cfg: Config, lr) -> optax.GradientTransformation:
    """Adam with betas (0.9, ``adam_b2``) or SGD, after adding ``weight_decay * w`` to the
    gradient (PyTorch's ``weight_decay``)."""
    step = optax.adam(lr, b1=0.9, b2=cfg.adam_b2) if cfg.optimizer == "adam" else optax.sgd(lr)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), step)


def transform(x: Array, kind: str) -> Array:
    """The transformed copies of a batch ``x`` [B, H, W, C] (square images): [K B, H, W, C],
    copy k of every image in block k (module docstring, step 1). ``"halves"``: variants
    (original, left half turned, both turned, right half turned), each under 0, 90, 180, 270
    degree rotations, block ``4 r + v``; ``"rotations"``: the four rotations."""
    if kind not in TRANSFORMS:
        raise ConfigError(unknown_choice("transforms", kind, sorted(TRANSFORMS)))
    if kind == "halves":
        half = x.shape[2] // 2
        left, right = x[:, :, :half], x[:, :, half:]
        turn = lambda a: a[:, ::-1, ::-1]  # noqa: E731  (180 degrees, in place)
        variants = [x, jnp.concatenate([turn(left), right], 2),
                    jnp.concatenate([turn(left), turn(right)], 2),
                    jnp.concatenate([left, turn(right)], 2)]
    else:
        variants = [x]
    return jnp.concatenate([jnp.rot90(v, r, axes=(1, 2)) for r in range(4) for v in variants])


def window_offset(key: Array, feature_dim: int, proj_dim: int) -> Array:
    """Start of the feature window compared with the projections: uniform over
    ``0 .. F - P - 1`` as in the code (``torch.randperm(F - P)[0]``; 0 when ``F == P``)."""
    return jax.random.randint(key, (), 0, max(feature_dim - proj_dim, 1))


def copy_labels(y: Array, n_copies: int, num_classes: int) -> Array:
    """Labels of ``transform``'s copies [K B]: ``y + C k`` for block k."""
    return jnp.concatenate([y + num_classes * k for k in range(n_copies)])


def similarity(z: Array, h: Array, offset, weight=0.5) -> Array:
    """``weight (z . h[:, o:o+P]^T + z . z^T)`` [M, M] (module docstring, step 2; OCM's weight
    is 0.5) for normalised projections ``z`` [M, P] and normalised features ``h`` [M, F >= P],
    ``o = offset``."""
    window = jax.lax.dynamic_slice_in_dim(h, offset, z.shape[1], axis=1)
    return weight * (z @ (window + z).T)  # one [M, M] matmul instead of two


def contrast_terms(s: Array, row_labels: Array, col_labels: Array, valid: Array, temperature,
                   keep_self: bool) -> tuple[Array, Array]:
    """``(l [M, M], w [M, M])`` of the code's contrastive losses for similarities ``s``: ``l_ij
    = -log(e_ij / (sum_k e_ik + 1e-8) + 1e-8)`` with ``e = exp((s - rowmax) / T)`` over the
    valid columns (the diagonal dropped unless ``keep_self``), and ``w_ij`` the positive
    weights, ``1 / |{j: label_j = label_i}|`` over valid j (the diagonal's own label counts)."""
    n = s.shape[0]
    logits = s / temperature
    usable = valid[None, :] & (keep_self | ~jnp.eye(n, dtype=bool))
    top = jnp.where(valid[None, :], logits, -jnp.inf).max(1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))  # no valid column: 0
    # exp only of usable entries: an unused one may overflow, and 0 x inf is a NaN gradient
    e = jnp.where(usable, jnp.exp(jnp.where(usable, logits - top, 0.0)), 0.0)
    ell = -jnp.log(e / (e.sum(1, keepdims=True) + 1e-8) + 1e-8)
    positive = (row_labels[:, None] == col_labels[None, :]) & valid[None, :] & valid[:, None]
    w = positive / jnp.maximum(positive.sum(1, keepdims=True), 1)
    return ell, w


def _row_mean(x: Array, valid: Array) -> Array:
    return jnp.where(valid, x, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def contrast_new(s: Array, labels: Array, temperature) -> Array:
    """``L_new`` (the code's ``Supervised_NT_xent_n``) of the incoming views: ``s`` [2N, 2N]
    over ``[copies; crops]``, ``labels`` [N] of the copies: the SimCLR term plus twice the
    supervised term (module docstring, step 3)."""
    n = labels.shape[0]
    both = jnp.tile(labels, 2)
    ones = jnp.ones((2 * n,), bool)
    ell, w = contrast_terms(s, both, both, ones, temperature, keep_self=False)
    i = jnp.arange(n)
    pairs = (ell[i, i + n].sum() + ell[i + n, i].sum()) / (2 * n)
    return pairs + 2.0 * (w * ell).sum(1).mean()


def contrast_all(s: Array, row_labels: Array, col_labels: Array, valid: Array,
                 temperature) -> Array:
    """The supervised term with each row's own similarity kept in its softmax, mean over valid
    rows: ``L_buf`` (the code's ``Supervised_NT_xent_uni``) and ``L_pre``
    (``Supervised_NT_xent_pre``)."""
    ell, w = contrast_terms(s, row_labels, col_labels, valid, temperature, keep_self=True)
    return _row_mean((w * ell).sum(1), valid)


def stream_note(cfg, stream) -> str | None:
    """A warning for permuted streams (``stream`` a ``StreamConfig``; OnPro's too): the copies
    turn and rotate pixels, which for permuted images are not images (the command line drops
    the crop there). Measured on 10-task permuted MNIST, 2 seeds: OCM 0.697 without the crop,
    0.311 with it; finetune 0.687, ER 0.797."""
    del cfg
    if stream.kind != "permuted":
        return None
    return ("on a permuted stream the copies' half turns and rotations move permuted pixels, "
            "not images, so the copy contrast has little to hold on to (10-task permuted "
            "MNIST: OCM 0.697, finetune 0.687, ER 0.797)")


def check_fits(model: Model, cfg, method: str) -> None:
    """``ConfigError`` unless ``model``'s features are at least ``cfg.proj_dim`` wide (the
    similarity compares projections with a window of the features)."""
    if model.feature_dim < cfg.proj_dim:
        raise ConfigError(
            f"{method} compares projections with a {cfg.proj_dim}-wide window of the features, "
            f"but this model has {model.feature_dim} features: set proj_dim <= "
            f"{model.feature_dim}")


def projections(model: Model):
    """``forward(params, model_state, x, train) -> (logits, h, z, model_state)`` for
    parameters ``{"net", "head"}``: the network's logits, its L2-normalised features ``h`` and
    the L2-normalised projections ``z`` of the linear head."""

    def forward(params, model_state, x, train):
        logits, h, model_state = model.apply(params["net"], model_state, x, train)
        h = h.astype(jnp.float32)
        z = h @ params["head"]["w"] + params["head"]["b"]
        return logits, unit_rows(h), unit_rows(z), model_state

    return forward


def init_net(model: Model, cfg, key: Array, x: Array, lr) -> NetState:
    """The network (``model.init(key, x)``, as ER's for the same key; ``x`` square images) and
    a Linear(F, ``cfg.proj_dim``) head with PyTorch's ``nn.Linear`` initialisation, as the
    code's, with the state of ``optimizer(cfg, lr)``."""
    if x.shape[1] != x.shape[2]:
        raise ConfigError(f"the copies rotate images by 90 degrees: they must be square, got "
                          f"{x.shape[1]}x{x.shape[2]}")
    params, model_state = model.init(key, x)
    f, p = model.feature_dim, cfg.proj_dim
    bound = 1.0 / jnp.sqrt(f)
    kw, kb = jax.random.split(jax.random.fold_in(key, 1))
    head = {"w": jax.random.uniform(kw, (f, p), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (p,), jnp.float32, -bound, bound)}
    params = {"net": params, "head": head}
    return NetState(params, model_state, optimizer(cfg, lr).init(params))


def optimizer_step(cfg, net: NetState, loss_fn, lr) -> tuple[NetState, Array, tuple]:
    """One ``optimizer(cfg, lr)`` step on ``loss_fn(params) -> (loss, (*aux, model_state))``:
    ``(net, loss, aux)``."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(net.params)
    *aux, model_state = aux
    updates, opt_state = optimizer(cfg, lr).update(grads, net.opt_state, net.params)
    return NetState(optax.apply_updates(net.params, updates), model_state, opt_state), loss, aux


def make(model: Model, cfg: Config | None = None) -> Learner:
    """OCM learner for ``model``: transformed-copy contrastive losses, the previous task's model
    on the memory, cross-entropy on the memory, Adam."""
    cfg = cfg or Config()
    check_config(cfg)
    C, F, P = model.num_classes, model.feature_dim, cfg.proj_dim
    K = TRANSFORMS[cfg.transforms]
    check_fits(model, cfg, "OCM")
    forward = projections(model)

    def crop(key, x):
        return aug.augment(key, x, cfg.augment)

    def init(key, x, hp: HParams) -> State:
        net = init_net(model, cfg, key, x, hp.lr)
        example = {"x": x, "y": jnp.zeros((x.shape[0],), jnp.int32)}
        return State(net=net, buffer=reservoir.init(cfg.buffer_size, example),
                     pending=jax.tree.map(jnp.zeros_like, example),
                     pending_valid=jnp.zeros((x.shape[0],), bool), previous=net.params,
                     tasks_done=jnp.zeros((), jnp.int32), seen=jnp.zeros((C,), bool))

    def update(state: State, batch: Batch, hp: HParams, key):
        """Write the pending batch, snapshot at a boundary, one OCM step (module docstring)."""
        k_write, k_read, k_new, k_mem, k_ce, k_off1, k_off2 = jax.random.split(key, 7)
        state = er.flush(state, k_write, batch.fresh)
        take = batch.boundary
        previous = jax.tree.map(lambda new, old: jnp.where(take, new, old), state.net.params,
                                state.previous)
        tasks_done = state.tasks_done + take.astype(jnp.int32)
        later = tasks_done > 0
        seen = state.seen | (jax.nn.one_hot(batch.y, C) > 0).any(0)
        b = batch.y.shape[0]
        stream = {"x": batch.x, "y": batch.y}
        n_read = jnp.minimum(cfg.replay_max, cfg.replay_per_class * seen.sum())
        idx, mask = reservoir.subset_indices(
            k_read, jnp.arange(cfg.buffer_size) < reservoir.size(state.buffer), cfg.replay_max)
        mask = mask & (jnp.arange(cfg.replay_max) < n_read)
        mem = er.with_filler(jax.tree.map(lambda a: a[idx], state.buffer.data), mask, stream)
        copies = transform(batch.x, cfg.transforms)  # [K B]
        mem_copies = transform(mem["x"], cfg.transforms)  # [K R]
        views = jnp.concatenate([copies, crop(k_new, copies)])
        mem_views = jnp.concatenate([mem_copies, crop(k_mem, mem_copies)])
        # cross-entropy rows: a crop of the incoming rows (first task) or of the memory rows
        ce_x = crop(k_ce, jnp.concatenate([batch.x, mem["x"]]))
        ce_y = jnp.concatenate([batch.y, mem["y"]])
        ce_valid = jnp.concatenate([jnp.full((b,), ~later), mask & later])
        x_all = jnp.concatenate([views, mem_views, ce_x, batch.x])
        labels = copy_labels(batch.y, K, C)
        mem_labels = copy_labels(mem["y"], K, C)
        mem_valid = jnp.tile(mask, K)
        n_new, n_mem = views.shape[0], mem_views.shape[0]
        off1, off2 = window_offset(k_off1, F, P), window_offset(k_off2, F, P)
        _, _, z_prev, _ = forward(previous, state.net.model_state, mem_copies, True)
        z_prev = jax.lax.stop_gradient(z_prev)

        def loss_fn(params):
            logits, h, z, model_state = forward(params, state.net.model_state, x_all, True)
            cut = lambda a, lo, n: jax.lax.dynamic_slice_in_dim(a, lo, n)  # noqa: E731
            l_new = contrast_new(similarity(cut(z, 0, n_new), cut(h, 0, n_new), off1), labels,
                                 hp.temperature)
            zm, hm = cut(z, n_new, n_mem), cut(h, n_new, n_mem)
            l_buf = contrast_all(similarity(zm, hm, off2), jnp.tile(mem_labels, 2),
                                 jnp.tile(mem_labels, 2), jnp.tile(mem_valid, 2),
                                 hp.temperature)
            l_pre = contrast_all(zm[:n_mem // 2] @ z_prev.T, mem_labels, mem_labels, mem_valid,
                                 hp.temperature)
            ce_logits = cut(logits, n_new + n_mem, b + cfg.replay_max)
            ce = cross_entropy(ce_logits, ce_y, ce_valid)
            loss = ce + l_new + jnp.where(later, l_buf + l_pre, 0.0)
            return loss, (logits[-b:], model_state)

        net, loss, (stream_logits,) = optimizer_step(cfg, state.net, loss_fn, hp.lr)
        state = state._replace(net=net, previous=previous, tasks_done=tasks_done, seen=seen)
        state = er.hold(state, stream, batch.fresh)
        return state, {"loss": loss, "stream_logits": online_logits(net, stream_logits)}

    return classifier_learner(model, init, update, HParams())
