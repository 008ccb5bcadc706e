"""trxl_rl: PPO agents with a Transformer-XL memory for partially observable environments.

``import trxl_rl`` loads the memory encoder and the other memory backbones only (torch); the
trainer, environments and agents live in submodules (``trxl_rl.train``, ``trxl_rl.envs``,
``trxl_rl.agents``).
"""

from trxl_rl.backbones import register_backbone
from trxl_rl.memory import MemoryBackbone, MemoryState, TransformerXL, TrXLConfig

__all__ = ["MemoryBackbone", "MemoryState", "TransformerXL", "TrXLConfig", "load_agent",
           "register_backbone"]


def load_agent(path, device="cpu"):
    """A trained policy from a checkpoint file or run directory, ready to act (eval mode):
    ``agent.initial_state(num_envs)`` and ``agent.act(obs, state, episode_start)``.
    See :func:`trxl_rl.checkpoint.load_agent`; imported on first use, so that
    ``import trxl_rl`` stays light."""
    from trxl_rl.checkpoint import load_agent as _load_agent

    return _load_agent(path, device)
__version__ = "0.1.0"
