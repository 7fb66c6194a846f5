"""The embedded corpus, its tokenizer, and the data-spec loaders."""

from __future__ import annotations

import numpy as np
import pytest

from efficientgpt.data import corpus, sources, tokens
from efficientgpt.data.tokenizer import embedded_tokenizer
from efficientgpt.errors import UserError


def test_documents_split_by_name_hash_and_exclude_tests():
    docs = corpus.documents("code")
    names = [d.name for d in docs]
    assert len(names) == len(set(names)) > 300
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n or "idle_test" in n for n in names)
    splits = {corpus.split_of(n) for n in names}
    assert splits == {"train", "validation", "test"}
    assert all(corpus.split_of(n) == corpus.split_of(n) for n in names[:50])  # pure function


def test_prose_holds_pydoc_topics_and_docstrings():
    docs = corpus.documents("prose")
    assert any(d.name.startswith("pydoc:") for d in docs)
    assert any(d.name.startswith("stdlib:") for d in docs)
    train = corpus.corpus_text("prose", "train")
    val = corpus.corpus_text("prose", "validation")
    assert len(train) > 10 * len(val) > 0
    assert corpus.fingerprint(val) == corpus.fingerprint(corpus.corpus_text("prose", "validation"))


def test_tokenizer_is_byte_level_bpe_and_round_trips_code():
    tok, path = embedded_tokenizer()
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 4096 and tok.eos_token == "<|endoftext|>"
    text = corpus.corpus_text("code", "validation")[:5000] + "\nünïcödé ✓ 漢字\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (path / "tokenizer.json").exists()


def test_encode_is_cached_and_stable():
    tok, _ = embedded_tokenizer()
    data = sources.load_text("embedded:prose", "validation")
    a = tokens.encode(tok, data)
    b = tokens.encode(tok, data)
    assert a.dtype == np.uint16 and np.array_equal(a, b)
    assert tok.decode(a[:200].tolist()) == data.text[: len(tok.decode(a[:200].tolist()))]


def test_text_file_and_split_directory(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello world\n" * 10)
    assert sources.load_text(str(f), "test").text == "hello world\n" * 10
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text("train text")
    assert sources.load_text(str(d), "train").text == "train text"
    with pytest.raises(UserError, match=r"has no validation.txt \(found: train.txt\)"):
        sources.load_text(str(d), "validation")


def test_bad_data_specs_are_clear(tmp_path):
    with pytest.raises(UserError, match="'nope.txt' is not a file or directory, nor a known spec"):
        sources.load_text("nope.txt")
    with pytest.raises(UserError, match="unknown embedded data 'embedded:poetry'"):
        sources.load_text("embedded:poetry")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        sources.load_text(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        sources.load_text(str(binary))


def test_too_short_for_one_window():
    with pytest.raises(UserError, match="has 5 tokens, fewer than one window of 16 tokens"):
        tokens.eval_windows(np.arange(5), 16)
    with pytest.raises(UserError, match="fewer than one window of 17"):
        tokens.WindowSampler(np.arange(10), 16, 4)


def test_hf_loader_reads_a_local_wikitext_layout(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "wikitext" / "wikitext-2-raw-v1"
    root.mkdir(parents=True)
    rows = {"train": ["", " = Title = \n", " Some text . \n"], "test": [" = Test = \n", " Words here . \n"]}
    for split, texts in rows.items():
        pq.write_table(pa.table({"text": texts}), root / f"{split}-00000-of-00001.parquet")
    data = sources.load_text(f"hf:{root}", "test")
    assert data.text == "\n\n".join(rows["test"])  # the WikiText-2 protocol's join
    assert sources.load_text(f"hf:{root}", "train").text == "\n\n".join(rows["train"])
    with pytest.raises(UserError, match="has no validation"):
        sources.load_text(f"hf:{root}", "validation")


def test_window_sampler_shards_the_global_batch():
    data = np.arange(1000)
    full = tokens.WindowSampler(data, 8, 6, seed=3)(5)["input_ids"]
    parts = [tokens.WindowSampler(data, 8, 6, seed=3, rank=r, world=2)(5)["input_ids"] for r in range(2)]
    assert full.shape == (6, 8)
    assert np.array_equal(full[0::2], parts[0]) and np.array_equal(full[1::2], parts[1])
    assert not np.array_equal(full, tokens.WindowSampler(data, 8, 6, seed=3)(6)["input_ids"])
