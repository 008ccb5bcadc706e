"""trxl_rl: PPO agents with a Transformer-XL memory for partially observable environments.

``import trxl_rl`` loads the memory encoder only (torch); the trainer, environments and
agents live in submodules (``trxl_rl.train``, ``trxl_rl.envs``, ``trxl_rl.agents``).
"""

from trxl_rl.memory import MemoryState, TransformerXL, TrXLConfig

__all__ = ["MemoryState", "TransformerXL", "TrXLConfig"]
__version__ = "0.1.0"
