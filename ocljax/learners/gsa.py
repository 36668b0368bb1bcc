"""GSA: gradient self-adaptation against cross-task class discrimination.

Guo, Liu & Zhao 2023, "Dealing with Cross-Task Class Discrimination in Online Continual
Learning" (CVPR 2023); authors' code ``gydpku/GSA`` (``GSA_CVPR/test_cifar100.py``, the first
upload cafd44e, the version that runs; later edits break it). The paper's point: replay trains
new classes against old ones only through the few memory rows, so the gradients that separate
classes of different tasks are unbalanced. GSA therefore trains the incoming data on the current
task's classes alone and re-weights each memory row's cross-entropy by a per-class statistic of
the gradients the memory has produced so far. Each step, with ``t`` the current task:

1. **New data.** The incoming rows plus up to ``current_replay`` (22) memory rows of task ``t``
   (none at a task's first batch) are augmented (``augment``: the code's SimCLR-style
   grayscale, p 0.2, and resized crop, area 0.6-1), joined by a horizontally flipped copy of
   each (``flip_copy``; the code's ``RandomFlip(x, 2)``, same labels), augmented once more, and
   scored by cross-entropy over the classes of task ``t`` only (``L_new``).
2. **Memory batch.** With ``rate = |classes of t| / |classes seen|``: ``int(64 (1 - rate))``
   rows drawn from the memory's other tasks, and the first ``int(64 rate)`` of the un-augmented
   incoming-plus-current rows of step 1 (``memory_batch`` = 64). These rows are augmented once
   and joined by their flipped copies.
3. **Gradient statistics** (``accumulate``): from the detached softmax ``p`` of the memory batch
   over the classes seen, running sums per class ``k`` from the start of the run, never
   decayed: ``count_k`` (rows labelled k), ``pos_k = sum_{y=k} p_k`` and
   ``neg_k = sum_{y!=k} p_k``. ``count_k - pos_k`` is the total size of the positive gradient
   the cross-entropy has pushed into logit k (``1 - p_k`` per row), ``neg_k`` that of the
   negative gradient (``p_k`` per row of another class).
4. **Self-adaptive weights** (``class_weights``): ``ANT_k = (count_k - pos_k) / neg_k`` and a
   row of class ``y`` weighs ``2 / (1 + exp(1 - ANT_y))`` (1 at balance, in (0, 2)); for the
   first 5 steps of every task all weights are 1. The loss on the memory batch is
   ``L_buf = -sum_i w_i log p_i(y_i) / n`` over the classes seen, weights constant.
5. One Adam step (betas 0.9 / 0.99, PyTorch's coupled weight decay 1e-4, lr 1e-3: the code's)
   on ``2 L_buf + L_new``; the incoming batch enters the reservoir (deferred to the next step,
   as in ER), each row with its task id. While the memory is empty only ``L_new`` is trained.

GSA is a class-incremental method: on streams whose every task holds every class (permuted,
rotated) the share of current classes is 1, the memory batch holds no earlier task's rows, and
the method reduces to training on the current task; ``stream_note`` warns.

Prediction is the network's classifier over the classes seen so far (the code's head grows
with each task, so later tasks' classes do not exist yet; here they get a -1e9 logit).

Deviations from the code:

- The head is one Linear layer over every class, trained throughout. The code's
  ``change_output_dim`` swaps in a new head at each task, but the Adam optimizer was built once
  over the first head, so from the second task on the code never updates its classifier (the
  old classes' rows stay at their task-0 values, the new ones at random initialisation). We
  read that as an accident and train the head as the paper describes.
- "The classes of task t" are those seen in task ``t`` so far, and the softmax of step 3 is
  over the classes seen so far; the code slices its head by the task's known class count, so
  it includes a task's classes before their first row arrives. On split streams both classes
  of a task appear in its first batches.
  One consequence: Adam with coupled weight decay shrinks the head rows of classes not seen
  yet (no loss gradient reaches them), so a new class starts from small weights, where the
  code's grown head starts it from a fresh initialisation.
- A class with no negative mass yet (``neg_k = 0``) weighs 1; the code divides by zero.
- Rows a loss leaves out (current-task rows the memory does not have, memory slots beyond
  ``int(64 (1 - rate))``) are copies of incoming rows, so BatchNorm's batch statistics see only
  real data; the code's batches are shorter instead. With BatchNorm the new rows and the memory
  rows are normalised in two forward passes, as in the code; without it one pass serves both.
- The code's unused computations (a supervised contrastive loss, a KL term, the stored
  features, extra training-mode forwards) are left out; they change only BatchNorm running
  statistics. Apex AMP (half precision with loss scaling) is not used.
- The code has a CIFAR-100 script only: 10 tasks, a full-width ResNet-18 (``nf`` 64 whatever
  its argument says; the project's reduced ResNet-18 defaults to 20, ``--set width=64``). The
  MNIST settings here are its settings on the project's MLP; on 1-channel images the
  grayscale is a no-op, and on permuted streams the crop and the flipped copy are dropped
  (they move permuted pixels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax import augment as aug
from ocljax.errors import ConfigError, require_positive
from ocljax.learners import er
from ocljax.learners.ocm import check_optimizer, optimizer, optimizer_step
from ocljax.learners.supervised import NetState, net_features
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model, identity_prepare_eval

__all__ = ["Config", "HParams", "State", "Stats", "WARMUP", "accumulate", "check_config",
           "class_weights", "fit_to_stream", "make", "requires_boundaries", "stream_note"]

TASK_FREE_HINT = "use er_ace (cross-entropy on the incoming classes, task-free) or er"
WARMUP = 5  # steps of each task with all memory weights 1 (the code's batch_idx < 5)
UNSEEN = -1e9  # logit of a class not seen yet


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    memory_batch: int = 64  # the code's buffer_batch_size
    current_replay: int = 22  # memory rows of the current task joined to the incoming rows
    augment: str = "gray20,rrc60"  # the code's simclr_aug (ocljax.augment spec)
    flip_copy: bool = True  # join a horizontally flipped copy of every row (RandomFlip(x, 2))
    optimizer: str = "adam"  # "adam" (the code's, betas 0.9 / adam_b2) | "sgd"
    adam_b2: float = 0.99
    weight_decay: float = 1e-4  # PyTorch's coupled L2: weight_decay * w added to the gradient


class HParams(NamedTuple):
    lr: float = 1e-3
    buffer_weight: float = 2.0  # weight of L_buf (the code's 2 * loss_n)


class Stats(NamedTuple):
    """Running per-class sums over every memory batch so far (module docstring, step 3)."""

    count: Array  # [C] rows labelled k
    pos: Array  # [C] sum of p_k over rows labelled k
    neg: Array  # [C] sum of p_k over rows of other classes


class State(NamedTuple):
    net: NetState
    buffer: reservoir.ReservoirState  # data = {"x", "y", "task"}
    pending: dict
    pending_valid: Array  # [B] bool
    stats: Stats
    seen: Array  # [C] bool, classes seen so far
    current: Array  # [C] bool, classes seen in the current task
    task_step: Array  # [] int32, steps since the task began


def requires_boundaries(cfg: Config) -> bool:
    """The new-data loss is over the current task's classes and the memory batch is split by
    task: always True."""
    del cfg
    return True


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes or unknown choices."""
    require_positive(cfg, "buffer_size", "memory_batch")
    if cfg.current_replay < 0:
        raise ConfigError(f"current_replay must be >= 0, got {cfg.current_replay}")
    for field in ("memory_batch", "current_replay"):
        if getattr(cfg, field) > cfg.buffer_size:
            raise ConfigError(f"{field}={getattr(cfg, field)} rows cannot be drawn without "
                              f"replacement from a buffer of {cfg.buffer_size}")
    aug.parse(cfg.augment)
    check_optimizer(cfg)


def fit_to_stream(cfg: Config, stream_cfg, explicit: set[str]):
    """On a permuted stream the flipped copy mirrors pixel permutations, not images: it is
    dropped unless ``flip_copy`` was set explicitly (the crop is dropped by the command line's
    ``fit_augment_to_stream``). Returns ``(cfg, note or None)``."""
    if getattr(stream_cfg, "kind", None) != "permuted" or "flip_copy" in explicit \
            or not cfg.flip_copy:
        return cfg, None
    return dataclasses.replace(cfg, flip_copy=False), (
        "gsa: flip_copy True -> False on this permuted stream (a mirrored permutation is not "
        "a view of the image)")


def stream_note(cfg, stream) -> str | None:
    """A warning for permuted and rotated streams (``stream`` a ``StreamConfig``), where every
    task holds every class: the share of current classes is 1, so the memory batch holds no
    earlier task's rows and GSA trains on the current task alone (10-task permuted MNIST: GSA
    0.695, finetune 0.687, ER 0.797)."""
    del cfg
    if stream.kind not in ("permuted", "rotated"):
        return None
    return ("every task of a permuted or rotated stream holds every class, so GSA's memory batch "
            "(split by the share of the current task's classes) holds no earlier task's rows "
            "and GSA reduces to training on the current task (10-task permuted MNIST: GSA 0.695, "
            "finetune 0.687, ER 0.797); GSA is a class-incremental method")


def accumulate(stats: Stats, logits: Array, y: Array, valid: Array, seen: Array) -> Stats:
    """``stats`` plus the sums of one memory batch (module docstring, step 3): ``logits``
    [N, C] of rows labelled ``y`` [N], counted where ``valid`` [N], softmax over ``seen`` [C]
    classes, detached."""
    p = jax.lax.stop_gradient(jax.nn.softmax(jnp.where(seen, logits, UNSEEN), axis=-1))
    p = jnp.where(valid[:, None], p, 0.0)
    hot = jax.nn.one_hot(y, logits.shape[-1]) * valid[:, None]
    return Stats(count=stats.count + hot.sum(0), pos=stats.pos + (hot * p).sum(0),
                 neg=stats.neg + ((1.0 - hot) * p).sum(0))


def class_weights(stats: Stats) -> Array:
    """Per-class memory weights [C] (module docstring, step 4): ``2 / (1 + exp(1 - ANT_k))``
    with ``ANT_k = (count_k - pos_k) / neg_k``, the accumulated positive over negative gradient
    size of logit k; 1 for a class with no negative mass yet."""
    has = stats.neg > 0
    ant = (stats.count - stats.pos) / jnp.where(has, stats.neg, 1.0)
    return jnp.where(has, 2.0 / (1.0 + jnp.exp(1.0 - ant)), 1.0)


def select_rows(buffer, key, n: int, usable: Array) -> tuple[dict, Array]:
    """``n`` memory rows drawn uniformly without replacement among the stored rows where
    ``usable`` [cap]; ``(rows, mask [n])``, the valid rows first."""
    stored = jnp.arange(reservoir.capacity(buffer)) < reservoir.size(buffer)
    idx, mask = reservoir.subset_indices(key, stored & usable, n)
    return jax.tree.map(lambda a: a[idx], buffer.data), mask


def make(model: Model, cfg: Config | None = None) -> Learner:
    """GSA learner: current-task cross-entropy on incoming rows, self-adaptively weighted
    cross-entropy on a task-split memory batch, Adam."""
    cfg = cfg or Config()
    check_config(cfg)
    C = model.num_classes
    copies = 2 if cfg.flip_copy else 1

    def views(key, x):
        """One augmentation of every row, then its flipped copy: [copies N, ...]."""
        a = aug.augment(key, x, cfg.augment)
        return jnp.concatenate([a, a[:, :, ::-1]]) if cfg.flip_copy else a

    def init(key, x, hp: HParams) -> State:
        params, model_state = model.init(key, x)
        n = x.shape[0]
        example = {"x": x, "y": jnp.zeros((n,), jnp.int32), "task": jnp.zeros((n,), jnp.int32)}
        zeros = jnp.zeros((C,), jnp.float32)
        return State(net=NetState(params, model_state, optimizer(cfg, hp.lr).init(params)),
                     buffer=reservoir.init(cfg.buffer_size, example),
                     pending=jax.tree.map(jnp.zeros_like, example),
                     pending_valid=jnp.zeros((n,), bool), stats=Stats(zeros, zeros, zeros),
                     seen=jnp.zeros((C,), bool), current=jnp.zeros((C,), bool),
                     task_step=jnp.zeros((), jnp.int32))

    def update(state: State, batch: Batch, hp: HParams, key):
        """Write the pending batch, build the two row sets, one step (module docstring)."""
        k_write, k_cur, k_past, k_a1, k_a2, k_m = jax.random.split(key, 6)
        state = er.flush(state, k_write, batch.fresh)
        seen_before = state.seen
        task_step = jnp.where(batch.boundary, 0, state.task_step)
        present = (jax.nn.one_hot(batch.y, C) > 0).any(0)
        seen = state.seen | present
        current = jnp.where(batch.boundary, False, state.current) | present
        b = batch.y.shape[0]
        task = jnp.full((b,), batch.task, jnp.int32)
        stream = {"x": batch.x, "y": batch.y, "task": task}
        stored_task = state.buffer.data["task"]
        has_memory = reservoir.size(state.buffer) > 0
        # step 1: incoming rows and the current task's memory rows (none at a task's start)
        cur, cur_mask = select_rows(state.buffer, k_cur, cfg.current_replay,
                                    stored_task == batch.task)
        cur_mask = cur_mask & (task_step > 0)  # as the code; with the deferred write a task's
        # first step finds none of its rows in memory anyway, unless its task id recurs
        # rows left out of a loss are copies of incoming rows (er.with_filler), so that only
        # real data reaches BatchNorm's batch statistics
        cur = er.with_filler(cur, cur_mask, stream)
        joined = jax.tree.map(lambda a, c: jnp.concatenate([a, c]), stream, cur)
        joined_valid = jnp.concatenate([jnp.ones((b,), bool), cur_mask])  # a valid prefix
        new_x = aug.augment(k_a2, views(k_a1, joined["x"]), cfg.augment)
        new_y = jnp.tile(joined["y"], copies)
        new_valid = jnp.tile(joined_valid, copies)
        # step 2: the memory batch, split between the other tasks and the current rows
        rate = current.sum() / seen.sum()
        n_past = jnp.floor(cfg.memory_batch * (1.0 - rate)).astype(jnp.int32)
        n_cur = jnp.floor(cfg.memory_batch * rate).astype(jnp.int32)
        past, past_mask = select_rows(state.buffer, k_past, cfg.memory_batch,
                                      stored_task != batch.task)
        past_mask = past_mask & (jnp.arange(cfg.memory_batch) < n_past)
        past = er.with_filler(past, past_mask, stream)
        mem_rows = jax.tree.map(lambda a, c: jnp.concatenate([a, c]), past, joined)
        mem_valid = jnp.concatenate([past_mask,
                                     joined_valid & (jnp.arange(joined_valid.shape[0]) < n_cur)])
        mem_valid = mem_valid & has_memory  # the code trains L_new alone on an empty memory
        mem_x = views(k_m, mem_rows["x"])
        mem_y = jnp.tile(mem_rows["y"], copies)
        mem_valid = jnp.tile(mem_valid, copies)
        n_new, n_mem = new_x.shape[0], mem_x.shape[0]
        warm = task_step < WARMUP
        model_state = state.net.model_state
        stateless = not jax.tree.leaves(model_state)

        def forward(params):
            """``(new-row logits, memory logits, incoming logits or None, model state)``.
            Without model state one pass serves all (and gives the online logits); with
            BatchNorm the new and the memory rows are two training-mode passes, as in the code,
            and the memory pass counts only when there is a memory."""
            if stateless:
                x_all = jnp.concatenate([new_x, mem_x, batch.x])
                logits, _, ms = model.apply(params, model_state, x_all, True)
                return logits[:n_new], logits[n_new:n_new + n_mem], logits[-b:], ms
            new_logits, _, ms = model.apply(params, model_state, new_x, True)
            mem_logits, _, ms_mem = model.apply(params, ms, mem_x, True)
            ms = jax.tree.map(lambda a, c: jnp.where(has_memory, a, c), ms_mem, ms)
            return new_logits, mem_logits, None, ms

        def loss_fn(params):
            new_logits, mem_logits, stream_logits, ms = forward(params)
            logp_new = jax.nn.log_softmax(jnp.where(current, new_logits, UNSEEN), axis=-1)
            ce_rows = -jnp.take_along_axis(logp_new, new_y[:, None], axis=-1)[:, 0]
            l_new = jnp.where(new_valid, ce_rows, 0.0).sum() / jnp.maximum(new_valid.sum(), 1)
            stats = accumulate(state.stats, mem_logits, mem_y, mem_valid, seen)
            w = jnp.where(warm, 1.0, class_weights(stats)[mem_y])
            logp = jax.nn.log_softmax(jnp.where(seen, mem_logits, UNSEEN), axis=-1)
            mem_rows_ce = -jnp.take_along_axis(logp, mem_y[:, None], axis=-1)[:, 0]
            l_buf = jnp.where(mem_valid, w * mem_rows_ce, 0.0).sum() \
                / jnp.maximum(mem_valid.sum(), 1)
            loss = hp.buffer_weight * l_buf + l_new
            return loss, (stats, stream_logits, ms)

        net, loss, (stats, stream_logits) = optimizer_step(cfg, state.net, loss_fn, hp.lr)
        state = state._replace(net=net, stats=stats, seen=seen, current=current,
                               task_step=task_step + 1)
        state = er.hold(state, stream, batch.fresh)
        # online accuracy: the pre-update learner, which had not seen this batch's new classes
        # (logits only without model state, where the training forward is the evaluation one)
        logits = None if stream_logits is None else jnp.where(seen_before, stream_logits,
                                                             UNSEEN)
        return state, {"loss": loss, "stream_logits": logits}

    def predict(state: State, x, hp):
        del hp
        logits = model.apply(state.net.params, state.net.model_state, x, False)[0]
        return jnp.where(state.seen, logits, UNSEEN)

    return Learner(init, update, predict, identity_prepare_eval, HParams(),
                   features=net_features(model))
