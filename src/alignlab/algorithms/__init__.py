"""One LightningModule per algorithm; each file holds that algorithm's math in the paper's order."""

from alignlab.algorithms.base import PolicyModule
from alignlab.algorithms.sft import SFT
from alignlab.algorithms.dpo import DPO
from alignlab.algorithms.rm import RewardModel
from alignlab.algorithms.grpo import GRPO
from alignlab.algorithms.dapo import DAPO
from alignlab.algorithms.ppo import PPO
from alignlab.algorithms.seq2seq import Seq2Seq

__all__ = ["PolicyModule", "SFT", "DPO", "RewardModel", "GRPO", "DAPO", "PPO", "Seq2Seq"]
