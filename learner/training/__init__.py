"""The learner role, as plain classes (no Ray): windowed GRPO updates, weights out, checkpoints.

    learner = Learner(policy, lr=..., ...)        # learner/driver/build.py builds it from the config
    stats = learner.update(batch)                 # one iteration's RolloutBatch
    packet = learner.get_weights()                # WeightPacket for the broadcast
    learner.save(root); learner.restore(path)     # checkpoints (checkpoint.py)
"""

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from .selection import trained_steps
from .updates import Learner

__all__ = ["CheckpointError", "Learner", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "trained_steps",
           "verify_checkpoint"]
