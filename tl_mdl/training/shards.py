"""Old import path of :mod:`tl_mdl.activations.shards` (kept so existing imports work)."""

from tl_mdl.activations.shards import (  # noqa: F401
    ShardedActivations,
    ShardInfo,
    read_rows,
    read_shard_header,
)
