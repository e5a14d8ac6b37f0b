"""Every tensor type the reader dequantizes equals gguf.quants.dequantize bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf import quants as gq

from engine.gguf.reader import open_gguf
from tests.helpers.gguf_edit import random_block_bytes

ROW = 512  # a multiple of every block size (1, 32, 64, 256)


def _dequantizable():
    out = []
    for t in GGMLQuantizationType:
        if t in (GGMLQuantizationType.F64, GGMLQuantizationType.I8, GGMLQuantizationType.I16,
                 GGMLQuantizationType.I32, GGMLQuantizationType.I64):
            continue  # integer / f64 types never hold model weights
        try:
            gq.dequantize(random_block_bytes(t, 1, ROW), t)
        except NotImplementedError:
            continue
        out.append(t)
    return out


TYPES = _dequantizable()


def test_covers_the_types_the_issue_names():
    names = {t.name for t in TYPES}
    for want in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                 "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                 "IQ4_NL", "IQ4_XS"]:
        assert want in names


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("quants") / "types.gguf"
    w = GGUFWriter(path, "llama")
    raw = {}
    for i, t in enumerate(TYPES):
        data = random_block_bytes(t, 3, ROW, seed=i)
        if t == GGMLQuantizationType.F32:
            data = data.view(np.float32)
        elif t == GGMLQuantizationType.F16:
            data = data.view(np.float16)
        w.add_tensor(f"t.{t.name}", data, raw_dtype=t)
        raw[t] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, raw


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_quants(typed_file, qtype):
    path, raw = typed_file
    ours = open_gguf(path).dequantize(f"t.{qtype.name}", torch.float32).numpy()
    ref = gq.dequantize(raw[qtype], qtype).astype(np.float32)
    assert ours.shape == (3, ROW)
    assert ours.tobytes() == ref.reshape(3, ROW).tobytes()
