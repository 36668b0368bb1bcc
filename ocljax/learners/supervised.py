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

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(net.params)
    tx = optim.build(optimizer, lr)
    updates, opt_state = tx.update(grads, net.opt_state, net.params)
    params = jax.tree.map(lambda p, u: p + u, net.params, updates)
    return NetState(params, model_state, opt_state), loss, logits


def predict_logits(model: Model, net: NetState, x: Array) -> Array:
    """Evaluation-mode logits [N, C]."""
    return model.apply(net.params, net.model_state, x, False)[0]
