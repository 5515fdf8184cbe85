"""Meshes and the logical-axis rules table (see docs/sharding.md)."""

from jaxinfer.sharding.mesh import AXES, make_mesh
from jaxinfer.sharding.rules import DEFAULT_RULES, is_placed, kv_cache_sharding, logical_to_spec, param_shardings

__all__ = ["AXES", "DEFAULT_RULES", "is_placed", "kv_cache_sharding", "logical_to_spec", "make_mesh",
           "param_shardings"]
