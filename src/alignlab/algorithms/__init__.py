"""One LightningModule per algorithm; each file holds that algorithm's math in the paper's order."""

from alignlab.algorithms.base import PolicyModule
from alignlab.algorithms.sft import SFT

__all__ = ["PolicyModule", "SFT"]
