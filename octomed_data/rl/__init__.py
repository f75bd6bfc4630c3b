"""Reinforcement learning after SFT, the library half: the recipe's ``rl:`` block (:mod:`.config`),
the RL prompts with gold answers selected by pass rate (:mod:`.data`) and the rewards, computed by
the rejection filter's own verdict (:mod:`.reward`). The GRPO trainer is ``training/rl.py``."""

from octomed_data.rl.config import GRPOSettings, RLOptions

__all__ = ["GRPOSettings", "RLOptions"]
