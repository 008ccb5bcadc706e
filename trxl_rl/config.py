"""Training configuration: dataclasses that YAML presets map onto 1:1.

A preset (``configs/*.yaml``, shipped inside the package as ``trxl_rl.configs``) holds any
subset of the fields below; unknown keys and ill-typed values are errors
(:class:`ConfigError`), never silently ignored. Command-line overrides use dotted names:
``--ppo.learning_rate 1e-3``, ``--model.trxl.memory_length 0``, ``--env.kwargs.obs rgb``.
Mappings (``env.kwargs`` and the backbone sections ``model.trxl`` ...) merge key by key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message is one line."""


@dataclass
class EnvConfig:
    """:param id: environment id (``trxl_rl.envs.make_env``).
    :param kwargs: keyword arguments of ``make_env`` (e.g. ``obs: rgb``).
    :param num_envs: parallel environments, each with its own memory (per rank of a
        torchrun run: K ranks step K x num_envs).
    :param vectorization: ``sync`` (one process) or ``async`` (subprocess per env)."""

    id: str = "MiniGrid-MemoryS9-v0"
    kwargs: dict = field(default_factory=dict)
    num_envs: int = 16
    vectorization: str = "sync"


# The trainer's defaults for each backbone's section (what the MiniGrid-Memory preset uses).
TRXL_DEFAULTS = {"dim": 64, "num_layers": 1, "num_heads": 4, "memory_length": 64}
RNN_DEFAULTS = {"hidden_size": 128, "num_layers": 1}
# The section (``model.<section>``) each built-in backbone reads its fields from; a backbone
# registered with trxl_rl.backbones.register_backbone reads ``custom``.
BACKBONE_SECTIONS = {"trxl": "trxl", "gtrxl": "trxl", "gru": "gru", "lstm": "lstm",
                     "none": None}
SECTIONS = ("trxl", "gru", "lstm", "custom")
# Model fields that moved into the ``model.trxl`` section when other backbones came.
TRXL_FIELDS_BEFORE_SECTIONS = ("dim", "num_layers", "num_heads", "memory_length",
                               "positional_encoding", "gating", "norm", "ff_dim", "gate_bias")


@dataclass
class ModelConfig:
    """Agent = observation encoder -> memory backbone -> policy and value heads.

    :param backbone: ``trxl`` (Transformer-XL), ``gtrxl`` (with GTrXL gating), ``gru``,
        ``lstm``, ``none`` (no memory: the control), or a name registered with
        :func:`trxl_rl.backbones.register_backbone`.
    :param encoder_dim: encoder output size (None: the encoder's default).
    :param encoder_dedupe: image encoders run their CNN once per distinct image of a batch
        (the same function up to float rounding; a large saving for rendered grid worlds on
        a CPU, a loss on a GPU; see ``NatureCNNEncoder``). None (default): on CPU only.
    :param encoder_max_pool: image encoders add a linear map of their last convolution's
        per-channel maxima over positions, so an object is recognised wherever in the image
        it is (``NatureCNNEncoder``; the grid encoder always has one). Off by default (the
        Nature CNN as published).
    :param trxl: fields of :class:`trxl_rl.TrXLConfig` (but ``input_dim``) for ``trxl`` and
        ``gtrxl`` (which always has ``gating`` on).
    :param gru: fields of :class:`trxl_rl.backbones.RecurrentConfig` (``hidden_size``,
        ``num_layers``) for ``gru``; ``lstm`` likewise.
    :param custom: keyword arguments of a registered backbone's factory.

    Only the section of the chosen backbone is used. A file may hold sections of several
    backbones (a preset that runs with each); an override of another backbone's section on
    the command line is an error, since it would change nothing. Fields a section leaves out
    take the defaults above (``TRXL_DEFAULTS``, ``RNN_DEFAULTS``), then the backbone's own.
    """

    backbone: str = "trxl"
    encoder_dim: int | None = 64
    encoder_dedupe: bool | None = None
    encoder_max_pool: bool = False
    trxl: dict = field(default_factory=lambda: dict(TRXL_DEFAULTS))
    gru: dict = field(default_factory=lambda: dict(RNN_DEFAULTS))
    lstm: dict = field(default_factory=lambda: dict(RNN_DEFAULTS))
    custom: dict = field(default_factory=dict)

    def backbone_section(self) -> str | None:
        """The name of the section the chosen backbone reads (None for ``none``)."""
        return BACKBONE_SECTIONS.get(self.backbone, "custom")

    def reads(self, dotted_key: str) -> bool:
        """False for an option (``model.gru.hidden_size``, ``model.gru``) of a backbone
        section this model's backbone does not read; True for every other option."""
        parts = dotted_key.split(".")
        return not (len(parts) >= 2 and parts[0] == "model" and parts[1] in SECTIONS
                    and parts[1] != self.backbone_section())

    def backbone_fields(self) -> tuple[str | None, dict]:
        """``(section name, the chosen backbone's fields)``."""
        section = self.backbone_section()
        return section, dict(getattr(self, section)) if section else {}



@dataclass
class PPOConfig:
    """PPO hyperparameters. ``rollout_steps`` per env per update; updates run over
    (env, segment) chunks of ``segment_length`` steps, which must divide ``rollout_steps``.

    Three guards on how far one update moves the policy, all measured by the approx_kl of a
    minibatch (the k3 estimate against the rollout's policy, averaged over ranks) and all
    off (None) by default: ``target_kl`` ends the update after the minibatch step whose KL
    passed it; ``lr_target_kl`` makes the learning rate follow the KL (slower while it is
    above twice this, back up to the schedule while below half; see
    :class:`trxl_rl.ppo.LearningRate`); ``rollback_kl`` undoes an update in which a
    minibatch's KL, or the KL after its last step, passed it (weights and optimizer state as
    before the update, and the rate slowed by 1.5 for the rest of the run:
    :class:`trxl_rl.ppo.Rollback`).

    The symbolic MiniGrid-Memory presets and CueRecall's set ``rollback_kl`` 0.05: there it
    kept solved runs solved where nothing else tried did (S9, S13Random, S17Random,
    CueRecall-16), at no cost in steps to solve seen (the first undone update came after
    the run had solved its task). It is not the trainer's default, which every other env id
    starts from: on POPGym's PositionOnlyPendulumEasy it undid updates before TrXL had
    solved the task, and the slower rate cost a seed its threshold (benchmarks/README.md,
    "Where TrXL loses").

    ``entropy_coef`` None (the default) is 0.02 for discrete actions and 0 for continuous
    ones (:meth:`initial_entropy_coef`): a Gaussian's entropy grows with its log-std at a
    constant rate, so a bonus keeps the policy as wide as it outweighs the task's rewards,
    and its mean, the greedy action, is then a worse controller than its samples (measured
    on POPGym's PositionOnlyPendulumEasy: benchmarks/README.md). CleanRL's and Stable
    Baselines3's continuous PPO use no bonus either.
    """

    rollout_steps: int = 256
    segment_length: int = 32
    epochs: int = 6
    minibatches: int = 8
    gamma: float = 0.995
    gae_lambda: float = 0.95
    clip_coef: float = 0.1
    clip_value_loss: bool = False
    value_coef: float = 0.5
    entropy_coef: float | None = None  # None: 0.02 for discrete actions, 0 for continuous
    entropy_coef_final: float | None = None  # None: constant; else linear to this value
    learning_rate: float = 3e-4
    learning_rate_final: float | None = None  # None: constant; else linear to this value
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    max_grad_norm: float = 0.5
    norm_advantages: bool = True
    target_kl: float | None = None
    lr_target_kl: float | None = None
    rollback_kl: float | None = None
    reconstruction_coef: float = 0.0  # > 0: the agent gets an image decoder (image obs only)

    def initial_entropy_coef(self, continuous: bool) -> float:
        """The entropy bonus at the start of training, for discrete or ``continuous``
        actions: ``entropy_coef``, or its default where that is None."""
        if self.entropy_coef is not None:
            return self.entropy_coef
        return 0.0 if continuous else 0.02


@dataclass
class TrainConfig:
    """Everything a training run needs.

    :param total_steps: the budget of environment steps (all envs of all ranks together):
        training runs as many whole rollouts as fit in it (at least one).
    :param device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    :param threads: torch CPU threads (None: torch's default, one per core). One by default:
        at these model sizes a second thread gains ~8% on an idle 2-core machine and makes a
        run 3.7x slower when another process holds a core (``benchmarks.scaling --beside``);
        use both cores with two ranks (``--ranks 2``) or a second run instead.
    :param ranks: data-parallel processes that ``python -m trxl_rl.train`` starts on this
        machine, each with its own ``env.num_envs`` envs, as ``torchrun --standalone
        --nproc-per-node ranks`` would (:func:`trxl_rl.distributed.start_local_ranks`); under
        ``torchrun``, which starts them itself, its count is used (and recorded) instead. A run
        resumes with as many as wrote it. 1 by default (benchmarks/README.md, "Time to solve":
        2 ranks of 16 envs x 128 steps ran 1.13x the steps/s of one process of 16 x 256 alone
        and 0.9x beside another job, and solved S9 no sooner).
    :param checkpoint_every: updates between checkpoints (one is always written at the end).
    :param eval_episodes: episodes of the final evaluation on seeds not used in training
        (0 disables it).
    :param eval_deterministic: the final evaluation takes greedy actions (False: sampled).
    :param track: also log the scalars to a Weights & Biases run named after the run
        directory (CleanRL's ``--track``; needs the ``wandb`` extra; rank 0 only).
    :param wandb_project_name: the W&B project of the run; ``wandb_entity``: its team or user
        (None: W&B's default entity).
    :param threshold: when training first reaches it (``threshold_metric``: the training
        ``success`` rate of an update, or its mean episodic ``return``), the steps and
        training seconds so far are logged (``threshold/steps``, ``threshold/seconds``) and
        kept in ``summary.json`` (None: not watched).
    :param stop_at: end training before ``total_steps`` once the task is solved: after
        ``stop_updates`` updates in a row whose ``threshold_metric`` is at least ``stop_at``
        (None: train the whole budget). The last checkpoint and the final evaluation are those
        of the update it stopped after; ``summary.json`` says where (``solved``). Off by
        default and in ``benchmarks.compare`` (a benchmark trains its whole budget, so that
        "stays solved" is measured); the symbolic MiniGrid-Memory presets stop at 0.99
        success in 3 updates in a row (docs/results.md, "Stop once solved").
    :param stop_greedy_episodes: before it stops, the training metric's verdict is checked on
        the greedy policy: this many episodes with greedy actions, on seeds that neither
        training nor the final evaluation uses, must reach ``stop_at`` too (their success rate
        or mean return); until they do, training goes on and asks again after each update
        that keeps the run at ``stop_at``. A sampled policy can be solved while its greedy one
        walks in loops (docs/results.md). 0: the training metric alone.
    """

    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    seed: int = 1
    total_steps: int = 500_000
    device: str = "auto"
    threads: int | None = 1
    ranks: int = 1
    run_name: str | None = None
    log_dir: str = "runs"
    checkpoint_every: int = 25
    eval_episodes: int = 100
    eval_deterministic: bool = True
    progress: bool = True
    track: bool = False
    wandb_project_name: str = "trxl_rl"
    wandb_entity: str | None = None
    threshold: float | None = 0.9
    threshold_metric: str = "success"
    stop_at: float | None = None
    stop_updates: int = 3
    stop_greedy_episodes: int = 64

    def validate(self) -> TrainConfig:
        """Check the values that types cannot; raise :class:`ConfigError`."""
        ppo, model = self.ppo, self.model
        positive = {
            "env.num_envs": self.env.num_envs, "ppo.rollout_steps": ppo.rollout_steps,
            "ppo.segment_length": ppo.segment_length, "ppo.epochs": ppo.epochs,
            "ppo.minibatches": ppo.minibatches, "total_steps": self.total_steps,
            "checkpoint_every": self.checkpoint_every, "ppo.learning_rate": ppo.learning_rate,
            "stop_updates": self.stop_updates, "ranks": self.ranks,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if ppo.rollout_steps % ppo.segment_length:
            raise ConfigError(
                f"ppo.segment_length ({ppo.segment_length}) must divide ppo.rollout_steps "
                f"({ppo.rollout_steps})"
            )
        chunks = self.env.num_envs * ppo.rollout_steps // ppo.segment_length
        if chunks % ppo.minibatches:
            raise ConfigError(
                f"ppo.minibatches ({ppo.minibatches}) must divide the number of segments per "
                f"update, env.num_envs * ppo.rollout_steps / ppo.segment_length = {chunks}"
            )
        # The backbone's own fields are checked by the backbone when the agent is built
        # (trxl_rl.agents.build_agent); the CLIs build it before writing anything.
        choices = {
            "device": (self.device, ("auto", "cpu", "cuda")),
            "env.vectorization": (self.env.vectorization, ("sync", "async")),
            "threshold_metric": (self.threshold_metric, ("success", "return")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        optional_positive = {
            "threads": self.threads, "model.encoder_dim": model.encoder_dim,
            "ppo.target_kl": ppo.target_kl, "ppo.lr_target_kl": ppo.lr_target_kl,
            "ppo.rollback_kl": ppo.rollback_kl, "ppo.clip_coef": ppo.clip_coef,
            "ppo.max_grad_norm": ppo.max_grad_norm, "ppo.adam_eps": ppo.adam_eps,
        }
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be in [0, 2**31), got {self.seed}")
        for name, value in optional_positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        non_negative = {
            "eval_episodes": self.eval_episodes, "stop_greedy_episodes": self.stop_greedy_episodes,
            "ppo.value_coef": ppo.value_coef, "ppo.entropy_coef": ppo.entropy_coef,
            "ppo.weight_decay": ppo.weight_decay,
            "ppo.reconstruction_coef": ppo.reconstruction_coef,
        }
        for name, value in non_negative.items():
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(ppo, name) <= 1.0:
                raise ConfigError(f"ppo.{name} must be in [0, 1], got {getattr(ppo, name)}")
        return self


# Short names of the presets shipped in trxl_rl.configs (the repository's configs/ folder).
PRESETS = {
    "MiniGrid-Memory": "minigrid_memory.yaml",
    "MiniGrid-Memory-RGB": "minigrid_memory_rgb.yaml",
    "MiniGrid-MemoryS7": "minigrid_memory_s7.yaml",
    "MiniGrid-MemoryS11": "minigrid_memory_s11.yaml",
    "MiniGrid-MemoryS13": "minigrid_memory_s13.yaml",
    "MiniGrid-MemoryS13Random": "minigrid_memory_s13random.yaml",
    "MiniGrid-MemoryS17Random": "minigrid_memory_s17random.yaml",
    "CueRecall": "cue_recall.yaml",
    "MortarMayhem-Grid": "memory_gym_mortar_mayhem_grid.yaml",
    "MysteryPath-Grid": "memory_gym_mystery_path_grid.yaml",
    "Endless-MortarMayhem": "memory_gym_endless_mortar_mayhem.yaml",
}
# Environment ids that start from a preset when given to --env (their step budget and env).
ENV_PRESETS = {
    "MiniGrid-MemoryS7-v0": "MiniGrid-MemoryS7",
    "MiniGrid-MemoryS9-v0": "MiniGrid-Memory",
    "MiniGrid-MemoryS11-v0": "MiniGrid-MemoryS11",
    "MiniGrid-MemoryS13-v0": "MiniGrid-MemoryS13",
    "MiniGrid-MemoryS13Random-v0": "MiniGrid-MemoryS13Random",
    "MiniGrid-MemoryS17Random-v0": "MiniGrid-MemoryS17Random",
    **{f"{prefix}{name}-v0": name for prefix in ("", "memory_gym:")
       for name in ("MortarMayhem-Grid", "MysteryPath-Grid", "Endless-MortarMayhem")},
}


def preset_path(name: str) -> Path | None:
    """The YAML file of a preset short name, or None if ``name`` is not one."""
    if name not in PRESETS:
        return None
    return Path(str(resources.files("trxl_rl.configs").joinpath(PRESETS[name])))


def read_yaml(path: str | Path) -> dict:
    """Load a YAML mapping with ``yaml.safe_load``; errors become :class:`ConfigError`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except (OSError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of config keys")
    return data


# A number in scientific notation that YAML 1.1 (PyYAML) leaves a string: 1e-3, 5e5, 2.5E6.
_SCIENTIFIC = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to ``hint`` where that is lossless, else raise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    if hint in (int, float) and isinstance(value, str) and _SCIENTIFIC.fullmatch(value):
        value = float(value)  # YAML 1.1 reads 1e-3 and 5e5 as strings
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or hint
    if expected is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 5.0e+5 in YAML is a float
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"config key {name} must be {getattr(expected, '__name__', expected)}, "
            f"got {value!r}"
        )
    return value


class _Whole(typing.NamedTuple):
    """A mapping given whole on the command line (``--env.kwargs '{delay: 3}'``): it replaces
    the mapping field (starting again from the field's default) instead of updating it."""

    value: dict


def _merge(obj: Any, data: dict, prefix: str = "") -> Any:
    """Set the fields of dataclass ``obj`` from ``data``, recursively, with checks; mapping
    fields are updated key by key, unless the value is :class:`_Whole`."""
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        whole = isinstance(value, _Whole)
        value = value.value if whole else value
        name = f"{prefix}{key}"
        if key not in known:
            moved = f" (moved to model.trxl.{key})" if prefix == "model." and \
                key in TRXL_FIELDS_BEFORE_SECTIONS else ""
            raise ConfigError(
                f"unknown config key {name!r}{moved}; known keys here: {', '.join(sorted(known))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name} must be a mapping, got {value!r}")
            _merge(current, value, prefix=f"{name}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            base = _field_default(obj, key) if whole else current
            setattr(obj, key, _deep_update(base, value, f"{name}."))
        else:
            setattr(obj, key, _check_type(name, value, hints[key]))
    return obj


def build_config(base: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then ``base`` (a preset or config file), then ``overrides`` (flat dotted
    keys, values already parsed), validated. A dotted key into a mapping
    (``model.trxl.dim``) changes one entry; a mapping given whole replaces it."""
    cfg = _merge(TrainConfig(), base or {})
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        nested: dict = {leaf: _Whole(value) if isinstance(value, dict) else value}
        for parent in reversed(parents):
            nested = {parent: nested}
        _merge(cfg, nested)
    _check_backbone_overrides(cfg, overrides or {})
    return cfg.validate()


def _check_backbone_overrides(cfg: TrainConfig, overrides: dict) -> None:
    """Refuse an override of a backbone section the run does not use."""
    used = cfg.model.backbone_section()
    for dotted in overrides:
        if not cfg.model.reads(dotted):
            raise ConfigError(
                f"--{dotted} does not apply: this run's backbone is {cfg.model.backbone!r}, "
                f"which reads {'no section' if used is None else f'model.{used}'}; "
                f"set --model.backbone or drop the option")


def _field_default(obj: Any, name: str) -> Any:
    """The default value of dataclass field ``name`` of ``obj``."""
    spec = next(f for f in dataclasses.fields(obj) if f.name == name)
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING \
        else spec.default


def _deep_update(target: dict, update: dict, prefix: str = "") -> dict:
    out = dict(target)
    for key, value in update.items():
        if isinstance(value, dict):
            below = out.get(key, {})
            if not isinstance(below, dict):
                raise ConfigError(f"config key {prefix}{key} is {below!r}, not a mapping, so "
                                  f"{prefix}{key}.{next(iter(value), '')} cannot be set")
            out[key] = _deep_update(below, value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain-data form (YAML/JSON/checkpoint metadata)."""
    return dataclasses.asdict(cfg)


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``device`` config value (``auto``: cuda if available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)
