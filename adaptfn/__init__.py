"""adaptfn: functional adapters (LoRA, IA3, AdaLoRA, LoHa, LoKr, OFT, VeRA) for PyTorch, in PEFT's file format.

An adapter is an immutable pytree; pure functions inject, merge, select, mask, scale and combine it into
a functional model call. See ``docs/`` and ``docs/design.md`` for the contract.
"""

import sys as _sys

import optree.pytree as _optree_pytree

from . import adalora as adalora
from . import cli as cli
from . import hub as hub
from . import optim as optim
from . import quant as quant
from .adapter import NAMESPACE as _NAMESPACE
from .adapter import Adapter as Adapter
from .adapter import AdapterSum as AdapterSum
from .adapter import Entry as Entry
from .algebra import combine as combine
from .algebra import scale as scale
from .errors import AdapterFileError as AdapterFileError
from .errors import AdaptfnError as AdaptfnError
from .errors import ConfigError as ConfigError
from .errors import IncompatibleAdapterError as IncompatibleAdapterError
from .functional import FunctionalModel as FunctionalModel
from .functional import functional as functional
from .hub import push_to_hub as push_to_hub
from .initialize import init as init
from .io import from_state_dict as from_state_dict
from .io import load as load
from .io import save as save
from .io import state_dict as state_dict
from .kohya import from_kohya as from_kohya
from .kohya import load_kohya as load_kohya
from .methods import AdaLoraConfig as AdaLoraConfig
from .methods import IA3Config as IA3Config
from .methods import LoHaConfig as LoHaConfig
from .methods import LoKrConfig as LoKrConfig
from .methods import LoraConfig as LoraConfig
from .methods import OFTConfig as OFTConfig
from .methods import VeraConfig as VeraConfig
from .pooling import AdapterPool as AdapterPool
from .pooling import OffloadedPool as OffloadedPool
from .pooling import pool as pool
from .shell import AdapterModel as AdapterModel
from .shell import from_pretrained as from_pretrained
from .stacking import stack as stack
from .stacking import unstack as unstack
from .transforms import inject as inject
from .transforms import mask as mask
from .transforms import merge as merge
from .transforms import select as select

tree = _optree_pytree.reexport(namespace=_NAMESPACE, module="adaptfn.tree")
_sys.modules["adaptfn.tree"] = tree

__version__ = "0.1.0"
