"""ER trained, evaluated with a nearest-class-mean (NCM) classifier over buffer features.

The classifier is iCaRL's nearest-mean-of-exemplars rule (Rebuffi et al. 2017, "iCaRL:
Incremental Classifier and Representation Learning", Sec. 2.1, Algorithm 1): features are
L2-normalised, class means are taken over the memory's exemplars of each class, and an input
is assigned the class whose mean is nearest. Mai et al. (2021, "Supervised Contrastive Replay",
Sec. 3.3) apply it to online replay; here the representation is trained by plain ER
(``ocljax.learners.er``), which isolates the effect of the classifier (the NCM "trick" of
Mai et al. 2022, "Online continual learning in image classification: an empirical survey").

``prepare_eval`` writes the pending batch, embeds the whole buffer and computes the means;
``predict`` on a prepared state uses them, on a training state it uses the linear head (so
online accuracy, measured during training, is the head's).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax.learners import er
from ocljax.learners.er import Config, HParams
from ocljax.learners.supervised import net_features
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model

__all__ = ["Config", "HParams", "State", "make", "class_means", "nearest_mean_logits",
           "normalise", "unit_rows"]


class State(NamedTuple):
    er: er.State
    means: Array  # [C, F] L2-normalised class means (valid once prepared)
    has_mean: Array  # [C] bool, classes present in the buffer
    prepared: Array  # [] bool, True only in states returned by prepare_eval


def normalise(f: Array) -> Array:
    """Rows scaled to unit L2 norm (zero rows stay zero). Its gradient is NaN at a zero row:
    losses that differentiate through the normalisation of features that can be zero use
    ``unit_rows``."""
    return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def unit_rows(a: Array) -> Array:
    """Rows scaled to unit L2 norm in float32, the norm floored at 1e-6: a zero row stays zero
    and its gradient is finite (at most 1e6 times the incoming one, as with a ``norm + 1e-6``
    denominator), where that of ``jnp.linalg.norm`` is NaN at 0. Used by PCR and ER-AML (kept
    apart from ``normalise``, whose rounding SCR's and iCaRL's numbers were measured with)."""
    a = a.astype(jnp.float32)
    return a / jnp.sqrt(jnp.maximum((a * a).sum(-1, keepdims=True), 1e-12))


def class_means(features: Array, labels: Array, mask: Array, num_classes: int):
    """Mean of normalised ``features`` [N, F] per class over rows where ``mask`` [N].

    Returns ``(means [C, F] renormalised, has_mean [C] bool)``.
    """
    onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    counts = onehot.sum(0)
    sums = onehot.T @ normalise(features)
    means = normalise(sums / jnp.maximum(counts, 1.0)[:, None])
    return means, counts > 0


def nearest_mean_logits(features: Array, means: Array, has_mean: Array) -> Array:
    """Negative squared distance of normalised ``features`` [N, F] to ``means`` [C, F];
    classes without exemplars get -inf."""
    f = normalise(features)
    d2 = (f * f).sum(-1, keepdims=True) - 2 * f @ means.T + (means * means).sum(-1)[None]
    return jnp.where(has_mean[None], -d2, -jnp.inf)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """ER-trained learner with NCM evaluation over its reservoir buffer."""
    cfg = cfg or Config()
    er.check_config(cfg)
    C, F = model.num_classes, model.feature_dim

    def init(key, x, hp: HParams) -> State:
        return State(
            er=er.init_state(model, cfg, key, x, hp),
            means=jnp.zeros((C, F), jnp.float32),
            has_mean=jnp.zeros((C,), bool),
            prepared=jnp.zeros((), bool),
        )

    def update(state: State, batch: Batch, hp: HParams, key):
        inner, metrics = er.update_state(model, cfg, state.er, batch, hp, key)
        return state._replace(er=inner, prepared=jnp.zeros((), bool)), metrics

    def prepare_eval(state: State, hp: HParams, key) -> State:
        del hp
        inner = er.flush(state.er, key)
        buf = inner.buffer
        net = inner.net
        _, feats, _ = model.apply(net.params, net.model_state, buf.data["x"], False)
        mask = jnp.arange(reservoir.capacity(buf)) < reservoir.size(buf)
        means, has_mean = class_means(feats, buf.data["y"], mask, C)
        return State(inner, means, has_mean, jnp.ones((), bool))

    def predict(state: State, x, hp: HParams):
        del hp
        net = state.er.net
        logits, feats, _ = model.apply(net.params, net.model_state, x, False)
        return jnp.where(state.prepared, nearest_mean_logits(feats, state.means, state.has_mean),
                         logits)

    net_feats = net_features(model)

    def features(state: State, x, hp: HParams):
        """Evaluation-mode penultimate features [N, F] of the ER network (for probes)."""
        return net_feats(state.er, x, hp)

    return Learner(init, update, predict, prepare_eval, HParams(), features=features)
