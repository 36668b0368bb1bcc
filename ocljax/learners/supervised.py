"""The network part shared by gradient-trained learners: parameters, model state, optimizer.

Learners build their loss as ``loss_fn(params, model_state) -> (loss, (aux, new_model_state))``
and hand it to ``gradient_step``, which applies the configured optimizer (with the fused SGD
path below); ``cross_entropy_step`` is the common case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from ocljax import optim
from ocljax.losses import cross_entropy
from ocljax.types import Array, Learner, Model, PyTree, identity_prepare_eval


class NetState(NamedTuple):
    params: PyTree
    model_state: PyTree  # BatchNorm statistics etc.; {} when the model has none
    opt_state: PyTree


def init_net(model: Model, optimizer: str, key: Array, x: Array, lr) -> NetState:
    """Initialise a network and its optimizer state for example inputs ``x`` [B, ...]."""
    params, model_state = model.init(key, x)
    return NetState(params, model_state, optim.build(optimizer, lr).init(params))


LossFn = Callable[[PyTree, PyTree], tuple[Array, tuple[PyTree, PyTree]]]


def gradient_step(
    optimizer: str, net: NetState, loss_fn: LossFn, lr
) -> tuple[NetState, Array, PyTree]:
    """One optimizer step on ``loss_fn(params, model_state) -> (loss, (aux, new_model_state))``.

    Returns ``(new_net, loss, aux)``; ``aux`` is whatever the loss function computed on the way
    (typically the pre-step logits). ``new_model_state`` replaces the BatchNorm statistics.

    With ``optimizer == "sgd"`` (plain SGD, ``w <- w - lr * grad``) the learning rate is applied
    to the loss's cotangent rather than to the gradient: the update is then
    ``w + dot(h^T, delta)``, which XLA fuses into the weight-gradient matmul (on GPU a GEMM with
    beta = 1), so each weight is read and written once per step and the gradient is never
    materialised. Same rule as ``optax.sgd`` up to rounding order (``sgd_optax`` keeps the optax
    path; tests compare the two).
    """
    if optimizer == "sgd":
        def scaled(params):
            loss, aux = loss_fn(params, net.model_state)
            return -lr * loss, (loss, aux)

        (_, (loss, (aux, model_state))), steps = jax.value_and_grad(scaled, has_aux=True)(
            net.params)
        params = jax.tree.map(lambda p, d: p + d, net.params, steps)
        return NetState(params, model_state, net.opt_state), loss, aux
    (loss, (aux, model_state)), grads = jax.value_and_grad(
        lambda p: loss_fn(p, net.model_state), has_aux=True)(net.params)
    return apply_gradients(optimizer, net._replace(model_state=model_state), grads, lr), loss, aux


def apply_gradients(optimizer: str, net: NetState, grads: PyTree, lr) -> NetState:
    """Apply already-computed ``grads`` with the configured optimizer (for learners that edit
    the gradient before the step, e.g. A-GEM's projection)."""
    tx = optim.build(optimizer, lr)
    updates, opt_state = tx.update(grads, net.opt_state, net.params)
    params = jax.tree.map(lambda p, u: p + u, net.params, updates)
    return NetState(params, net.model_state, opt_state)


def cross_entropy_step(
    model: Model, optimizer: str, net: NetState, x: Array, y: Array, mask: Array | None, lr
) -> tuple[NetState, Array, Array]:
    """One optimizer step on the masked cross-entropy of ``(x [N, ...], y [N])``.

    Returns ``(new_net, loss, logits [N, C])``; the logits are from the pre-step forward pass.
    """

    def loss_fn(params, model_state):
        logits, _, model_state = model.apply(params, model_state, x, True)
        return cross_entropy(logits, y, mask), (logits, model_state)

    return gradient_step(optimizer, net, loss_fn, lr)


def online_logits(net: NetState, logits: Array) -> Array | None:
    """What a learner returns as ``"stream_logits"`` (``ocljax.types.Learner``): the pre-step
    training forward's ``logits`` on the incoming rows, when they are the evaluation-mode
    logits of the pre-update model, i.e. for a model without mutable state (``model_state``
    empty: no BatchNorm), whose training and evaluation forwards are one function; the driver
    then scores online accuracy without a second forward pass. None for a model with
    BatchNorm, whose training forward normalises each row with the statistics of the whole
    batch (incoming and replayed rows): the driver then scores the pre-update state's
    ``predict``, the evaluation-mode model that online accuracy asks about (Cai et al. 2021,
    "Online Continual Learning with Natural Distribution Shifts", Sec. 3). ``net`` may be
    the pre- or post-update ``NetState``: only its structure is read."""
    return None if jax.tree.leaves(net.model_state) else logits


def predict_logits(model: Model, net: NetState, x: Array) -> Array:
    """Evaluation-mode logits [N, C]."""
    return model.apply(net.params, net.model_state, x, False)[0]


def net_features(model: Model) -> Callable[..., Array]:
    """``features(state, x [N, ...], hp) -> [N, F]`` for ``Learner.features``: the model's
    penultimate features in evaluation mode, for a state that is a ``NetState`` or holds one as
    ``state.net``. The representation a linear probe reads (``ocljax.metrics.probe``)."""

    def features(state, x: Array, hp) -> Array:
        del hp
        net = state if isinstance(state, NetState) else getattr(state, "net", None)
        if not isinstance(net, NetState):
            raise TypeError(
                f"net_features needs a NetState or a state with a .net NetState field; got "
                f"{type(state).__name__}: give this learner its own features function"
            )
        return model.apply(net.params, net.model_state, x, False)[1]

    return features


def backbone_features(model: Model) -> Callable[..., tuple[Array, PyTree]]:
    """``features(params, model_state, x, train) -> (features [N, F], model_state)`` for a
    learner whose parameters are ``{"net": model parameters, ...}``, the model trained beside
    parameters of the method's own (SCR's projection head, PCR's proxies)."""

    def features(params, model_state, x: Array, train: bool):
        _, feats, model_state = model.apply(params["net"], model_state, x, train)
        return feats, model_state

    return features


def backbone_probe(model: Model) -> Callable[..., Array]:
    """``features(state, x [N, ...], hp) -> [N, F]`` for ``Learner.features`` of a learner
    whose parameters are ``{"net": model parameters, ...}`` (``backbone_features``): the
    network's evaluation-mode penultimate features, before any head of the method's own."""
    features = backbone_features(model)

    def probe(state, x: Array, hp) -> Array:
        del hp
        return features(state.net.params, state.net.model_state, x, False)[0]

    return probe


def net_learner(model: Model, init: Callable[..., PyTree], update: Callable, hparams) -> Learner:
    """The ``Learner`` of a method whose state is a ``NetState`` or holds one as ``state.net``
    and that evaluates that network as it is: the method's own ``init`` and ``update``, with
    the ``predict`` (evaluation-mode logits), ``prepare_eval`` (identity) and ``features``
    (``net_features``) that all such methods share. ``hparams`` are its default traced
    hyperparameters."""

    def predict(state, x: Array, hp) -> Array:
        del hp
        return predict_logits(model, state if isinstance(state, NetState) else state.net, x)

    return Learner(init, update, predict, identity_prepare_eval, hparams,
                   features=net_features(model))


def classifier_learner(model: Model, init: Callable[..., PyTree], update: Callable,
                       hparams) -> Learner:
    """The ``Learner`` of a method that trains parameters of its own beside the network
    (parameters ``{"net": model parameters, ...}``: OCM's and OnPro's projection head, DVC's Q
    head) and predicts with the network's own classifier: evaluation-mode logits, and backbone
    features for probes (``backbone_probe``)."""

    def predict(state, x: Array, hp) -> Array:
        del hp
        return model.apply(state.net.params["net"], state.net.model_state, x, False)[0]

    return Learner(init, update, predict, identity_prepare_eval, hparams,
                   features=backbone_probe(model))
