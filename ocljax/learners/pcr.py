"""Proxy-based Contrastive Replay (PCR): a contrastive loss whose contrast set is the proxies
(classifier weights) of the classes in the training batch, counted once per sample.

Lin et al. 2023, "PCR: Proxy-based Contrastive Replay for Online Class-Incremental Continual
Learning" (CVPR 2023, arXiv:2304.04408): the PCR loss of its method section, checked against
the authors' code (``FelixHuiweiLin/PCR``: ``agents/pcr.py``, ``utils/loss.py: SupConLoss`` in
its ``contrast_mode='proxy'``, ``models/resnet.py: cosLinear``). The paper's analysis contrasts
two ways to replay: a softmax over *all* class proxies (biased toward new classes, because
every old-class proxy is pushed away by every new sample) and a contrastive loss over the
samples of the batch (unstable with few samples). PCR keeps the anchor-to-proxy
similarities of the first and picks them as the second picks its pairs: anchor i is contrasted
with the proxy of each sample j of the same batch. Each step:

1. the incoming batch and ``replay_batch`` rows drawn at random from a reservoir memory are
   concatenated, and the combined batch is taken twice: as it is and augmented (one pass of
   ``2 (B + R)`` rows through the network's ``features``);
2. with ``z_i`` the L2-normalised features of row i, ``w_c`` the L2-normalised proxy of class
   ``c`` (a bias-free weight matrix [C, F] trained with the network, the code's ``cosLinear``)
   and ``s_ic = z_i . w_c / temperature``, the loss (``pcr_loss``) is

       l_i = -log( exp(s_{i y_i}) / sum_j exp(s_{i y_j}) ),   j over all rows of the batch,

   averaged over rows. A class c enters the denominator ``n_c`` times, once per row of it in
   the batch (both views, incoming and replayed); a class with no row in the batch does not
   enter at all, so its proxy gets no gradient: replaying old classes is what keeps their
   proxies in the game, and new classes do not push absent old ones away;
3. one optimizer step on the network and the proxies together (``{"net": ..., "proxies":
   ...}`` in one parameter pytree, so ``gradient_step``'s fused SGD applies).

Prediction (``predict``, the authors' evaluation with ``pcrForward``): the cosine similarities
to every proxy divided by ``temperature``; the class is their argmax. The network's own linear
classifier is never trained (it gets no gradient) and never used.

As in the authors' code, no step is taken while the memory is empty (the first batch: there the
code multiplies its only loss term by zero). The training forward still runs, so BatchNorm's
running statistics see that batch, as in the code (its replay slots hold copies of the incoming
rows, ``er.replay_rows``: the same batch mean, a slightly different variance).

Deviations from the authors' code:

- The original and augmented views of stream and replay rows go through one forward pass (the
  code uses one pass for the incoming rows and one for the replayed rows); identical without
  BatchNorm, with BatchNorm the batch statistics are those of all rows together.
- The denominator is computed as ``log sum_c n_c exp(s_ic)`` over classes with their counts,
  an [M, C] computation instead of the code's [M, M] anchor-by-sample matrix: the same number.
  The code adds 1e-6 to the norms before dividing; here norms are floored at 1e-6.
- With ``--passes k`` (the code's ``mem_iters``) each pass draws its own augmentation; the code
  augments the incoming batch once and reuses it on every pass.
- Replayed rows that do not exist yet (memory smaller than ``replay_batch``) are masked out of
  anchors and of the denominator.
- Augmentation: the code's pipeline is SCR's (random resized crop scale 0.2-1, horizontal flip,
  colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2). For grayscale digits the default
  ``augment`` spec keeps SCR's milder crop (scale 0.5-1) and brightness/contrast jitter and
  drops the flip and colour-only steps; ``augment="rrc20,flip,jitter40"`` for colour images.

Defaults are the authors' command line (``general_main.py``): SGD ``lr`` 0.1, batch 10,
``replay_batch`` 10 (``--eps_mem_batch``), ``temperature`` 0.09 (``--pcr_temp``; also the
fixed scale of ``cosLinear``), one update per incoming batch (``--mem_iters 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax import augment as aug
from ocljax import optim
from ocljax.learners import er
from ocljax.learners.er_ncm import unit_rows
from ocljax.learners.supervised import (
    NetState,
    backbone_features,
    backbone_probe,
    gradient_step,
    online_logits,
)
from ocljax.types import Array, Batch, Learner, Model, identity_prepare_eval

__all__ = ["Config", "HParams", "State", "check_config", "cosine_logits", "init_proxies",
           "make", "pcr_loss", "unit_rows"]


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10  # rows replayed per step (the authors' --eps_mem_batch)
    augment: str = "rrc50,jitter40"  # ocljax.augment spec of the augmented view
    optimizer: str = "sgd"


class HParams(NamedTuple):
    lr: float = 0.1
    temperature: float = 0.09


State = er.State  # net (params {"net", "proxies"}), buffer, pending, pending_valid


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes, a bad augmentation spec or optimizer."""
    er.check_config(cfg)  # sizes and the optimizer name
    aug.parse(cfg.augment)


def init_proxies(key: Array, feature_dim: int, num_classes: int) -> Array:
    """Class proxies [C, F], uniform in +-1/sqrt(F): PyTorch's bias-free ``nn.Linear`` default,
    which the authors' ``cosLinear`` uses."""
    bound = 1.0 / jnp.sqrt(feature_dim)
    return jax.random.uniform(key, (num_classes, feature_dim), jnp.float32, -bound, bound)


def cosine_logits(features: Array, proxies: Array, temperature) -> Array:
    """``cos(features_i, proxies_c) / temperature`` [N, C] (the code's ``cosLinear``)."""
    return unit_rows(features) @ unit_rows(proxies).T / temperature


def pcr_loss(logits: Array, labels: Array, valid: Array) -> Array:
    """PCR's loss (module docstring, step 2) from ``logits`` [M, C] = ``cosine_logits`` of every
    row, ``labels`` [M] and ``valid`` [M] bool (rows that take part): for each valid row i,
    ``-s_{i y_i} + log sum_c n_c exp(s_ic)`` with ``n_c`` the number of valid rows of class c;
    the mean over valid rows. Classes with ``n_c = 0`` take no part (their logits get no
    gradient)."""
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[1]
    counts = (jax.nn.one_hot(labels, num_classes) * valid[:, None]).sum(0)  # [C]
    present = counts > 0
    # A large finite fill (not -inf) for absent classes keeps every gradient free of NaN.
    weighted = jnp.where(present, logits + jnp.log(jnp.maximum(counts, 1.0)), -1e9)
    log_denominator = jax.nn.logsumexp(weighted, axis=1)
    own = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    per_row = log_denominator - own
    return jnp.where(valid, per_row, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """PCR learner for ``model``: reservoir memory, proxy-contrastive training, cosine
    prediction with the trained proxies."""
    cfg = cfg or Config()
    check_config(cfg)
    C, F = model.num_classes, model.feature_dim

    features = backbone_features(model)

    def init(key, x, hp: HParams) -> State:
        params, model_state = model.init(key, x)  # same network as er's for the same key
        params = {"net": params, "proxies": init_proxies(jax.random.fold_in(key, 1), F, C)}
        net = NetState(params, model_state, optim.build(cfg.optimizer, hp.lr).init(params))
        return er.state_around(cfg, net, x)

    def update(state: State, batch: Batch, hp: HParams, key):
        """Write the pending batch, replay, one PCR step on (stream + replay) x 2 views."""
        k_write, k_read, k_aug = jax.random.split(key, 3)
        state, stream, x, y, valid = er.combined_rows(state, batch, k_write, k_read,
                                                      cfg.replay_batch)
        views = jnp.concatenate([x, aug.augment(k_aug, x, cfg.augment)])
        n_stream = batch.y.shape[0]
        train = valid[n_stream:].any()  # the authors' code steps only once the memory has rows

        def loss_fn(params, model_state):
            feats, model_state = features(params, model_state, views, True)
            logits = cosine_logits(feats, params["proxies"], hp.temperature)
            loss = pcr_loss(logits, jnp.tile(y, 2), jnp.tile(valid, 2))
            return jnp.where(train, loss, 0.0), (logits[:n_stream], model_state)

        net, loss, logits = gradient_step(cfg.optimizer, state.net, loss_fn, hp.lr)
        state = er.hold(state._replace(net=net), stream, batch.fresh)
        return state, {"loss": loss, "stream_logits": online_logits(net, logits)}

    def predict(state: State, x, hp: HParams) -> Array:
        """Cosine similarity to each proxy over ``temperature`` [N, C], evaluation mode."""
        feats, _ = features(state.net.params, state.net.model_state, x, False)
        return cosine_logits(feats, state.net.params["proxies"], hp.temperature)

    return Learner(init, update, predict, identity_prepare_eval, HParams(),
                   features=backbone_probe(model))
