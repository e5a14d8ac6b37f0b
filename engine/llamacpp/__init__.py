"""llama.cpp as a second backend: the same scheduler, workloads and trackers over llama.cpp's own
engine and KV memory, driven through llama-cpp-python's low-level binding (``kvbench[llamacpp]``).

Why the low-level API: the high-level ``Llama`` object runs one sequence and passes neither
``n_seq_max`` nor ``kv_unified``. kvbench's ``Scheduler`` needs an engine that decodes batches mixing
sequences (``decode(batch) -> logits``) and a memory with llama.cpp's ``seq_*`` verbs; llama.cpp
has exactly those, so ``LlamaCppEngine`` and ``LlamaCppMemory`` implement kvbench's two interfaces
over a ``llama_context`` and nothing above them knows which backend runs.

Modules: ``lib`` (the import guard, log capture, type ids), ``memory`` (the Memory facade over
``llama_memory_*``), ``engine`` (model, context, batches, logits).
"""

from engine.llamacpp.lib import CACHE_TYPES, INSTALL, available

__all__ = ["CACHE_TYPES", "INSTALL", "available"]
