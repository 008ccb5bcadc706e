"""POPGym (Morad et al. 2023, arXiv 2303.01859) environments as ``popgym/<ClassName>-v0``.

POPGym is an optional extra: ``pip install -e ".[popgym]"`` installs the ``popgym`` package
and ``mazelib`` (needed by the Labyrinth environments). When it is installed, importing
:mod:`trxl_rl.envs` registers one gymnasium id per environment class of the package
(``popgym.envs``), named after the class: ``popgym/RepeatPreviousMedium-v0``,
``popgym/PositionOnlyPendulumEasy-v0``, ``popgym/LabyrinthEscapeEasy-v0``, and the
configurable base classes too (``popgym/RepeatPrevious-v0`` with kwargs such as
``num_decks``). The package registers its own ids (``popgym-RepeatPreviousMedium-v0``) as
well; ours follow the class names (``VelocityOnlyCartPole``, not the package's
``VelocityOnlyCartpole``) and are the ones :func:`trxl_rl.envs.make_env` adapts to the
agent:

- ``Tuple`` observations (Autoencode's ``Tuple(Discrete(2), Discrete(4))``) become
  ``MultiDiscrete`` (:class:`~trxl_rl.envs.wrappers.UntupleObservation`); ``Discrete`` and
  ``MultiDiscrete`` observations are one-hot encoded by the agent's encoder, ``Box`` ones
  (unbounded for VelocityOnlyCartPole) fed as they are;
- ``Box`` actions (the Pendulum variants) are clipped to their bounds on the way into the
  env (:class:`~trxl_rl.envs.wrappers.ClipBoxAction`);
- the previous action is added to the observation by default
  (:class:`~trxl_rl.envs.wrappers.PreviousAction`; ``prev_action: false`` turns it off), as
  POPGym's own PPO baseline does for every environment (its ``PreviousAction`` and
  ``Antialias`` wrappers: our ``prev_action`` holds the same information). Several tasks
  (MultiarmedBandit, Battleship, Concentration, MineSweeper, the Labyrinths) cannot be
  solved without it.

The maze environments (the Labyrinths) seed numpy's and Python's global generators with the
reset seed, and numpy's legacy seeding refuses seeds of 2**32 and above, which
:func:`trxl_rl.envs.replay.episode_seed` gives every episode after an env's first: their
seeds are reduced modulo 2**32 (:class:`MazeSeed`).

Episodes end by the environments' own rules (``max_episode_length`` of each class); no
``TimeLimit`` is added. Rewards are the package's, scaled so that an episode's return lies
in [-1, 1] (what POPGym's MMER metric averages).

Importing popgym and registering its ids adds ~12 ms to ``import trxl_rl.envs`` (22 ms
against 10 ms once torch, gymnasium and minigrid are loaded; popgym 1.0.7, gymnasium 1.4,
this project's 2-core machine), so registration happens at import time of
:mod:`trxl_rl.envs`; ``import trxl_rl`` itself never imports popgym.
"""

from __future__ import annotations

import difflib

import gymnasium as gym

NAMESPACE = "popgym"
INSTALL_HINT = 'pip install -e ".[popgym]"'


def is_popgym_id(env_id: str) -> bool:
    """Whether ``env_id`` is in our ``popgym/`` namespace."""
    return env_id.startswith(f"{NAMESPACE}/")


def popgym_id(class_name: str) -> str:
    """``"RepeatPreviousMedium"`` -> ``"popgym/RepeatPreviousMedium-v0"``."""
    return f"{NAMESPACE}/{class_name}-v0"


def popgym_installed() -> bool:
    """Whether the ``popgym`` package can be imported (importing it if so)."""
    try:
        import popgym.envs  # noqa: F401
    except ImportError:
        return False
    return True


def popgym_classes() -> dict[str, type[gym.Env]]:
    """Every environment class of the installed popgym package, by class name (sorted).

    These are the classes ``popgym.envs`` offers: every subclass of popgym's ``POPGymEnv``
    found there (the Labyrinths only where mazelib is installed, as popgym imports them only
    then).

    :raises ImportError: popgym is not installed.
    """
    import popgym.envs
    from popgym.core.env import POPGymEnv

    found = {name: value for name, value in vars(popgym.envs).items()
             if isinstance(value, type) and issubclass(value, POPGymEnv)}
    return dict(sorted(found.items()))


def register_popgym() -> list[str]:
    """Register ``popgym/<ClassName>-v0`` for every class of :func:`popgym_classes`.

    Idempotent; registers nothing without popgym.

    :return: the ids (sorted), ``[]`` when popgym is not installed.
    """
    if not popgym_installed():
        return []
    ids = []
    for name, cls in popgym_classes().items():
        env_id = popgym_id(name)
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"{cls.__module__}:{cls.__name__}")
        ids.append(env_id)
    return ids


def popgym_problem(env_id: str) -> str | None:
    """Why ``popgym/...`` id ``env_id`` cannot be built, in one line; ``None`` if it can.

    Registers the ids first where popgym is installed but :func:`register_popgym` has not
    run (popgym installed after :mod:`trxl_rl.envs` was imported).
    """
    if not popgym_installed():
        return (f"environment {env_id!r} needs the optional POPGym package, which is not "
                f"installed; install it with: {INSTALL_HINT}")
    ids = register_popgym()
    if env_id in ids:
        return None
    if env_id.startswith(f"{NAMESPACE}/Labyrinth"):
        return (f"environment {env_id!r} needs mazelib, which is not installed; install it "
                f"with: {INSTALL_HINT}")
    close = difflib.get_close_matches(env_id, ids, n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return (f"unknown POPGym environment id {env_id!r}; {hint}the ids are "
            f"{popgym_id('<ClassName>')} for the classes in popgym.envs "
            f"(trxl_rl.envs.list_env_ids() lists them)")


class MazeSeed(gym.Wrapper):
    """Pass reset seeds modulo 2**32: POPGym's mazes hand them to ``np.random.seed``, which
    refuses larger ones (the 64-bit seeds of an env's later episodes)."""

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        return self.env.reset(seed=None if seed is None else seed % 2**32, options=options)


def is_maze(env: gym.Env) -> bool:
    """Whether ``env`` is one of POPGym's maze environments (a ``MazeEnv``)."""
    return any(cls.__name__ == "MazeEnv" and cls.__module__.startswith("popgym.")
               for cls in type(env.unwrapped).__mro__)
