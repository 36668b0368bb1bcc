"""The network part shared by gradient-trained learners: parameters, model state, optimizer."""

from __future__ import annotations

from typing import NamedTuple

import jax

from ocljax import optim
from ocljax.losses import cross_entropy
from ocljax.types import Array, Model, PyTree


class NetState(NamedTuple):
    params: PyTree
    model_state: PyTree  # BatchNorm statistics etc.; {} when the model has none
    opt_state: PyTree


def init_net(model: Model, optimizer: str, key: Array, x: Array, lr) -> NetState:
    """Initialise a network and its optimizer state for example inputs ``x`` [B, ...]."""
    params, model_state = model.init(key, x)
    return NetState(params, model_state, optim.build(optimizer, lr).init(params))


def cross_entropy_step(
    model: Model, optimizer: str, net: NetState, x: Array, y: Array, mask: Array | None, lr
) -> tuple[NetState, Array, Array]:
    """One optimizer step on the masked cross-entropy of ``(x [N, ...], y [N])``.

    Returns ``(new_net, loss, logits [N, C])``; the logits are from the pre-step forward pass.
    """

    def loss_fn(params):
        logits, _, model_state = model.apply(params, net.model_state, x, True)
        return cross_entropy(logits, y, mask), (logits, model_state)

    if optimizer == "sgd":
        # Plain SGD, w <- w - lr * grad, with the learning rate applied to the loss's
        # cotangent (a [N, C] array) rather than to the gradient: the update is then
        # ``w + dot(h^T, delta)``, which XLA fuses into the weight-gradient matmul (on GPU a
        # GEMM with beta = 1), so each weight is read and written once per step and the
        # gradient is never materialised. Same rule as optax.sgd up to rounding order
        # (``sgd_optax`` keeps the optax path; tests compare the two).
        def scaled(params):
            loss, aux = loss_fn(params)
            return -lr * loss, (loss, aux)

        (_, (loss, (logits, model_state))), steps = jax.value_and_grad(scaled, has_aux=True)(
            net.params)
        params = jax.tree.map(lambda p, d: p + d, net.params, steps)
        return NetState(params, model_state, net.opt_state), loss, logits
    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(net.params)
    tx = optim.build(optimizer, lr)
    updates, opt_state = tx.update(grads, net.opt_state, net.params)
    params = jax.tree.map(lambda p, u: p + u, net.params, updates)
    return NetState(params, model_state, opt_state), loss, logits


def predict_logits(model: Model, net: NetState, x: Array) -> Array:
    """Evaluation-mode logits [N, C]."""
    return model.apply(net.params, net.model_state, x, False)[0]
