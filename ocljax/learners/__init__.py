"""Learner registry: name -> module with ``Config``, ``HParams`` and ``make(model, cfg)``.

Modules are imported on first use, so ``python -m experiments.NAME --help`` stays fast and one
learner's import cost is paid only by runs that use it. Every registered learner is covered by
the contract suite in ``tests/test_learner_contract.py``.

A module that cannot run without the stream's task boundaries (``Batch.boundary``) defines
``requires_boundaries(cfg) -> bool`` (True for every config, or only for some settings, e.g.
A-GEM's per-task memory) and may define ``TASK_FREE_HINT``, a sentence naming its task-free
alternative; ``check_stream`` then refuses it on a ``--task-free`` stream with that message.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

from ocljax.errors import ConfigError, unknown_choice

# name -> (module under ocljax.learners, one-line description)
LEARNERS: dict[str, tuple[str, str]] = {
    "finetune": ("finetune", "plain SGD on the stream, no memory (lower bound)"),
    "er": ("er", "experience replay from a reservoir buffer"),
    "er_ncm": ("er_ncm", "ER with a nearest-class-mean classifier"),
    "er_ace": ("er_ace", "ER with asymmetric cross-entropy (Caccia et al. 2022)"),
    "er_aml": ("er_aml", "ER with an asymmetric metric loss on incoming rows (Caccia et al. 2022)"),
    "der": ("der", "dark experience replay: logit matching (Buzzega et al. 2020)"),
    "derpp": ("der", "DER++: logit matching plus label replay (Buzzega et al. 2020)"),
    "clser": ("clser", "plastic and stable EMA memories, consistency replay (Arani et al. 2022)"),
    "dvc": ("dvc", "dual view consistency, gradient-magnitude retrieval (Gu et al. 2022)"),
    "mir": ("mir", "maximally interfered retrieval (Aljundi et al. 2019)"),
    "aser": ("aser", "adversarial Shapley value retrieval and update (Shim et al. 2021)"),
    "gdumb": ("gdumb", "greedy balanced memory, retrain at evaluation (Prabhu et al. 2020)"),
    "gem": ("gem", "gradient episodic memory, QP projection (Lopez-Paz & Ranzato 2017)"),
    "agem": ("agem", "averaged gradient episodic memory (Chaudhry et al. 2019)"),
    "gss": ("gss", "gradient-based sample selection, greedy (Aljundi et al. 2019)"),
    "rar": ("rar", "retrospective adversarial replay (Kumari et al. 2022)"),
    "scr": ("scr", "supervised contrastive replay with NCM (Mai et al. 2021)"),
    "pcr": ("pcr", "proxy-based contrastive replay (Lin et al. 2023)"),
    "ocm": ("ocm", "mutual information via transformed-copy contrast (Guo et al. 2022)"),
    "onpro": ("onpro", "online prototype equilibrium and feedback on OCM (Wei et al. 2023)"),
    "gsa": ("gsa", "gradient self-adaptation for cross-task classes (Guo et al. 2023)"),
    "cope": ("cope", "continual prototype evolution, PPP loss (De Lange & Tuytelaars 2021)"),
    "icarl": ("icarl", "herding exemplars, distillation, NME (Rebuffi et al. 2017)"),
    "lwf": ("lwf", "learning without forgetting (Li & Hoiem 2016)"),
    "ewc_online": ("ewc_online", "online EWC / EWC++ (Schwarz et al. 2018)"),
    "mas": ("mas", "memory aware synapses, task-free (Aljundi et al. 2018, 2019)"),
    "blind": ("blind", "input-blind baseline: most frequent recent label (Hammoud et al. 2023)"),
}


class _Registry(Mapping):
    """Read-only ``name -> module`` mapping that imports a module the first time it is read.

    Modules that serve several names (``der`` serves ``der`` and ``derpp``) expose
    ``for_name(name)`` returning the module-like namespace for that name.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(LEARNERS)

    def __len__(self) -> int:
        return len(LEARNERS)

    def __getitem__(self, name: str) -> ModuleType:
        module = importlib.import_module(f"ocljax.learners.{LEARNERS[name][0]}")
        return module.for_name(name) if hasattr(module, "for_name") else module


REGISTRY: Mapping[str, ModuleType] = _Registry()


def get(name: str) -> ModuleType:
    """The learner module registered as ``name``; ``ConfigError`` listing choices otherwise."""
    if name not in LEARNERS:
        raise ConfigError(unknown_choice("learner", name, sorted(LEARNERS)))
    return REGISTRY[name]


def config_fields(name: str) -> dict[str, object]:
    """Static settings of a learner and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(get(name).Config)}


def hparam_fields(name: str) -> dict[str, float]:
    """Traced hyperparameters of a learner and their defaults."""
    return dict(get(name).HParams()._asdict())


def check_stream(name: str, task_free: bool, cfg: object = None) -> None:
    """Refuse learner ``name`` with static config ``cfg`` (default: its defaults) on a
    task-free stream when it needs task boundaries."""
    module = get(name)
    needs = getattr(module, "requires_boundaries", None)
    if task_free and needs is not None and needs(cfg if cfg is not None else module.Config()):
        hint = getattr(module, "TASK_FREE_HINT", "")
        raise ConfigError(
            f"{name} needs task boundaries, but the stream is task-free (--task-free hides "
            f"them); run it with --no-task-free" + (f", or {hint}" if hint else "")
        )


PERMUTED_AUGMENT_WHY = (
    "a permuted stream's inputs are pixel permutations, so neighbouring inputs are not "
    "neighbouring pixels and a crop or flip of them is not a view of the same image (on "
    "10-task permuted MNIST this takes SCR's final accuracy from 0.81 to 0.68)")


def check_augment(name: str, stream_kind: str, cfg: object = None) -> None:
    """Refuse a learner config whose ``augment`` spec crops or flips on a permuted stream."""
    from ocljax import augment as augment_lib  # imports jax: not at registry import time

    spec = getattr(cfg if cfg is not None else get(name).Config(), "augment", None)
    if stream_kind == "permuted" and spec is not None and augment_lib.moves_pixels(spec):
        raise ConfigError(
            f"{name}: augment={spec!r} moves pixels, but {PERMUTED_AUGMENT_WHY}; use "
            f"--set augment={augment_lib.without_spatial(spec)}")


def stream_note(name: str, cfg, stream_cfg) -> str | None:
    """A learner's warning about a stream it runs on but is not designed for (its module's
    ``stream_note(cfg, stream_cfg)``; None when it has none or nothing to say)."""
    note = getattr(get(name), "stream_note", None)
    return None if note is None else note(cfg, stream_cfg)


def fit_to_stream(name: str, cfg, stream_cfg, explicit: set[str]):
    """``(cfg, note)``: a learner's settings that default to a property of the stream it runs
    on (its module's ``fit_to_stream(cfg, stream_cfg, explicit)``, given the keys the user set
    explicitly, which it leaves alone); ``note`` says what changed, None when nothing did."""
    fit = getattr(get(name), "fit_to_stream", None)
    return (cfg, None) if fit is None else fit(cfg, stream_cfg, explicit)


def fit_augment_to_stream(name: str, cfg, stream_kind: str, explicit: bool):
    """``(cfg, note)``: on a permuted stream a *default* ``augment`` spec that moves pixels is
    replaced by its pixel-free part (``note`` says so); an explicit one is refused
    (``check_augment``). Elsewhere ``cfg`` is returned unchanged with ``note`` None."""
    from ocljax import augment as augment_lib

    spec = getattr(cfg, "augment", None)
    if stream_kind != "permuted" or spec is None or not augment_lib.moves_pixels(spec):
        return cfg, None
    if explicit:
        check_augment(name, stream_kind, cfg)  # raises
    kept = augment_lib.without_spatial(spec)
    return dataclasses.replace(cfg, augment=kept), (
        f"{name}: augment {spec!r} -> {kept!r} on this permuted stream ({PERMUTED_AUGMENT_WHY})")


def __getattr__(attr: str) -> ModuleType:
    """``ocljax.learners.er`` etc. without importing every learner up front."""
    if attr in {module for module, _ in LEARNERS.values()} | {"supervised"}:
        return importlib.import_module(f"ocljax.learners.{attr}")
    raise AttributeError(f"module 'ocljax.learners' has no attribute {attr!r}")


__all__ = ["LEARNERS", "REGISTRY", "check_augment", "check_stream", "config_fields",
           "fit_augment_to_stream", "fit_to_stream", "get", "hparam_fields"]
