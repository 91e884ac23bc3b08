"""Issue 13 item 3: a hub id loads from the local Hugging Face cache first; one that is not cached fails at
once, in one sentence, when the hub is unreachable (``HF_HUB_OFFLINE`` or a failed ~1.5 s probe), with no
retries. No test opens a connection beyond loopback: the probe is replaced, or pointed at 127.0.0.1."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tiny_lm import save_tiny_lm
from tokenfilter import loading
from tokenfilter.cli import main
from tokenfilter.loading import ModelLoadError, load_model, model_source

REPO = "tiny-org/tiny-llama"


def _no_probe(*_args, **_kwargs) -> bool:
    raise AssertionError("the connectivity probe must not run here")


@pytest.fixture
def offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "hub_reachable", _no_probe)


@pytest.fixture
def no_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def _fake_cache(root: Path) -> Path:
    """A Hugging Face cache folder holding REPO at revision ``main``, as ``huggingface_hub`` lays it out."""
    repo = root / f"models--{REPO.replace('/', '--')}"
    save_tiny_lm(repo / "snapshots" / "0123456789abcdef")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return root


def test_cached_hub_id_loads_from_the_cache_without_the_hub(tmp_path, offline_env):
    cache = _fake_cache(tmp_path / "hub")
    folder, kwargs = model_source(REPO, cache_dir=cache)
    assert folder == REPO and kwargs["local_files_only"] is True
    model, tok = load_model(REPO, cache_dir=cache)
    assert not model.training and tok.pad_token is not None


def test_uncached_hub_id_offline_is_one_sentence_naming_the_fix(tmp_path, offline_env):
    with pytest.raises(ModelLoadError) as err:
        load_model("nobody/not-a-model", cache_dir=tmp_path)
    text = str(err.value)
    assert "not a local path" in text and "not in the Hugging Face cache" in text and "HF_HUB_OFFLINE" in text
    assert "local model folder or .gguf file" in text and "go online" in text and "\n" not in text


def test_uncached_hub_id_with_no_connection_says_so(tmp_path, no_env, monkeypatch):
    calls = []
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: calls.append(1) or False)
    with pytest.raises(ModelLoadError, match="hub is unreachable \\(could not connect to huggingface.co"):
        model_source("nobody/not-a-model", cache_dir=tmp_path)
    assert calls == [1]  # one probe, no retries


def test_uncached_hub_id_online_goes_to_the_hub(tmp_path, no_env, monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: True)
    source = model_source("nobody/not-a-model", cache_dir=tmp_path)
    assert source == ("nobody/not-a-model", {"cache_dir": str(tmp_path)})


def test_eval_with_an_unreachable_hub_id_exits_2_with_one_line(capsys, offline_env):
    assert main(["eval", "--model", "nobody/not-a-model", "--tasks", "boolq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "hub is unreachable" in err


def test_probe_answers_for_a_listening_and_a_closed_loopback_port(no_env, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert loading.hub_reachable(timeout=1.5)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert not loading.hub_reachable(timeout=1.5)


def test_probe_goes_through_the_proxy_when_one_is_set(no_env, monkeypatch):
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert loading._probe_address() == ("127.0.0.1", proxy.getsockname()[1])
        assert loading.hub_reachable(timeout=1.5)
