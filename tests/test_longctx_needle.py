"""The needle builder hits the asked length and depth; LongBench truncation with a real tokenizer;
heat maps and the runner end to end on a tiny random model (no hub, no real weights)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tokenfilter.longctx import longbench
from tokenfilter.longctx.needle import Needle, NeedleBuilder, load_haystack_text
from tokenfilter.longctx.plots import needle_heatmap, safe_name

WORDS = ("the", "cat", "dog", "sat", "ran", "on", "under", "mat", "house", "garden", "river", "quickly", "slowly")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def filler(n_sentences: int = 400, seed: int = 0) -> str:
    """Short sentences of 4-9 words, in paragraphs of 6."""
    rng = random.Random(seed)
    sentences = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "." for _ in range(n_sentences)
    ]
    paragraphs = [" ".join(sentences[i : i + 6]) for i in range(0, n_sentences, 6)]
    return "\n\n".join(paragraphs)


def make_tokenizer(chat: bool = False, vocab_size: int = 600) -> object:
    """A byte-level BPE tokenizer trained here on the filler (fast tokenizer: has offsets)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    n = Needle()
    extra = " ".join([n.instruction, n.sentence, n.question, n.answer_prefix, "Question: Answer: user assistant"])
    tok.train_from_iterator([filler(), extra, extra, extra], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


class CharTokenizer:
    """A fake tokenizer without offsets: one token per character (ids = code points)."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True, **_: object) -> dict:
        if _.get("return_offsets_mapping"):
            raise NotImplementedError
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


NEEDLE = Needle()


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [200, 400, 800])
def test_needle_length_and_depth(chat: bool, length: int) -> None:
    tok = make_tokenizer(chat)
    builder = NeedleBuilder(tok, filler(), needle=NEEDLE, tolerance=2)
    assert builder.chat is chat
    for depth in (0, 25, 50, 75, 100):
        p = builder.build(length, depth)
        assert abs(len(p.input_ids) - length) <= 2, (depth, len(p.input_ids))
        # the needle's tokens are where the builder says
        assert tok.decode(p.input_ids[p.needle_start : p.needle_end]).strip() == NEEDLE.sentence
        text = tok.decode(p.input_ids)
        assert text.count(NEEDLE.sentence) == 1
        assert text.endswith(NEEDLE.answer_prefix)
        assert ("<|im_start|>assistant" in text) is chat
        # at the asked depth, within one sentence (<= 12 tokens here) of the filler
        filler_tokens = (p.context_end - p.context_start) - (p.needle_end - p.needle_start)
        assert abs(p.actual_depth - depth) <= 100 * 12 / filler_tokens + 1e-9, (depth, p.actual_depth)
        # snapped to a sentence boundary: the needle follows a full stop or starts the context
        before = tok.decode(p.input_ids[p.context_start : p.needle_start]).rstrip()
        assert before == "" or before.endswith("."), before[-20:]
        assert depth != 0 or before == ""
        assert depth != 100 or tok.decode(p.input_ids[p.needle_end : p.context_end]).strip() == ""


def test_needle_builder_without_offsets() -> None:
    builder = NeedleBuilder(CharTokenizer(), filler(), needle=NEEDLE, tolerance=1)
    for depth in (0, 33, 50, 100):
        p = builder.build(1500, depth)
        assert abs(len(p.input_ids) - 1500) <= 1
        text = "".join(chr(i) for i in p.input_ids)
        i = text.index(NEEDLE.sentence)
        assert p.needle_start in (i, i - 1)
        assert abs(p.actual_depth - depth) <= 100 * 60 / 1500
        assert text[:i].rstrip().endswith((".", "question about it."))


def test_needle_errors() -> None:
    builder = NeedleBuilder(make_tokenizer(), filler(20), needle=NEEDLE)
    with pytest.raises(ValueError, match="too short"):
        builder.build(10, 50)
    with pytest.raises(ValueError, match="haystack has"):
        builder.build(5000, 50)
    with pytest.raises(ValueError, match="depth"):
        builder.build(100, 150)


def test_needle_score() -> None:
    assert NEEDLE.score(" 7481263.") == 1.0
    assert NEEDLE.score(" 7481262.") == 0.0


def test_haystack_folder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("Second essay.\n")
    (tmp_path / "a.txt").write_text("First essay.\n")
    assert load_haystack_text(tmp_path) == "First essay.\n\nSecond essay."
    with pytest.raises(ValueError, match="does not exist"):
        load_haystack_text(tmp_path / "missing")


def test_truncate_prompt_with_tokenizer() -> None:
    tok = make_tokenizer()
    prompt = "Question first. " + filler(200) + " Question last?"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    cut = longbench.truncate_prompt(tok, prompt, 300)
    assert cut.startswith("Question first.") and cut.endswith("Question last?")
    assert abs(len(tok(cut, add_special_tokens=False)["input_ids"]) - 300) <= 3
    assert longbench.truncate_prompt(tok, "short", 300) == "short"


def test_load_task_from_folder(tmp_path: Path) -> None:
    data = {
        "1": {
            "origin_prompt": "p1",
            "gold": {"all_classes": ["A", "B"], "answers": ["B"]},
            "prediction": "x",
            "time": 1,
        },
        "0": {
            "origin_prompt": "p0",
            "gold": {"all_classes": ["A", "B"], "answers": ["A"]},
            "prediction": "x",
            "time": 1,
        },
    }
    (tmp_path / "MiniLongBench_trec.json").write_text(json.dumps(data))
    samples = longbench.load_task("trec", tmp_path)
    assert [s.id for s in samples] == ["0", "1"]
    assert samples[0].answers == ("A",) and samples[0].all_classes == ("A", "B")
    assert len(longbench.load_task("trec", tmp_path, limit=1)) == 1
    with pytest.raises(ValueError, match="does not exist"):
        longbench.load_task("qasper", tmp_path)
    with pytest.raises(ValueError, match="non-English"):
        longbench.load_task("dureader", tmp_path)


def test_real_minilongbench_files() -> None:
    if not longbench.MINILONGBENCH_DIR.exists():
        pytest.skip(f"{longbench.MINILONGBENCH_DIR} is absent")
    tasks = longbench.load_tasks(limit=2)
    assert set(tasks) == set(longbench.ENGLISH_TASKS)
    assert all(1 <= len(s) <= 2 for s in tasks.values())
    assert tasks["trec"][0].all_classes and tasks["passage_retrieval_en"][0].answers[0].startswith("Paragraph ")


def test_heatmap_png(tmp_path: Path) -> None:
    grid = {1024: {0.0: 1.0, 50.0: 0.0}, 2048: {0.0: 1.0}}
    path = needle_heatmap(grid, [1024, 2048], [0.0, 50.0], tmp_path / "h.png", "dense")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert safe_name("ratio=0.25 / random") == "ratio_0.25_random"


def _tiny_llama(vocab: int) -> torch.nn.Module:
    from tiny_lm import tiny_llama

    return tiny_llama(vocab, max_position_embeddings=400, eos_token_id=2, bos_token_id=1)


def _fake_longbench(folder: Path) -> None:
    prompt = "Answer briefly.\n\n" + filler(100) + "\n\nQuestion: what sat?\nAnswer:"
    for task, gold in (
        ("hotpotqa", ["the cat"]),
        ("trec", {"all_classes": ["Animal", "Date"], "answers": ["Animal"]}),
        ("passage_count", ["3"]),
    ):
        (folder / f"MiniLongBench_{task}.json").write_text(
            json.dumps({str(i): {"origin_prompt": prompt, "gold": gold, "prediction": "", "time": 0} for i in range(3)})
        )


def test_runner_end_to_end_tiny(tmp_path: Path) -> None:
    from tokenfilter.longctx.runner import run_longctx, summary_table

    tok = make_tokenizer(chat=True)
    model = _tiny_llama(len(tok))
    _fake_longbench(tmp_path)
    methods: dict = {"dense": None}
    try:
        from tokenfilter import TokenFilter
        from tokenfilter.config import SlidingWindowShare

        methods["ratio=0.3"] = TokenFilter(ratio=0.3)
        methods["window"] = SlidingWindowShare(held=0.5)  # sized on each prompt
    except ImportError:
        pass
    haystack = tmp_path / "hay"
    haystack.mkdir()
    (haystack / "essay.txt").write_text(filler())
    kwargs = dict(
        limit=2,
        progress=False,
        needle_lengths=(128, 256, 1000),
        needle_depths=(0, 50, 100),
        max_length=200,
        tasks=["hotpotqa", "trec", "passage_count"],
        haystack=haystack,
        longbench_dir=tmp_path,
        needle_max_new_tokens=4,
        max_new_tokens_cap=4,
    )
    result = run_longctx(model, tok, methods, output_dir=tmp_path / "out", **kwargs)
    # 1000 is clipped to the model's 400 positions minus the answer's 4 tokens
    assert result["config"]["needle_lengths"] == [128, 256, 396]
    for name in methods:
        entry = result["methods"][name]
        assert len(entry["needle"]["cells"]) == 9
        assert set(entry["needle"]["grid"]) == {"128", "256", "396"}
        assert all(abs(c["tokens"] - c["length"]) <= 2 for c in entry["needle"]["cells"])
        tasks = entry["longbench"]["tasks"]
        assert set(tasks) == {"hotpotqa", "trec", "passage_count"} and all(t["n"] == 2 for t in tasks.values())
        assert all(s["tokens"] <= 400 - 32 for t in tasks.values() for s in t["samples"])
        assert (entry["stats"] is None) == (name == "dense")
        assert (tmp_path / "out" / f"needle_{safe_name(name)}.png").exists()
    if "ratio=0.3" in methods:
        assert result["methods"]["ratio=0.3"]["stats"]["ratio"] > 0
        window = result["methods"]["window"]["stats"]  # one apply per prompt: 9 needle prompts, 3 tasks x 2
        assert window["prompts"] == 15 and abs(window["kv_held_fraction"] - 0.5) < 0.1 and window["ratio"] > 0.3
    saved = json.loads((tmp_path / "out" / "longctx.json").read_text())
    assert saved["methods"].keys() == result["methods"].keys()
    assert "| dense |" in summary_table(result)
    _resume_keeps_what_matches(tmp_path, tok, model, methods, saved, kwargs)


def _resume_keeps_what_matches(tmp_path: Path, tok, model, methods: dict, saved: dict, kwargs: dict) -> None:
    """A resumed run keeps the saved methods with the same filter on the same prompts, runs the rest, and
    runs everything again when the prompts differ."""
    import tokenfilter.longctx.runner as runner

    ran: list[str] = []
    real = runner._run_method

    def spy(model, tokenizer, method, name, *rest):
        ran.append(name)
        return real(model, tokenizer, method, name, *rest)

    partial = {**saved, "methods": {k: v for k, v in saved["methods"].items() if k != "dense"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "_run_method", spy)
        again = runner.run_longctx(model, tok, methods, output_dir=tmp_path / "again", previous=partial, **kwargs)
        assert ran == ["dense"] and sorted(again["reused"]) == sorted(set(methods) - {"dense"})
        redone = json.loads(json.dumps(again["methods"], default=str))
        assert all(redone[k] == saved["methods"][k] for k in partial["methods"])  # kept as saved
        assert redone["dense"]["needle"]["grid"] == saved["methods"]["dense"]["needle"]["grid"]  # dense: greedy
        assert (tmp_path / "again" / f"needle_{safe_name(next(iter(partial['methods'])))}.png").exists()
        ran.clear()
        other = {**kwargs, "needle_depths": (0, 100)}
        runner.run_longctx(model, tok, {"dense": None}, output_dir=tmp_path / "other", previous=saved, **other)
        assert ran == ["dense"]  # other prompts: nothing is reused


def test_several_facts_per_cell_average_in_the_grid(monkeypatch):
    import tokenfilter.longctx.runner as runner
    from tokenfilter.longctx.needle import NEEDLES

    select, heldout = NEEDLES["select"], NEEDLES["heldout"]
    assert len(select) == len(heldout) == 3
    assert not {n.answer for n in select} & {n.answer for n in heldout}  # the halves share no fact
    tok = make_tokenizer()
    builder = NeedleBuilder(tok, filler(), needle=select[0])
    prompts = [builder.for_needle(fact).build(160, 50) for fact in select]
    for fact, p in zip(select, prompts, strict=True):
        assert fact.sentence in tok.decode(p.input_ids[p.needle_start : p.needle_end]).strip()
    # a "model" that always answers with the first fact's answer
    monkeypatch.setattr(runner, "greedy", lambda model, tokenizer, ids, n, first_line=False: select[0].answer)
    out = runner.run_needle(None, tok, prompts, list(select), progress=False)
    assert [c["score"] for c in out["cells"]] == [1.0, 0.0, 0.0]
    assert out["grid"] == {"160": {"50": pytest.approx(1 / 3)}}
    assert [c["needle"] for c in out["cells"]] == [f.answer for f in select]
    with pytest.raises(ValueError, match="one needle per prompt"):
        runner.run_needle(None, tok, prompts, list(select[:2]), progress=False)
