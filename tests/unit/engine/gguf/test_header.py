"""engine/gguf/header.py against gguf-py's GGUFReader, the reference nobody here wrote: every
metadata value, every value type and every tensor's place and bytes, on each preset and on the real
model (a 49,152-token vocabulary with merges)."""

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from engine.gguf.header import read_header
from engine.gguf.presets import PRESETS
from engine.gguf.reader import open_gguf
from engine.loader import resolve_model_path

FILES = [p for p in sorted(PRESETS) if p != "llama-7b"] + ["llama-7b", "smollm2-135m"]


@pytest.fixture(scope="module", params=FILES)
def path(request):
    return resolve_model_path(request.param)


def test_metadata_equals_gguf_readers(path):
    ref = GGUFReader(path)
    ours = read_header(path)
    real = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # the reader's pseudo-keys
    assert list(ours.fields) == list(real)
    assert (ref.fields["GGUF.version"].contents(), ref.fields["GGUF.kv_count"].contents()) == (ours.version, ours.n_kv)
    for key, field in real.items():
        want = field.contents()
        have = ours.fields[key]
        assert type(have) is type(want), key
        assert have == want, key
        types = tuple(int(t) for t in field.types)
        assert ours.types[key] == (types if types[0] != GGUFValueType.ARRAY else types[:2]), key


def test_tensor_table_equals_gguf_readers(path):
    ref = GGUFReader(path)
    ours = read_header(path)
    assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    f = open_gguf(path)
    for t in ref.tensors[:40]:  # data of the first 40 (all of a tiny preset), through both read paths
        mine = ours.tensors[t.name]
        assert (mine.shape, mine.tensor_type, mine.data_offset, mine.n_bytes) == (
            tuple(int(d) for d in t.shape), t.tensor_type, t.data_offset, int(t.n_bytes))
        for mmap in (True, False):
            raw = f.raw(t.name, mmap)
            assert raw.dtype == t.data.dtype and raw.shape == t.data.shape
            assert np.array_equal(raw.view(np.uint8), np.asarray(t.data).view(np.uint8))


def test_real_vocabulary_parses_in_little_memory():
    """The reason header.py parses values itself: GGUFReader keeps ~170 MiB of numpy views for
    SmolLM2's vocabulary. Parsed here it is Python lists of str and numbers. Bound: ~98k strings of
    ~7 characters (a str object is 49 + length bytes in ASCII, 74 + 2 x length otherwise), an 8-byte
    list slot each, and 49k token types (<= 32 bytes each, small ints are shared): ~9 MiB, so 16 MiB."""
    import sys

    h = read_header(resolve_model_path("smollm2-135m"))
    toks, merges = h.fields["tokenizer.ggml.tokens"], h.fields["tokenizer.ggml.merges"]
    assert len(toks) == 49152 and len(merges) > 40000 and all(isinstance(t, str) for t in toks)
    size = sum(sys.getsizeof(v) for v in h.fields.values())
    size += sum(sys.getsizeof(x) for v in h.fields.values() if isinstance(v, list) for x in v)
    assert size < 16 << 20
