"""A new allocator in one file plus one registry line (the proof docs/architecture.md promises).

``padded``: llama.cpp's cell pool, with the attended range [0, n_kv) rounded up to 32 cells, as
llama.cpp pads it for its kernels. Loaded through ``KVBENCH_PLUGINS=tests.helpers.padded_alloc``; nothing
else in kvbench is edited, and it runs in sweeps, reports and plots under its own name.
"""

from dataclasses import replace

from engine.alloc import Allocator, register
from engine.alloc.pooled import PooledKV
from engine.alloc.recurrent_pooled import RecurrentPooled


class PaddedPooledKV(PooledKV):
    kind = "padded"

    def __init__(self, cfg, spec, *args, **kwargs) -> None:
        super().__init__(cfg, replace(spec, n_pad=32), *args, **kwargs)


register(Allocator("padded", PaddedPooledKV, RecurrentPooled, description="pooled, n_kv padded to 32 cells"))
