"""engine/llamacpp/lib.py: reading llama.cpp's KV report from its log."""

import pytest

from engine.errors import UnsupportedError
from engine.llamacpp.lib import parse_kv_log

LINE = ("llama_kv_cache: size =    1.00 MiB (  1024 cells,   4 layers,  2/1 seqs), K (f16):    0.50 MiB, "
        "V (f16):    0.50 MiB\n")


def test_one_cache_is_read():
    kv = parse_kv_log("llama_kv_cache:        CPU KV buffer size =     1.00 MiB\n" + LINE)
    assert (kv["cells_per_stream"], kv["n_stream"], kv["n_seq"], kv["buffer_mib"], kv["type_k"]) == (1024, 1, 2, 1.0, "f16")


def test_two_kv_caches_in_llamacpps_log_are_refused():
    """llama.cpp's iswa memory logs two caches (full and sliding-window): one pool of cells cannot describe it."""
    with pytest.raises(UnsupportedError, match="2 KV caches"):
        parse_kv_log(LINE + LINE.replace("1024 cells", " 256 cells"))
