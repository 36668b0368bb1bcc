"""Adversarial Shapley value Experience Replay (ASER): ER whose memory reads and writes are
ranked by KNN Shapley values in the network's feature space.

Shim et al. 2021, "Online Class-Incremental Continual Learning with Adversarial Shapley Value"
(AAAI 2021, arXiv:2009.00093v4): the method's KNN Shapley value (the closed form of Jia et al.
2019, "Efficient Task-Specific Data Valuation for Nearest Neighbor Algorithms", Theorem 1),
the adversarial score ASV and its mean variant ASV_mu used for retrieval, and the Shapley-value
memory update of its algorithm. Checked against the authors' code (``RaptorMai/online-continual-
learning``: ``utils/buffer/aser_retrieve.py``, ``aser_update.py``, ``aser_utils.py``,
``buffer_utils.py: ClassBalancedRandomSampling``) and run with their command line's settings
(``--update ASER --retrieve ASER --aser_type asvm --n_smp_cls 1.5 --k 3``).

KNN Shapley value (``knn_shapley``). For one evaluation point (x, y) and N candidates sorted by
Euclidean distance to x in feature space (alpha_1 nearest), the value of each candidate to a
K-nearest-neighbour classifier is

    s(alpha_N) = 1[y_alpha_N = y] / N
    s(alpha_i) = s(alpha_i+1) + (1[y_alpha_i = y] - 1[y_alpha_i+1 = y]) / K * min(K, i) / i

so a near candidate of the point's own class scores high and a near candidate of another class
negative. Features are the network's penultimate features in evaluation mode.

Retrieval (each step, once the memory is full; uniform random rows before, as in the code):

1. candidates: ``int(n_smp_cls)`` rows of each class in memory, drawn at random;
2. ``sv_adv`` [B, N]: values of the candidates for the incoming batch as evaluation points;
   ``sv_coop`` [E, N]: for another class-balanced draw from memory (excluding the candidates);
3. the score (``aser_type``): ``asvm`` (default, ASV_mu) is ``mean_e sv_coop - mean_b sv_adv``,
   ``asv`` is ``max_e sv_coop - min_b sv_adv``, ``neg_sv`` is ``-sum_b sv_adv``. A high score
   marks a memory row that supports its own class's boundary among stored rows (cooperative)
   while lying close to incoming rows of other classes (adversarial): replaying it protects
   the old boundary where the new classes push on it;
4. the ``replay_batch`` best-scored candidates are replayed with the incoming batch, ER's loss.
   When there are fewer candidates (fewer classes in memory than ``replay_batch``), fewer rows
   are replayed, as in the code: the rest are masked out.

Memory update (``write``): while the memory has room, rows are appended (reservoir fill). Once
it is full, an evaluation set (a class-balanced draw of ``int(n_smp_cls)`` rows per class, plus
the incoming rows of *minority* classes, those holding less than a random fraction
``u ~ U(0, 1/C)`` of the memory) values a candidate set (``int(n_smp_cls * C)`` random memory
rows not in the evaluation set, plus the incoming rows) by the sum of KNN Shapley values. The
candidates are ranked; of the top ``n_memory_candidates`` places, those held by incoming rows
replace, pairwise in rank order, the memory candidates that fell below them.

Measured (split MNIST, MLP 784-256-256-10, buffer 1,000, batch 10 + 10, task-free, 5 seeds;
``python -m experiments.split_mnist --data-dir ../shared/data --learner aser``): final accuracy
0.862 +- 0.010 against ER's 0.909 +- 0.011. With ``memory_update="reservoir"`` (ASER reads
only) 0.911 +- 0.006; with ``retrieval="random"`` (ASER writes only) 0.846 +- 0.014. On this
stream the Shapley-value update lets each new task take over the memory: after the last task
(classes 8, 9) it holds 95 74 40 56 49 55 114 77 247 193 rows of classes 0-9, where the
reservoir holds 89-120 of each (one seed). With ten classes and ``n_smp_cls`` 1.5 the read
draws one candidate per class, so ``replay_batch`` 10 replays all of them: a class-balanced
read. The authors tuned these settings on CIFAR-100 and mini-ImageNet (100 classes).

Order of operations: as in ``er``, the write of batch t-1 happens at the start of step t, with
the network after step t-1 (the code writes after step t-1 with that same network); the reads
of step t use the network before step t (the code's read also precedes its step).

Deviations from the authors' code:

- Every read and write computes the ASER quantities and selects between them and the
  fill-phase behaviour with ``where`` (shapes are static inside ``lax.scan``); the results are
  those of the branch the code takes.
- A memory smaller than ``int(n_smp_cls * C)`` rows offers all of its rows outside the
  evaluation set as update candidates (the code's ``min(num_retrieve, len(valid))``); with no
  row left for the cooperative set, its term of the score is 0 (the code fails there).
- Exact ties between Shapley scores (common: they are small fractions) are broken by position;
  the code's ``argsort`` breaks them arbitrarily too.
- Candidate counts are fixed (``C * int(n_smp_cls)`` slots, masked where a class has fewer rows
  or is absent); masked candidates are neither ranked nor counted in N.
- ``retrieval="random"`` and ``memory_update="reservoir"`` switch either half off (the code's
  ``--retrieve random`` / ``--update random``), for ablations; a reservoir-updated memory is
  then ``er``'s uniform sample.
- ``replay_loss`` defaults to ``joint`` like ``er`` (one mean over incoming and replayed rows);
  the code's ER adds the two means (``--set replay_loss=sum``; see ``er``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ocljax.errors import ConfigError, unknown_choice
from ocljax.learners import er
from ocljax.learners.supervised import net_learner, online_logits
from ocljax.memory import reservoir
from ocljax.types import Array, Batch, Learner, Model

__all__ = ["ASER_TYPES", "MEMORY_UPDATES", "RETRIEVALS", "Config", "HParams", "State",
           "candidate_scores", "check_config", "class_balanced_indices", "knn_shapley", "make",
           "retrieve", "write"]

ASER_TYPES = ("asvm", "asv", "neg_sv")
RETRIEVALS = ("aser", "random")
MEMORY_UPDATES = ("aser", "reservoir")


@dataclass(frozen=True)
class Config:
    buffer_size: int = 1000
    replay_batch: int = 10
    k: int = 3  # neighbours of the KNN Shapley value (the authors' command line: --k 3)
    n_smp_cls: float = 1.5  # rows per class drawn for candidate / evaluation sets (int part)
    aser_type: str = "asvm"  # "asvm" (ASV_mu) | "asv" | "neg_sv"
    retrieval: str = "aser"  # "aser" | "random" (the code's --retrieve, for ablations)
    memory_update: str = "aser"  # "aser" | "reservoir" (the code's --update)
    optimizer: str = "sgd"
    replay_loss: str = "joint"  # as er.Config


class HParams(NamedTuple):
    lr: float = 0.1


State = er.State


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for impossible sizes or an unknown score type."""
    er.check_config(cfg)
    if cfg.k < 1:
        raise ConfigError(f"k (neighbours) must be >= 1, got {cfg.k}")
    if int(cfg.n_smp_cls) < 1:
        raise ConfigError(f"n_smp_cls must be >= 1 (its integer part is the rows drawn per "
                          f"class), got {cfg.n_smp_cls}")
    if cfg.aser_type not in ASER_TYPES:
        raise ConfigError(unknown_choice("aser_type", cfg.aser_type, ASER_TYPES))
    if cfg.retrieval not in RETRIEVALS:
        raise ConfigError(unknown_choice("retrieval", cfg.retrieval, RETRIEVALS))
    if cfg.memory_update not in MEMORY_UPDATES:
        raise ConfigError(unknown_choice("memory_update", cfg.memory_update, MEMORY_UPDATES))


def knn_shapley(eval_f: Array, eval_y: Array, eval_mask: Array, cand_f: Array, cand_y: Array,
                cand_mask: Array, k: int) -> Array:
    """KNN Shapley values [E, N] of candidates (``cand_f`` [N, F], labels, mask) for each
    evaluation point (``eval_f`` [E, F], labels, mask): Jia et al. 2019, Theorem 1 (module
    docstring). Masked candidates are left out (N counts valid ones) and get 0; masked
    evaluation rows are all 0."""
    eval_f, cand_f = eval_f.astype(jnp.float32), cand_f.astype(jnp.float32)
    n = cand_f.shape[0]
    d2 = ((eval_f[:, None, :] - cand_f[None, :, :]) ** 2).sum(-1)  # [E, N]
    d2 = jnp.where(cand_mask[None, :], d2, jnp.inf)
    order = jnp.argsort(d2, axis=1)  # valid candidates first, nearest first
    n_valid = cand_mask.sum()
    pos = jnp.arange(1, n + 1)  # 1-based rank i
    inside = pos <= n_valid
    match = (cand_y[order] == eval_y[:, None]) & inside[None, :]
    match = match.astype(jnp.float32)
    following = jnp.concatenate([match[:, 1:], jnp.zeros_like(match[:, :1])], axis=1)
    factor = jnp.where(pos < n_valid, jnp.minimum(pos, k) / (pos * k),
                       jnp.where(pos == n_valid, 1.0 / jnp.maximum(n_valid, 1), 0.0))
    sorted_sv = jnp.cumsum(((match - following) * factor)[:, ::-1], axis=1)[:, ::-1]
    sv = jnp.zeros_like(sorted_sv).at[jnp.arange(order.shape[0])[:, None], order].set(sorted_sv)
    return jnp.where(eval_mask[:, None] & cand_mask[None, :], sv, 0.0)


def class_balanced_indices(key: Array, labels: Array, usable: Array, num_classes: int,
                           per_class: int) -> tuple[Array, Array]:
    """Up to ``per_class`` rows of each class drawn at random without replacement from rows
    where ``usable`` [M]: ``(indices [C * per_class], mask)``, class c in slots
    ``c * per_class ...``; a class with fewer usable rows fills fewer slots."""
    m = labels.shape[0]
    u = jax.random.uniform(key, (m,))
    group = jnp.where(usable, labels, num_classes)
    order = jnp.lexsort((u, group))  # by class, then at random within it
    start = jnp.searchsorted(group[order], jnp.arange(num_classes))  # first row of each class
    count = jnp.bincount(group, length=num_classes + 1)[:num_classes]
    r = jnp.arange(per_class)
    slot = jnp.minimum(start[:, None] + r[None, :], m - 1)
    return order[slot].reshape(-1), (r[None, :] < count[:, None]).reshape(-1)


def candidate_scores(aser_type: str, sv_adv: Array, adv_mask: Array, sv_coop: Array,
                     coop_mask: Array) -> Array:
    """Retrieval score [N] of each candidate from its KNN Shapley values for the incoming rows
    (``sv_adv`` [B, N], ``adv_mask`` [B]) and for the cooperative evaluation rows (``sv_coop``
    [E, N], ``coop_mask`` [E]): ``asvm`` mean minus mean, ``asv`` max minus min, ``neg_sv``
    minus the sum over incoming rows (module docstring, retrieval step 3)."""
    a, c = adv_mask[:, None], coop_mask[:, None]
    if aser_type == "neg_sv":
        return -jnp.where(a, sv_adv, 0.0).sum(0)
    if aser_type == "asv":  # no cooperative rows (every memory row is a candidate): 0
        coop = jnp.where(coop_mask.any(), jnp.where(c, sv_coop, -jnp.inf).max(0), 0.0)
        return coop - jnp.where(a, sv_adv, jnp.inf).min(0)
    mean = lambda sv, w: jnp.where(w, sv, 0.0).sum(0) / jnp.maximum(w.sum(), 1)  # noqa: E731
    return mean(sv_coop, c) - mean(sv_adv, a)


def make(model: Model, cfg: Config | None = None) -> Learner:
    """ASER learner for ``model``: ER with Shapley-value retrieval and memory update."""
    cfg = cfg or Config()
    check_config(cfg)
    C = model.num_classes

    def feats(net, x):
        return jax.lax.stop_gradient(model.apply(net.params, net.model_state, x, False)[1])

    def update(state: State, batch: Batch, hp: HParams, key):
        """Write the pending batch (ASER update), read by ASER score, one ER step."""
        k_write, k_read = jax.random.split(key)
        add = partial(write, cfg, C, partial(feats, state.net)) \
            if cfg.memory_update == "aser" else reservoir.add
        state = er.flush(state, k_write, batch.fresh, add=add)
        stream = {"x": batch.x, "y": batch.y}
        replay, replay_mask = retrieve(cfg, C, partial(feats, state.net), state.buffer, k_read,
                                       stream)
        net, loss, logits = er.replay_step(model, cfg, state.net, stream, replay, replay_mask,
                                           hp.lr)
        state = er.hold(state._replace(net=net), stream, batch.fresh)
        return state, {"loss": loss,
                       "stream_logits": online_logits(net, logits[:batch.y.shape[0]])}

    return net_learner(model, partial(er.init_state, model, cfg), update, HParams())


def retrieve(cfg: Config, num_classes: int, features, buffer: reservoir.ReservoirState,
             key: Array, stream: dict) -> tuple[dict, Array]:
    """ASER's read: ``(rows, mask [replay_batch])``, the best-scored class-balanced memory
    candidates for the incoming ``stream`` rows once the memory is full, uniform random rows
    (``er.replay_rows``) before (module docstring), and always with ``retrieval="random"``.
    Masked rows are copies of stream rows."""
    C, per_class = num_classes, int(cfg.n_smp_cls)
    k_rand, k_cand, k_coop = jax.random.split(key, 3)
    random_rows, random_mask = er.replay_rows(buffer, k_rand, cfg.replay_batch, stream)
    if cfg.retrieval == "random":
        return random_rows, random_mask
    labels, cap = buffer.data["y"], reservoir.capacity(buffer)
    filled = jnp.arange(cap) < reservoir.size(buffer)
    cand, cand_mask = class_balanced_indices(k_cand, labels, filled, C, per_class)
    taken = jnp.zeros((cap,), bool).at[cand].max(cand_mask)
    coop, coop_mask = class_balanced_indices(k_coop, labels, filled & ~taken, C, per_class)
    f = features(jnp.concatenate([stream["x"], buffer.data["x"][cand], buffer.data["x"][coop]]))
    b, nc = stream["y"].shape[0], cand.shape[0]
    f_stream, f_cand, f_coop = f[:b], f[b:b + nc], f[b + nc:]
    cand_y = labels[cand]
    every = jnp.ones((b,), bool)
    sv_adv = knn_shapley(f_stream, stream["y"], every, f_cand, cand_y, cand_mask, cfg.k)
    sv_coop = knn_shapley(f_coop, labels[coop], coop_mask, f_cand, cand_y, cand_mask, cfg.k)
    score = candidate_scores(cfg.aser_type, sv_adv, every, sv_coop, coop_mask)
    r = min(cfg.replay_batch, nc)
    top_score, top = jax.lax.top_k(jnp.where(cand_mask, score, -jnp.inf), r)
    pad = cfg.replay_batch - r
    idx = jnp.concatenate([cand[top], jnp.zeros((pad,), cand.dtype)])
    mask = jnp.concatenate([jnp.isfinite(top_score) & cand_mask[top], jnp.zeros((pad,), bool)])
    aser_rows = er.with_filler(jax.tree.map(lambda a: a[idx], buffer.data), mask, stream)
    full = buffer.n_seen > cap  # the code reads at random while n_seen <= mem_size
    choose = lambda a_, r_: jnp.where(full, a_, r_)  # noqa: E731
    return jax.tree.map(choose, aser_rows, random_rows), choose(mask, random_mask)


def write(cfg: Config, num_classes: int, features, buffer: reservoir.ReservoirState,
          items: dict, key: Array, valid: Array) -> reservoir.ReservoirState:
    """ASER's memory update of ``buffer`` with ``items`` ({"x", "y"} [B, ...]) where ``valid``:
    rows that fit are appended; the rest compete with memory rows by KNN Shapley value (module
    docstring). ``features(x) -> [N, F]`` embeds rows. After the first three arguments it takes
    ``reservoir.add``'s (``er.flush``'s ``add``)."""
    k_fill, k_threshold, k_eval, k_cand = jax.random.split(key, 4)
    cap = reservoir.capacity(buffer)
    position = buffer.n_seen + jnp.cumsum(valid.astype(jnp.int32)) - 1
    fits = valid & (position < cap)
    rest = valid & ~fits
    buffer = reservoir.add(buffer, items, k_fill, fits)  # appended in order while there is room
    labels = buffer.data["y"]
    b = items["y"].shape[0]
    per_class, n_total = int(cfg.n_smp_cls), int(cfg.n_smp_cls * num_classes)
    everything = jnp.ones((cap,), bool)  # the memory is full whenever ``rest`` has rows
    share = jnp.bincount(labels, length=num_classes) / cap
    threshold = jax.random.uniform(k_threshold, (), maxval=1.0 / num_classes)
    minority = rest & (share[items["y"]] < threshold)
    ev, ev_mask = class_balanced_indices(k_eval, labels, everything, num_classes, per_class)
    taken = jnp.zeros((cap,), bool).at[ev].max(ev_mask)
    cand, cand_mask = reservoir.subset_indices(k_cand, ~taken, min(n_total, cap))
    n_total = cand.shape[0]
    f = features(jnp.concatenate([buffer.data["x"][ev], buffer.data["x"][cand], items["x"]]))
    ne = ev.shape[0]
    f_ev, f_cand, f_new = f[:ne], f[ne:ne + n_total], f[ne + n_total:]
    sv = knn_shapley(
        jnp.concatenate([f_ev, f_new]), jnp.concatenate([labels[ev], items["y"]]),
        jnp.concatenate([ev_mask, minority]),
        jnp.concatenate([f_cand, f_new]), jnp.concatenate([labels[cand], items["y"]]),
        jnp.concatenate([cand_mask, rest]), cfg.k).sum(0)  # [n_total + B]
    in_set = jnp.concatenate([cand_mask, rest])
    is_new = jnp.arange(n_total + b) >= n_total
    order = jnp.argsort(jnp.where(in_set, -sv, jnp.inf))  # best first, absent ones last
    kept = jnp.arange(n_total + b) < cand_mask.sum()  # the top n_memory_candidates places
    s_new, s_in = is_new[order], in_set[order]
    new_kept = s_new & s_in & kept  # incoming rows that make the cut
    old_dropped = ~s_new & s_in & ~kept  # memory candidates that fall out of it
    pair_new = jnp.cumsum(new_kept) - 1
    pair_old = jnp.cumsum(old_dropped) - 1
    slot_of_pair = jnp.full((b,), cap).at[jnp.where(old_dropped, pair_old, b)].set(
        cand[jnp.minimum(order, n_total - 1)], mode="drop")
    slot_sorted = jnp.where(new_kept, slot_of_pair[jnp.clip(pair_new, 0, b - 1)], cap)
    slots = jnp.full((b,), cap).at[jnp.where(new_kept, order - n_total, b)].set(
        slot_sorted, mode="drop")
    data = jax.tree.map(lambda buf, new: buf.at[slots].set(new, mode="drop"), buffer.data, items)
    return reservoir.ReservoirState(data=data,
                                    n_seen=buffer.n_seen + rest.sum(dtype=jnp.int32))
