"""`investigate`: the sampler and the best tracer together, the correlator over both, gdb for a
full stack when the BPF one is shallow.

- ``loop``: the Investigation (one pace for sampling and tracer polling, evaluations, stopping
  once confident) and its options;
- ``memory``: what is sampled and how it is attributed, for one process or a tree;
- ``results``: what it found, as typed results that renderers and --json read.
"""

from leakhunt.investigate.loop import InvestigateOptions, Investigation
from leakhunt.investigate.results import BLIND_SPOT, Evaluation, GdbPass, InvestigationResult, Progress

__all__ = [
    "BLIND_SPOT",
    "Evaluation",
    "GdbPass",
    "InvestigateOptions",
    "Investigation",
    "InvestigationResult",
    "Progress",
]
