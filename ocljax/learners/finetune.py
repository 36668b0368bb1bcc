"""Finetune (a.k.a. Naive / SGD): plain sequential training on the stream, no memory.

The lower bound of every continual-learning comparison (e.g. Lopez-Paz & Ranzato 2017,
"Gradient Episodic Memory for Continual Learning", Sec. 5 "single"; Mai et al. 2022, "Online
continual learning in image classification: an empirical survey", the "finetune" baseline).
Trained on an i.i.d. stream it is the joint-training upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ocljax import optim
from ocljax.learners.supervised import (
    NetState,
    cross_entropy_step,
    init_net,
    net_learner,
    online_logits,
)
from ocljax.types import Batch, Learner, Model


@dataclass(frozen=True)
class Config:
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1


State = NetState


def make(model: Model, cfg: Config | None = None) -> Learner:
    """Finetune learner for ``model``: one optimizer step per incoming batch."""
    cfg = cfg or Config()
    optim.check(cfg.optimizer)

    def init(key, x, hp: HParams) -> State:
        return init_net(model, cfg.optimizer, key, x, hp.lr)

    def update(state: State, batch: Batch, hp: HParams, key):
        del key
        state, loss, logits = cross_entropy_step(
            model, cfg.optimizer, state, batch.x, batch.y, None, hp.lr
        )
        return state, {"loss": loss, "stream_logits": online_logits(state, logits)}

    return net_learner(model, init, update, HParams())
