"""Corpus reading and splitting, the tokenizer's mask token, packing and the resumable sampler."""
import json

import pytest
import torch

from tidar_kernels.training import data
from tidar_kernels.training.objective import PAD_DOC_ID


def test_stdlib_corpus_is_real_code_and_split_is_deterministic():
    a = data.build_corpus(max_chars=200_000)
    b = data.build_corpus(max_chars=200_000)
    assert [d.name for d in a.train] == [d.name for d in b.train]
    assert [d.name for d in a.heldout] == [d.name for d in b.heldout]
    assert not {d.name for d in a.train} & {d.name for d in a.heldout}
    assert sum(len(d.text) for d in a.train) <= 200_000
    assert all(d.name.endswith(".py") and "site-packages" not in d.name for d in a.train + a.heldout)
    assert any("def " in d.text for d in a.train)


def test_split_depends_only_on_the_document_name(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i}.txt").write_text(f"text {i}\n")
    full = data.build_corpus([str(tmp_path)], heldout_fraction=0.25)
    (tmp_path / "extra.txt").write_text("more\n")
    grown = data.build_corpus([str(tmp_path)], heldout_fraction=0.25)
    assert {d.name for d in full.heldout} <= {d.name for d in grown.heldout}
    assert 3 <= len(full.heldout) <= 18


def test_directory_split_key_does_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for i in range(12):
        (tmp_path / "corpus" / "sub" / f"f{i}.py").write_text(f"x = {i}\n")
    monkeypatch.chdir(tmp_path)
    spellings = ["corpus", "corpus/", "./corpus", str(tmp_path / "corpus")]
    splits = [data.build_corpus([s], heldout_fraction=0.3) for s in spellings]
    for corpus in splits:
        assert [d.name for d in corpus.train] == [d.name for d in splits[0].train]
        assert [d.name for d in corpus.heldout] == [d.name for d in splits[0].heldout]
    assert {d.name for d in splits[0].train + splits[0].heldout} == {f"sub/f{i}.py" for i in range(12)}


def test_glob_and_directory_keys_are_paths_under_the_source(tmp_path):
    """Same-named files in different folders get different split keys; JSONL inside a directory is read
    line by line; a glob keys by the path under its literal prefix."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.py").write_text(f"# {folder}\n")
    (tmp_path / "a" / "rows.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    by_glob = data.read_source(str(tmp_path / "**" / "*.py"))
    assert sorted(d.name for d in by_glob) == ["a/x.py", "b/x.py"]
    by_dir = data.read_source(str(tmp_path))
    assert sorted(d.name for d in by_dir) == ["a/rows.jsonl:1", "a/rows.jsonl:2", "a/x.py", "b/x.py"]
    assert sorted(d.text for d in by_dir if d.name.startswith("a/rows")) == ["one", "two"]


def test_sources_directory_glob_jsonl_and_file(tmp_path):
    (tmp_path / "a.py").write_text("print('a')\n")
    (tmp_path / "b.md").write_text("# b\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\xff")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "x": 1}) + "\n")
    from_dir = data.read_source(str(tmp_path))
    assert {d.text for d in from_dir if ".jsonl:" not in d.name} == {"print('a')\n", "# b\n"}
    assert [d.text for d in from_dir if d.name.startswith("c.jsonl:")] == ["first", "second"]
    assert [d.text for d in data.read_source(str(jsonl))] == ["first", "second"]
    assert [d.text for d in data.read_source(str(tmp_path / "*.py"))] == ["print('a')\n"]
    assert [d.text for d in data.read_source(str(tmp_path / "b.md"))] == ["# b\n"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="text_field='text'"):
        data.read_source(str(tmp_path / "bad.jsonl"))
    assert [d.text for d in data.read_source(str(tmp_path / "bad.jsonl"), text_field="content")] == ["x"]


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty training corpus"):
        data.build_corpus([str(tmp_path)])
    with pytest.raises(ValueError, match="not a file, a directory or a glob"):
        data.build_corpus([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="empty training corpus"):
        data.build_corpus([str(tmp_path / "*.nothing")])


@pytest.fixture(scope="module")
def tokenizer():
    corpus = data.build_corpus(max_chars=300_000)
    return data.train_tokenizer((d.text for d in corpus.train), vocab_size=512)


def test_tokenizer_has_dedicated_mask_token_and_round_trips(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 512
    assert tokenizer.mask_id != tokenizer.eos_id
    text = "def f(x):\n    return {'a': x}  # ünïcode\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.mask_id not in ids
    literal = tokenizer.encode("a <|mask|> and <|endoftext|> in the text stay text")
    assert tokenizer.mask_id not in literal and tokenizer.eos_id not in literal
    tokenizer.save(tmp_path)
    loaded = data.TextTokenizer.load(tmp_path)
    assert (loaded.mask_id, loaded.eos_id, loaded.encode(text)) == (tokenizer.mask_id, tokenizer.eos_id, ids)


def test_missing_mask_token_is_an_error():
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens([data.EOS_TOKEN])
    with pytest.raises(ValueError, match="dedicated mask token"):
        data.TextTokenizer(tok)
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(["x"], vocab_size=100)


def test_pack_documents_marks_boundaries_and_padding():
    packed = data.pack_documents([[5, 6, 7], [], [8, 9]], seq_len=4, eos_id=0)
    assert packed.tokens.tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert packed.doc_ids.tolist() == [[0, 0, 0, 0], [2, 2, 2, PAD_DOC_ID]]
    with pytest.raises(ValueError, match="at least one non-empty"):
        data.pack_documents([[], []], 4, 0)


def test_sampler_resumes_the_same_sequence_and_covers_each_epoch():
    a = data.BatchSampler(10, seed=3)
    first = a.next_rows(7)
    state = a.state_dict()
    rest = a.next_rows(13)
    b = data.BatchSampler(10, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.next_rows(13), rest)
    assert sorted(torch.cat([first, rest[:3]]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="same data"):
        data.BatchSampler(11, seed=3).load_state_dict(state)


def test_unigram_baseline_is_entropy_like():
    train = data.pack_documents([[1, 1, 1, 2]], 4, eos_id=3)
    value = data.unigram_cross_entropy(train, train, vocab_size=4)
    assert 0.5 < value < torch.log(torch.tensor(4.0)).item()
