"""SAE training (L1 / TopK / MDL objectives), checkpoints, and width × sparsity sweeps."""

from tl_mdl.activations.shards import ShardedActivations
from tl_mdl.training.objectives import (
    OBJECTIVES,
    batch_fvu,
    l1_penalty,
    mdl_penalty,
    register_objective,
)
from tl_mdl.training.sweep import COLUMNS, SweepTable, sweep
from tl_mdl.training.trainer import (
    TrainConfig,
    TrainResult,
    load_checkpoint,
    save_checkpoint,
    train_sae,
)
