"""Supervised Contrastive Replay (SCR): a SupCon-trained representation, NCM classification.

Mai et al. 2021, "Supervised Contrastive Replay: Revisiting the Nearest Class Mean Classifier
in Online Class-Incremental Continual Learning" (CVPR Workshops 2021), Sec. 3, checked against
the authors' code (``RaptorMai/online-continual-learning``, ``agents/scr.py``,
``utils/loss.py``, ``models/resnet.py: SupConResNet``). Each step:

1. the incoming batch and ``replay_batch`` rows drawn at random from a reservoir memory are
   concatenated into a combined batch of N rows;
2. as in the authors' code, the two views of it are the combined batch itself and one augmented
   copy (``augment_both=True`` augments both views instead, as SupCon trains);
3. both views go through the network's ``features`` and a projection head (Linear F->F, ReLU,
   Linear F->``proj_dim``, then L2 normalisation: the code's ``head='mlp'``);
4. the loss is SupCon's L^sup_out (Khosla et al. 2020, "Supervised Contrastive Learning",
   NeurIPS 2020, Eq. 2; ``supcon_loss`` below) over the 2N views with temperature
   ``temperature``: every view is an anchor, its positives are all *other* views with its label
   (so at least its own other view), its contrast set all other views;
5. one optimizer step on the network and the head together (the head lives in the same
   parameter pytree, ``{"net": ..., "head": ...}``, so ``gradient_step``'s fused SGD applies).

Evaluation (the NCM classifier of Sec. 3): ``prepare_eval`` writes the pending batch, embeds
the whole memory with the network (``features``, not the projection) and takes per-class means
of the normalised features; ``predict`` is the nearest-class-mean rule
(``er_ncm.class_means`` / ``nearest_mean_logits``). The network's linear classifier is never
trained (it gets no gradient) and never used.

Online accuracy. The stream logits (test-then-train, pre-update network) are nearest-mean
logits with class means estimated from the replayed rows of the same step (un-augmented view,
labels from the memory only, so the incoming labels are not used): an unbiased subsample of
the memory, at no extra cost, where exact means would embed the whole memory every step. The
state keeps these estimated means, so ``predict`` on an unprepared (training) state uses them;
``prepare_eval`` replaces them with the exact means of the whole memory (``prepared`` flag as
in ``er_ncm``). Classes without rows get -inf logits (the code draws a random mean for them).

Deviations from the authors' code:

- The two views go through one forward pass of 2N rows (the code uses two passes); identical
  without BatchNorm, with BatchNorm the batch statistics are shared by both views.
- With an empty memory the first batch trains on its own rows (the code skips the step).
  Replayed rows that do not exist yet (memory smaller than ``replay_batch``) are masked out of
  anchors and contrast sets.
- Augmentation: the code's pipeline is random resized crop (scale 0.2-1), horizontal flip,
  colour jitter (0.4, 0.4, 0.4, 0.1; p 0.8) and grayscale (p 0.2). For grayscale digits the
  default ``augment`` spec keeps a milder random resized crop (scale 0.5-1: a 20% crop of a
  28x28 digit is often a single stroke) and brightness/contrast jitter 0.4, and drops the
  flip (mirrored digits are not digits of the same class, and some look like other classes)
  and the colour-only steps; use ``augment="rrc20,flip,jitter40"`` for colour images.
- SupCon is averaged over anchors, as in the code; its loss has no ``tau / base_tau`` factor
  (the SupCon repository's factor is 1 at the default 0.07 anyway).

Recommended settings for split MNIST (MLP 784-256-256-10, batch 10, one pass):
``buffer_size`` 1000, SGD ``lr`` 0.1, ``temperature`` 0.07. ``replay_batch`` defaults to 100,
the paper's value (the authors' command line: ``--eps_mem_batch 100``): a contrastive loss
needs many negatives per anchor, and for an MLP the larger batch is cheap (2 x 110 rows per
forward pass). ``replay_batch=10`` gives a compute-matched comparison with ER (and is what
``experiments.split_mnist``'s preset sets for every learner).

Measured (split MNIST, task-free, one seed, 2-core CPU; final / online accuracy):
``replay_batch`` 10: 0.948 / 0.597; 100: 0.940 / 0.883; with the code's colour pipeline
``rrc20,flip,jitter40`` instead of the default spec: 0.921 / 0.583 and 0.920 / 0.867. The
online accuracy with 10 replayed rows is low because a new class has no mean until one of its
rows is replayed (the estimate is pessimistic early in each task, not the final NCM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax import augment as aug
from ocljax import optim
from ocljax.errors import ConfigError
from ocljax.learners import er
from ocljax.learners.er_ncm import class_means, nearest_mean_logits, normalise
from ocljax.learners.supervised import NetState, backbone_features, backbone_probe, gradient_step
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model

__all__ = ["Config", "HParams", "State", "check_config", "init_head", "make", "project",
           "supcon_loss"]


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 100  # rows replayed per step (paper: 100)
    proj_dim: int = 128  # output size of the projection head
    augment: str = "rrc50,jitter40"  # ocljax.augment spec of the augmented view
    augment_both: bool = False  # False: views = (original, augmented), as the authors' code
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1
    temperature: float = 0.07


class State(NamedTuple):
    net: NetState  # params = {"net": model params, "head": projection head params}
    buffer: reservoir.ReservoirState  # data = {"x": [cap, ...], "y": [cap]}
    pending: dict  # {"x": [B, ...], "y": [B]}: last incoming batch, not yet written
    pending_valid: Array  # [B] bool
    means: Array  # [C, F] normalised class means (exact once prepared, else replay estimate)
    has_mean: Array  # [C] bool
    prepared: Array  # [] bool, True only in states returned by prepare_eval


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes, a bad augmentation spec or optimizer."""
    er.check_config(cfg)
    if cfg.proj_dim < 1:
        raise ConfigError(f"proj_dim must be >= 1, got {cfg.proj_dim}")
    aug.parse(cfg.augment)
    optim.check(cfg.optimizer)


def init_head(key: Array, feature_dim: int, proj_dim: int) -> dict:
    """Projection head parameters: Linear(F, F), ReLU, Linear(F, P).

    Weights and biases uniform in +-1/sqrt(fan_in), PyTorch's ``nn.Linear`` default that the
    authors' head uses.
    """
    ks = jax.random.split(key, 4)
    bound = 1.0 / jnp.sqrt(feature_dim)
    u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)  # noqa: E731
    return {"w1": u(ks[0], (feature_dim, feature_dim)), "b1": u(ks[1], (feature_dim,)),
            "w2": u(ks[2], (feature_dim, proj_dim)), "b2": u(ks[3], (proj_dim,))}


def project(head: dict, features: Array) -> Array:
    """L2-normalised projection of ``features`` [N, F]: [N, P] float32."""
    h = jax.nn.relu(features.astype(jnp.float32) @ head["w1"] + head["b1"])
    return normalise(h @ head["w2"] + head["b2"])


def supcon_loss(z: Array, labels: Array, valid: Array, temperature) -> Array:
    """Supervised contrastive loss L^sup_out (Khosla et al. 2020, Eq. 2), mean over anchors.

    z: [M, P] L2-normalised embeddings of all views (views of one sample are separate rows);
    labels: [M] int; valid: [M] bool, rows that take part. For each valid anchor i, with
    A(i) the other valid rows and P(i) those of A(i) with i's label,

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

    and the loss is the mean of l_i over valid anchors with a non-empty P(i).
    """
    z = z.astype(jnp.float32)
    m = z.shape[0]
    sim = z @ z.T / temperature
    contrast = valid[:, None] & valid[None, :] & ~jnp.eye(m, dtype=bool)
    positive = contrast & (labels[:, None] == labels[None, :])
    # A large finite fill (not -inf) keeps rows without any contrast free of NaN gradients.
    log_denominator = jax.nn.logsumexp(jnp.where(contrast, sim, -1e9), axis=1, keepdims=True)
    log_prob = sim - log_denominator
    n_pos = positive.sum(1)
    mean_log_prob = jnp.where(positive, log_prob, 0.0).sum(1) / jnp.maximum(n_pos, 1)
    anchor = valid & (n_pos > 0)
    return -jnp.where(anchor, mean_log_prob, 0.0).sum() / jnp.maximum(anchor.sum(), 1)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """SCR learner for ``model``: reservoir memory, SupCon training, NCM evaluation."""
    cfg = cfg or Config()
    check_config(cfg)
    C, F = model.num_classes, model.feature_dim

    features = backbone_features(model)

    def memory_means(net: NetState, buffer: reservoir.ReservoirState):
        """Exact class means of the memory's features (evaluation mode)."""
        feats, _ = features(net.params, net.model_state, buffer.data["x"], False)
        mask = jnp.arange(reservoir.capacity(buffer)) < reservoir.size(buffer)
        return class_means(feats, buffer.data["y"], mask, C)

    def init(key, x, hp: HParams) -> State:
        params, model_state = model.init(key, x)  # same network as er's for the same key
        params = {"net": params, "head": init_head(jax.random.fold_in(key, 1), F, cfg.proj_dim)}
        net = NetState(params, model_state, optim.build(cfg.optimizer, hp.lr).init(params))
        return State(
            **er.state_around(cfg, net, x)._asdict(),
            means=jnp.zeros((C, F), jnp.float32),
            has_mean=jnp.zeros((C,), bool),
            prepared=jnp.zeros((), bool),
        )

    def update(state: State, batch: Batch, hp: HParams, key):
        """Write the pending batch, replay, one SupCon step on (stream + replay) x 2 views."""
        k_write, k_read, k_aug = jax.random.split(key, 3)
        state, stream, x, y, valid = er.combined_rows(state, batch, k_write, k_read,
                                                      cfg.replay_batch)
        n, n_stream = y.shape[0], batch.y.shape[0]
        if cfg.augment_both:
            k1, k2 = jax.random.split(k_aug)
            views = jnp.concatenate([aug.augment(k1, x, cfg.augment),
                                     aug.augment(k2, x, cfg.augment)])
        else:
            views = jnp.concatenate([x, aug.augment(k_aug, x, cfg.augment)])

        def loss_fn(params, model_state):
            feats, model_state = features(params, model_state, views, True)
            z = project(params["head"], feats)
            loss = supcon_loss(z, jnp.tile(y, 2), jnp.tile(valid, 2), hp.temperature)
            return loss, (jax.lax.stop_gradient(feats[:n]), model_state)

        # Online prediction: class means of the replayed rows (memory labels only), in the
        # pre-update network's evaluation-mode features. The training forward's features of
        # the original view are those unless neither view is the original (augment_both) or
        # the model has BatchNorm (training mode normalises with the batch's statistics):
        # then the rows are embedded once more, in evaluation mode.
        embed = cfg.augment_both or bool(jax.tree.leaves(state.net.model_state))
        if embed:
            plain, _ = features(state.net.params, state.net.model_state, x, False)
        net, loss, plain_or_view = gradient_step(cfg.optimizer, state.net, loss_fn, hp.lr)
        if not embed:
            plain = plain_or_view
        means, has_mean = class_means(plain[n_stream:], y[n_stream:], valid[n_stream:], C)
        stream_logits = nearest_mean_logits(plain[:n_stream], means, has_mean)
        keep = lambda new, old: jnp.where(batch.fresh, new, old)  # noqa: E731
        state = state._replace(
            net=net,
            pending=jax.tree.map(keep, stream, state.pending),
            pending_valid=keep(jnp.ones((n_stream,), bool), state.pending_valid),
            means=means, has_mean=has_mean, prepared=jnp.zeros((), bool),
        )
        return state, {"loss": loss, "stream_logits": stream_logits}

    def prepare_eval(state: State, hp: HParams, key) -> State:
        """Write the pending batch and take the exact class means of the whole memory."""
        del hp
        state = er.flush(state, key)
        means, has_mean = memory_means(state.net, state.buffer)
        return state._replace(means=means, has_mean=has_mean, prepared=jnp.ones((), bool))

    def predict(state: State, x, hp: HParams) -> Array:
        """Nearest-class-mean logits [N, C] with the state's means (see module docstring)."""
        del hp
        feats, _ = features(state.net.params, state.net.model_state, x, False)
        return nearest_mean_logits(feats, state.means, state.has_mean)

    return Learner(init, update, predict, prepare_eval, HParams(), features=backbone_probe(model))
