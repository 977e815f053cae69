"""``af.adalora``: AdaLoRA training helpers (PEFT's regulariser and rank allocator as pure functions).

See :mod:`adaptfn.methods.adalora_alloc` for the details and an example training loop.
"""

from .methods.adalora_alloc import RankAllocator as RankAllocator
from .methods.adalora_alloc import RankAllocatorState as RankAllocatorState
from .methods.adalora_alloc import orth_reg as orth_reg
from .methods.adalora_alloc import prune as prune
from .methods.adalora_alloc import rank_allocator as rank_allocator

__all__ = ["RankAllocator", "RankAllocatorState", "orth_reg", "prune", "rank_allocator"]
