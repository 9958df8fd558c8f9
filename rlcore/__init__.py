"""rlcore: an RL post-training core built around the six roles of the loop.

rollout -> reward -> reference (KL anchor) -> advantage/loss -> update -> weight-sync, run by the controller.
"""

__version__ = "0.1.0"
