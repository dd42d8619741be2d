"""The kernel library: the mask rule, the public attention ops, their backends and the planners.

Nothing here knows about models or training. :mod:`.mask` is the one statement of
the attention rule; :mod:`.ops` validates every call (:mod:`.validation`) and hands
it to one backend (:mod:`.backends`: CUDA, Triton, the PyTorch reference);
:mod:`.roofline` models what a call costs on a device; :mod:`.tolerance` is the
error bound every kernel test compares against.
"""
from .backends import available as available_backends
from .mask import (Layout, TileKind, causal_mask, decode_mask, decode_position_ids, prefill_mask, training_mask,
                   training_position_ids)
from .ops import (accept_drafts, append_attention, causal_attention, decode_attention, prefill_attention,
                  training_attention)
