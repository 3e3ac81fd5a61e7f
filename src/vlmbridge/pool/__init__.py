"""Several models behind one server: the models file, the pool (load on demand, LRU eviction under a memory
budget, keep_alive, hot swap) and the per-model slots the routes lease engines from."""

from vlmbridge.pool.pool import ModelPool, wait_for_load
from vlmbridge.pool.slot import Copy, EngineSlot, SlotState
from vlmbridge.pool.spec import ModelSpec, read_models_file, single_folder, specs_from_pairs

__all__ = [
    "Copy",
    "EngineSlot",
    "ModelPool",
    "ModelSpec",
    "SlotState",
    "read_models_file",
    "single_folder",
    "specs_from_pairs",
    "wait_for_load",
]
