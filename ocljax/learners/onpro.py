"""Online prototype learning (OnPro): OCM's transformed-copy contrastive losses, plus an online
prototype equilibrium between the classes of each batch and adaptive prototypical feedback,
which mixes memory rows of the classes whose prototypes lie closest.

Wei, Ye, Huang, Zhang & Shan 2023, "Online Prototype Learning for Online Continual Learning"
(ICCV 2023, arXiv:2308.00301), checked against the authors' code (``weilllllls/OnPro``:
``train.py`` ``TrainLearner``, ``modules/OPE.py``, ``modules/APF.py``, ``losses/loss.py``,
``utils/rotation_transform.py``). OnPro needs the task boundaries: its first task trains without
the memory terms, and each later task's first batch skips the feedback. Each step, with ``x``
the incoming batch of B rows and ``m`` the ``M = min(replay_max, replay_per_class x classes
seen)`` rows read at random from a reservoir memory (none in the first task):

1. adaptive prototypical feedback (``feedback_rows``; later tasks, not on a task's first batch):
   the first ``floor(M mixup_base_rate)`` read rows are mixed with a random permutation of
   themselves (kornia's ``RandomMixUpV2`` as the code configures it: one coin of probability
   ``mixup_p`` for the whole group, then one per row, weight ``U(0, mixup_upper)``); the other
   rows are new pairs ``(a, b)`` drawn from the whole memory: each pair of classes gets
   ``round(p n)`` rows, ``p`` the softmax of ``1 / ||mu_a - mu_b||`` over the pairs of the
   classes whose prototype ``mu`` (mean projection in the previous step's memory read) is
   known, the rounding error spread at random; a pair mixes its rows with probability
   ``mixup_p``, weights ``Beta(mixup_alpha, mixup_alpha)``. A mixed row's label is
   ``(a, b, lam)``;
2. OCM's copies (``ocm.transform``; the code's 16 half-turned and rotated copies) of ``x`` and of
   the fed-back memory rows, each with a crop, their similarities
   ``sim_lambda (z . h[o:o+P] + z . z)`` (weight 1 in the first task) and OCM's losses:
   ``ocm.contrast_new`` on the incoming copies, and ``ocm.contrast_all`` on the memory's
   (later tasks). A mixed memory row's label there is the blend ``(1 - lam) a + lam b``, as in
   the code, so it is positive only with its own copies and views and with rows of that exact
   blend;
3. online prototype equilibrium (``ope_loss``): the mean normalised projection of each class in
   a batch, in two views, re-normalised and *not* detached; a SimCLR loss over the 2K
   prototypes, ``proto_temperature`` 0.5, each prototype's positive its class in the other
   view. Once on the incoming rows (the unrotated images and their crops), once on the memory
   rows as read (before mixing; in the first task ``replay_max`` rows read for it alone);
   the second gives the next step's prototypes ``mu`` (the two views' means, averaged);
4. cross-entropy of the network's classifier on a crop of the incoming rows in the first task,
   on a crop of the fed-back memory rows afterwards (``(1 - lam) CE(a) + lam CE(b)``; the
   incoming rows then get none);
5. the sum of all terms, weight 1 each, one Adam step (betas 0.9 / 0.99, coupled weight decay
   1e-4); the incoming batch is written to the reservoir (at the next step, ER's pending rows).

Prediction (``predict``) is the network's own classifier.

Deviations from the authors' code:

- One forward pass computes every view (the code uses three, for the contrastive views, the
  cross-entropy crop and the prototypes); identical without BatchNorm (the MNIST MLP). With
  BatchNorm (the reduced ResNet-18) the batch statistics also cover rows the code's passes do
  not hold: the memory copies computed and masked in the first task (about 85% of the rows
  there), read slots beyond ``M``, and the cross-entropy and prototype rows.
- Without two classes of known prototypes the guided rows stay the rows as read (the code's
  ``make_mix_pair`` fails an assertion there).
- With ``--passes k`` (the code has one pass) the repeats of a task's first batch are fed back.
- Mixing happens on inputs in [0, 1] (the code mixes mean/std-normalised images: the same
  images, since normalisation is affine).
- A feedback pair whose class has no row left in the memory takes a random memory row (the
  code picks a random class present, then a row of it).
- The memory is ocljax's exact reservoir; the crop is ``ocljax.augment``'s (bilinear, inside
  the image; the code's samples with reflection padding); the code's mixed precision is not
  reproduced.
- ``augment``: the code's CIFAR pipeline (flip, grayscale with probability 0.25, resized crop
  of area 0.3-1) by default; on single-channel images the default is the resized crop alone,
  OCM's MNIST pipeline (OnPro's copies come from OCM; the code has no MNIST setting). On a
  permuted stream the command line keeps only its pixel-free part (``stream_note`` warns).

Defaults: the authors' CIFAR-10 command line (``main.py``): Adam ``lr`` 5e-4, temperature 0.07,
``proto_temperature`` 0.5, ``sim_lambda`` 0.5 (1.0 for CIFAR-100 and TinyImageNet, with
``mixup_p`` 0.2 and ``mixup_base_rate`` 0.9), ``replay_max`` 64, 7 rows per class; the code's
memory is 200 rows for CIFAR-10, the default here the library's 1,000. Cost: like OCM's, about
``2 x 16 x (B + replay_max)`` rows through the network per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ocljax import augment as aug
from ocljax.errors import ConfigError
from ocljax.learners import er, ocm
from ocljax.learners.er_ncm import unit_rows
from ocljax.learners.supervised import NetState, online_logits
from ocljax.losses import cross_entropy
from ocljax.memory import reservoir
from ocljax.models.adapter import to_float
from ocljax.types import Array, Batch, Learner, Model

__all__ = ["Config", "HParams", "State", "TASK_FREE_HINT", "base_mixup", "check_config",
           "crop_spec", "feedback_rows", "make", "ope_loss", "pair_counts",
           "requires_boundaries", "stream_note"]

TASK_FREE_HINT = "use scr or pcr (contrastive replay without task boundaries) or er"


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_max: int = 64  # most memory rows read per step
    replay_per_class: int = 7  # memory rows read per class seen
    transforms: str = "halves"  # OCM's copies: "halves" (16) | "rotations" (4)
    augment: str = "flip,gray25,rrc30"  # crop views (ocljax.augment spec; module docstring)
    proj_dim: int = 128
    sim_lambda: float = 0.5  # weight of the similarities after the first task
    mixup_p: float = 0.6
    mixup_base_rate: float = 0.75  # share of the read rows mixed among themselves
    mixup_alpha: float = 0.4  # Beta(alpha, alpha) weights of the prototype-guided pairs
    mixup_upper: float = 0.6  # U(0, upper) weights of the base mixup
    optimizer: str = "adam"  # "adam" (betas 0.9 / adam_b2) | "sgd"
    adam_b2: float = 0.99
    weight_decay: float = 1e-4  # PyTorch's coupled L2


class HParams(NamedTuple):
    lr: float = 5e-4
    temperature: float = 0.07
    proto_temperature: float = 0.5


class State(NamedTuple):
    net: NetState  # params = {"net": model params, "head": {"w", "b"}}
    buffer: reservoir.ReservoirState  # data = {"x", "y"}
    pending: dict
    pending_valid: Array  # [B] bool
    tasks_done: Array  # [] int32, task boundaries passed
    seen: Array  # [C] bool, classes that have been in an incoming batch
    class_means: Array  # [C, P] float32, prototypes of the last memory read (feedback)
    class_means_valid: Array  # [C] bool


def requires_boundaries(cfg: Config) -> bool:
    """OnPro's first-task branch and its feedback skip at task starts: always True."""
    del cfg
    return True


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes, rates or unknown choices."""
    ocm.check_config(ocm.Config(
        buffer_size=cfg.buffer_size, replay_max=cfg.replay_max,
        replay_per_class=cfg.replay_per_class, transforms=cfg.transforms,
        proj_dim=cfg.proj_dim, optimizer=cfg.optimizer, adam_b2=cfg.adam_b2,
        weight_decay=cfg.weight_decay))
    for name in ("sim_lambda", "mixup_alpha"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("mixup_p", "mixup_base_rate", "mixup_upper"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    aug.parse(cfg.augment)


DEFAULT_AUGMENT = "flip,gray25,rrc30"  # the code's CIFAR pipeline
stream_note = ocm.stream_note  # the copies move pixels: a warning on permuted streams


def crop_spec(cfg: Config, channels: int) -> str:
    """The augmentation of the second view: ``cfg.augment``; the default on single-channel
    images is the resized crop alone (OCM's MNIST pipeline)."""
    if cfg.augment == DEFAULT_AUGMENT and channels != 3:
        return "rrc30"
    return cfg.augment


def ope_loss(z1: Array, z2: Array, labels: Array, valid: Array, num_classes: int,
             temperature) -> tuple[Array, Array, Array]:
    """Online prototype equilibrium (module docstring, step 3) of two views' normalised
    projections ``z1``, ``z2`` [M, P] with ``labels`` [M] and ``valid`` [M]: ``(loss, means
    [C, P], present [C])``, ``means`` the two views' raw class means averaged (detached), for
    the classes ``present`` in the valid rows. With one class present the loss is 0."""
    onehot = jax.nn.one_hot(labels, num_classes) * valid[:, None]  # [M, C]
    counts = onehot.sum(0)
    present = counts > 0
    mean1 = onehot.T @ z1.astype(jnp.float32) / jnp.maximum(counts, 1.0)[:, None]
    mean2 = onehot.T @ z2.astype(jnp.float32) / jnp.maximum(counts, 1.0)[:, None]
    protos = jnp.concatenate([unit_rows(mean1), unit_rows(mean2)])  # [2C, P]
    live = jnp.tile(present, 2)
    logits = protos @ protos.T / temperature
    n = 2 * num_classes
    others = live[None, :] & ~jnp.eye(n, dtype=bool)
    log_denominator = jax.nn.logsumexp(jnp.where(others, logits, -1e9), axis=1)
    partner = (jnp.arange(n) + num_classes) % n
    per_row = log_denominator - logits[jnp.arange(n), partner]
    loss = jnp.where(live, per_row, 0.0).sum() / jnp.maximum(live.sum(), 1)
    return loss, jax.lax.stop_gradient((mean1 + mean2) / 2), present


def base_mixup(key: Array, x: Array, y: Array, use: Array, p, upper):
    """kornia's ``RandomMixUpV2`` over the rows where ``use`` [R]: each is mixed with a
    partner from a random permutation of those rows (itself possible), ``x' = (1 - lam) x +
    lam x_partner``, with one coin of probability ``p`` for the whole group, then one per row,
    ``lam ~ U(0, upper)``. Returns ``(x', y_partner [R], lam [R])`` (``lam`` 0 elsewhere)."""
    r = y.shape[0]
    k_perm, k_group, k_row, k_lam = jax.random.split(key, 4)
    used_first = jnp.argsort(jnp.where(use, jnp.arange(r), r + jnp.arange(r)))  # slot order
    shuffled = jnp.argsort(jnp.where(use, jax.random.uniform(k_perm, (r,)), 2.0))
    partner = jnp.zeros((r,), jnp.int32).at[used_first].set(shuffled.astype(jnp.int32))
    keep = use & jax.random.bernoulli(k_group, p) & jax.random.bernoulli(k_row, p, (r,))
    lam = jnp.where(keep, jax.random.uniform(k_lam, (r,), minval=0.0, maxval=upper), 0.0)
    mix = lam.reshape(-1, *([1] * (x.ndim - 1)))
    return (1.0 - mix) * x + mix * x[partner], y[partner], lam


def pair_counts(key: Array, means: Array, valid: Array, n) -> tuple[Array, Array, Array]:
    """Rows per class pair for the prototype-guided feedback: ``round(p n)`` with ``p`` the
    softmax of ``1 / ||means_a - means_b||`` over the pairs ``a < b`` of ``valid`` classes, the
    rounding error spread over random pairs (one row each) so that the counts sum to ``n``
    (the code's ``make_mix_pair``). Returns ``(a [Q], b [Q], counts [Q] int32)`` over all
    ``Q = C (C - 1) / 2`` pairs (0 for pairs of invalid classes; all 0 without a valid pair)."""
    a, b = jnp.triu_indices(means.shape[0], k=1)
    ok = valid[a] & valid[b]
    dist = jnp.linalg.norm(means[a] - means[b], axis=1)
    inv = jnp.where(ok, 1.0 / jnp.maximum(dist, 1e-12), -jnp.inf)
    p = jax.nn.softmax(jnp.where(ok.any(), inv, 0.0)) * ok
    counts = jnp.round(p * n).astype(jnp.int32)
    short = n - counts.sum()
    order = jnp.argsort(jnp.argsort(jax.random.uniform(key, ok.shape)))  # a random rank
    rank_up = jnp.cumsum(ok[jnp.argsort(order)])[order] - 1  # random rank among valid pairs
    has = counts > 0
    rank_down = jnp.cumsum(has[jnp.argsort(order)])[order] - 1  # ... among pairs with rows
    counts = counts + (ok & (rank_up < short)).astype(jnp.int32)
    counts = counts - (has & (rank_down < -short)).astype(jnp.int32)
    return a, b, jnp.where(ok.any(), counts, 0)


def feedback_rows(key: Array, cfg: Config, buffer: reservoir.ReservoirState, x: Array,
                  y: Array, read: Array, n_read, means: Array, means_valid: Array):
    """Adaptive prototypical feedback (module docstring, step 1) on the memory rows read,
    ``x`` [R, ...] (floats in [0, 1]) and ``y`` [R] in slots where ``read`` (the first
    ``n_read`` slots): ``(x', y_a, y_b, lam)``, each [R]; rows not fed back are the read
    rows (``lam`` 0)."""
    r = y.shape[0]
    slot = jnp.arange(r)
    n_base = jnp.floor(n_read * cfg.mixup_base_rate).astype(jnp.int32)
    k_base, k_pairs, k_a, k_b, k_coin, k_lam = jax.random.split(key, 6)
    base = read & (slot < n_base)
    x_base, y_base, lam_base = base_mixup(k_base, x, y, base, cfg.mixup_p, cfg.mixup_upper)
    a, b, counts = pair_counts(k_pairs, means, means_valid, n_read - n_base)
    pair = jnp.searchsorted(jnp.cumsum(counts), slot - n_base, side="right")
    guided = read & ~base & (counts.sum() > 0)
    pair = jnp.minimum(pair, counts.shape[0] - 1)
    filled = jnp.arange(reservoir.capacity(buffer)) < reservoir.size(buffer)
    stored = buffer.data["y"]

    def rows_of(k, classes):  # one memory row of each class (any row if it has none), [R]
        u = jax.random.uniform(k, (r, stored.shape[0]))
        own = filled[None, :] & (stored[None, :] == classes[:, None])
        has = own.any(1, keepdims=True)
        return jnp.argmax(jnp.where(jnp.where(has, own, filled[None, :]), u, -1.0), axis=1)

    ia, ib = rows_of(k_a, a[pair]), rows_of(k_b, b[pair])
    coin = jax.random.bernoulli(k_coin, cfg.mixup_p, counts.shape)[pair]
    lam_pair = jnp.where(coin, jax.random.beta(k_lam, cfg.mixup_alpha, cfg.mixup_alpha, (r,)),
                         0.0)
    xa, xb = to_float(buffer.data["x"][ia]), to_float(buffer.data["x"][ib])
    mix = lam_pair.reshape(-1, *([1] * (x.ndim - 1)))
    x_pair = (1.0 - mix) * xa + mix * xb
    pick = lambda w, u, v: jnp.where(w.reshape(-1, *([1] * (u.ndim - 1))), u, v)  # noqa: E731
    x_out = pick(base, x_base, pick(guided, x_pair, x))
    y_a = jnp.where(guided, stored[ia], y)
    y_b = jnp.where(base, y_base, jnp.where(guided, stored[ib], y))
    lam = jnp.where(base, lam_base, jnp.where(guided, lam_pair, 0.0))
    return x_out, y_a, y_b, lam


def make(model: Model, cfg: Config | None = None) -> Learner:
    """OnPro learner for ``model``: OCM's copy contrast, online prototype equilibrium,
    adaptive prototypical feedback, Adam."""
    cfg = cfg or Config()
    check_config(cfg)
    C, F, P = model.num_classes, model.feature_dim, cfg.proj_dim
    K = ocm.TRANSFORMS[cfg.transforms]
    R = cfg.replay_max
    ocm.check_fits(model, cfg, "OnPro")
    forward = ocm.projections(model)

    def init(key, x, hp: HParams) -> State:
        example = {"x": x, "y": jnp.zeros((x.shape[0],), jnp.int32)}
        return State(net=ocm.init_net(model, cfg, key, x, hp.lr),
                     buffer=reservoir.init(cfg.buffer_size, example),
                     pending=jax.tree.map(jnp.zeros_like, example),
                     pending_valid=jnp.zeros((x.shape[0],), bool),
                     tasks_done=jnp.zeros((), jnp.int32), seen=jnp.zeros((C,), bool),
                     class_means=jnp.zeros((C, P), jnp.float32),
                     class_means_valid=jnp.zeros((C,), bool))

    def update(state: State, batch: Batch, hp: HParams, key):
        """Write the pending batch, feed back, one OnPro step (module docstring)."""
        keys = jax.random.split(key, 8)
        state = er.flush(state, keys[0], batch.fresh)
        tasks_done = state.tasks_done + batch.boundary.astype(jnp.int32)
        later = tasks_done > 0
        seen = state.seen | (jax.nn.one_hot(batch.y, C) > 0).any(0)
        b = batch.y.shape[0]
        spec = crop_spec(cfg, batch.x.shape[-1])
        slot = jnp.arange(R)
        n_read = jnp.where(later, jnp.minimum(R, cfg.replay_per_class * seen.sum()), 0)
        idx, stored = reservoir.subset_indices(
            keys[1], jnp.arange(cfg.buffer_size) < reservoir.size(state.buffer), R)
        read = stored & (slot < n_read)
        proto_rows = stored & jnp.where(later, slot < n_read, True)  # first task: up to R
        x_in = to_float(batch.x)
        filler = {"x": x_in, "y": batch.y}
        mem = er.with_filler({"x": to_float(state.buffer.data["x"][idx]),
                              "y": state.buffer.data["y"][idx]}, stored, filler)
        fed_x, y_a, y_b, lam = feedback_rows(keys[2], cfg, state.buffer, mem["x"], mem["y"],
                                             read, n_read, state.class_means,
                                             state.class_means_valid)
        feed = later & ~batch.boundary
        pick = lambda u, v: jnp.where(feed, u, v)  # noqa: E731
        mem_x, y_a = pick(fed_x, mem["x"]), pick(y_a, mem["y"])
        y_b, lam = pick(y_b, mem["y"]), pick(lam, 0.0)
        copies = ocm.transform(x_in, cfg.transforms)
        mem_copies = ocm.transform(mem_x, cfg.transforms)
        views = jnp.concatenate([copies, aug.augment(keys[3], copies, spec)])
        mem_views = jnp.concatenate([mem_copies, aug.augment(keys[4], mem_copies, spec)])
        ce_x = aug.augment(keys[5], jnp.concatenate([x_in, mem_x]), spec)
        proto_x = jnp.concatenate([mem["x"], aug.augment(keys[6], mem["x"], spec)])
        x_all = jnp.concatenate([views, mem_views, ce_x, proto_x, x_in])
        labels = ocm.copy_labels(batch.y.astype(jnp.float32), K, C)
        blend = (1.0 - lam) * y_a + lam * y_b  # the code's float label of a mixed row
        mem_labels = jnp.tile(ocm.copy_labels(blend, K, C), 2)
        mem_valid = jnp.tile(jnp.tile(read, K), 2)
        n_new, n_mem = views.shape[0], mem_views.shape[0]
        k_off1, k_off2 = jax.random.split(keys[7])
        off1, off2 = ocm.window_offset(k_off1, F, P), ocm.window_offset(k_off2, F, P)
        weight = jnp.where(later, cfg.sim_lambda, 1.0)

        def loss_fn(params):
            logits, h, z, model_state = forward(params, state.net.model_state, x_all, True)
            cut = lambda a, lo, n: jax.lax.dynamic_slice_in_dim(a, lo, n)  # noqa: E731
            z_new, h_new = cut(z, 0, n_new), cut(h, 0, n_new)
            ins = ocm.contrast_new(ocm.similarity(z_new, h_new, off1, weight), labels,
                                   hp.temperature)
            s_mem = ocm.similarity(cut(z, n_new, n_mem), cut(h, n_new, n_mem), off2, weight)
            ins_mem = ocm.contrast_all(s_mem, mem_labels, mem_labels, mem_valid,
                                       hp.temperature)
            half = n_new // 2
            ope_new, _, _ = ope_loss(z_new[:b], z_new[half:half + b], batch.y,
                                     jnp.ones((b,), bool), C, hp.proto_temperature)
            at = n_new + n_mem + b + R
            ope_seen, means, present = ope_loss(cut(z, at, R), cut(z, at + R, R), mem["y"],
                                                proto_rows, C, hp.proto_temperature)
            ce_logits = cut(logits, n_new + n_mem, b + R)
            ce_first = cross_entropy(ce_logits[:b], batch.y)
            mem_logits = ce_logits[b:]
            mixed = ((1.0 - lam) * optax.softmax_cross_entropy_with_integer_labels(
                mem_logits, y_a) + lam * optax.softmax_cross_entropy_with_integer_labels(
                mem_logits, y_b))
            ce_later = jnp.where(read, mixed, 0.0).sum() / jnp.maximum(read.sum(), 1)
            loss = (jnp.where(later, ce_later + ins_mem, ce_first) + ins + ope_new + ope_seen)
            return loss, (logits[-b:], means, present, model_state)

        net, loss, (stream_logits, means, present) = ocm.optimizer_step(cfg, state.net,
                                                                        loss_fn, hp.lr)
        has_read = proto_rows.any()  # the code updates the prototypes whenever it reads
        state = state._replace(
            net=net, tasks_done=tasks_done, seen=seen,
            class_means=jnp.where(has_read, means, state.class_means),
            class_means_valid=jnp.where(has_read, present, state.class_means_valid))
        state = er.hold(state, {"x": batch.x, "y": batch.y}, batch.fresh)
        return state, {"loss": loss, "stream_logits": online_logits(net, stream_logits)}

    return ocm.classifier_learner(model, init, update, HParams())
