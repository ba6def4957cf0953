"""IdentifierTrie: same answers as the nested-dict reference, exact lookups, and the same beams as HF's
`prefix_allowed_tokens_fn` path when it constrains `generate()`."""

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PrefixConstrainedLogitsProcessor

from benchmarks.dict_trie import NestedDictTrie
from grace_hf.retrieval import IdentifierTrie

EOS, PAD, VOCAB = 1, 0, 24


def random_sequences(rng: random.Random, vocab: int, count: int, max_len: int, eos: int | None = None) -> list:
    """Random identifiers with shared prefixes, repeats and (without `eos`) sequences that prefix others."""
    sequences = [[rng.randrange(2, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(count)]
    sequences += [s[: rng.randint(1, len(s))] for s in rng.choices(sequences, k=count // 3)]  # prefixes of others
    sequences += rng.choices(sequences, k=2)  # repeats
    sequences += [s[:-1] + [rng.randrange(2, vocab)] for s in rng.choices(sequences, k=count // 3) if len(s) > 1]
    return [s + [eos] for s in sequences] if eos is not None else sequences


@pytest.mark.parametrize("seed", range(25))
def test_allowed_and_lookup_match_nested_dict(seed):
    rng = random.Random(seed)
    vocab = rng.randint(3, 12)
    sequences = random_sequences(rng, vocab, rng.randint(1, 30), max_len=6)
    trie, reference = IdentifierTrie(sequences), NestedDictTrie(sequences)
    prefixes = [s[:k] for s in sequences for k in range(len(s) + 1)]
    prefixes += [[rng.randrange(1, vocab + 3) for _ in range(rng.randint(0, 8))] for _ in range(40)]
    first_index = {}
    for index, sequence in enumerate(sequences):
        first_index.setdefault(tuple(sequence), index)
    for prefix in prefixes:
        assert trie.allowed(prefix) == sorted(reference.allowed(prefix)), prefix
    exact = [int(trie.lookup(torch.tensor([p]))[0]) for p in prefixes if p]
    assert exact == [first_index.get(tuple(p), -1) for p in prefixes if p]


def test_lookup_reads_a_row_up_to_its_first_end_token():
    trie = IdentifierTrie([[5, 6, EOS], [5, EOS], [5, 6]])
    rows = torch.tensor([[5, EOS, PAD, PAD], [5, 6, EOS, EOS], [5, 6, PAD, PAD], [5, PAD, 6, EOS], [PAD] * 4])
    assert trie.lookup(rows, end_token_id=EOS).tolist() == [1, 0, -1, -1, -1]
    assert trie.lookup(rows).tolist() == [-1, -1, -1, -1, -1]
    assert trie.lookup(torch.tensor([[5, 6]]), end_token_id=EOS).tolist() == [2]


def test_bad_sequences_are_refused():
    with pytest.raises(ValueError, match="at least one sequence"):
        IdentifierTrie([])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        IdentifierTrie([[1, 2], []])
    with pytest.raises(ValueError, match="token ids"):
        IdentifierTrie([[1, -3]])


def test_save_load_round_trip(tmp_path):
    sequences = random_sequences(random.Random(0), 30, 50, max_len=5, eos=EOS)
    trie = IdentifierTrie(sequences, metadata={"fingerprint": "abc"})
    trie.save(tmp_path / "trie.safetensors")
    loaded = IdentifierTrie.load(tmp_path / "trie.safetensors")
    assert loaded.metadata == {"fingerprint": "abc"}
    assert (loaded.num_sequences, loaded.max_depth, loaded.vocab_bound) == (len(sequences), 6, trie.vocab_bound)
    for name in ("edge_keys", "terminal"):
        assert torch.equal(getattr(loaded, name), getattr(trie, name))
    assert loaded.lookup(torch.tensor([sequences[7]])).item() == trie.lookup(torch.tensor([sequences[7]])).item()

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an identifier trie"):
        IdentifierTrie.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("num_sequences", [40, 400])  # few children per node (index path) / many (boolean path)
def test_processor_equals_prefix_constrained_processor(num_sequences):
    rng = random.Random(num_sequences)
    vocab = 24 if num_sequences == 40 else 600
    sequences = random_sequences(rng, vocab, num_sequences, max_len=4, eos=EOS)
    trie, reference = IdentifierTrie(sequences), NestedDictTrie(sequences)
    prompt_length, num_beams = 3, 4
    prefixes = [s[: rng.randint(0, len(s))] for s in rng.sample(sequences, 15)] + [[vocab - 1, 2, 3]]
    rows = [[7] * prompt_length + p for p in prefixes]
    for length in sorted({len(r) for r in rows}):
        batch = [r for r in rows if len(r) == length]
        batch += [batch[-1]] * (-len(batch) % num_beams)
        input_ids = torch.tensor(batch)
        scores = torch.randn(len(batch), vocab).log_softmax(-1)
        hf = PrefixConstrainedLogitsProcessor(reference.prefix_allowed_tokens_fn(prompt_length, PAD), num_beams)
        expected = hf(input_ids, scores)
        assert torch.equal(trie.logits_processor(prompt_length, dead_token_id=PAD)(input_ids, scores), expected)
        without_dead_token = trie.logits_processor(prompt_length)(input_ids, scores)
        live = [bool(reference.allowed(r[prompt_length:])) for r in batch]
        assert torch.equal(without_dead_token[live], expected[live])
        assert torch.isneginf(without_dead_token[[not x for x in live]]).all()
        overwritten = scores.clone()
        in_place = trie.logits_processor(prompt_length, dead_token_id=PAD, inplace=True)(input_ids, overwritten)
        assert in_place.data_ptr() == overwritten.data_ptr() and torch.equal(in_place, expected)


def test_processor_refuses_scores_narrower_than_the_trie():
    processor = IdentifierTrie([[3, 50]]).logits_processor(0)
    with pytest.raises(ValueError, match="scores cover only 20 tokens"):
        processor(torch.zeros((1, 0), dtype=torch.long), torch.zeros(1, 20))


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


# 3 (+ prefixes and repeats) identifiers: fewer than the beams, so filler beams appear
@pytest.mark.parametrize(("num_sequences", "length_penalty"), [(30, 0.0), (3, -2.0)])
def test_generate_gives_the_same_beams_as_prefix_allowed_tokens_fn(tiny_lm, length_penalty, num_sequences):
    rng = random.Random(num_sequences)
    sequences = random_sequences(rng, VOCAB, num_sequences, max_len=4, eos=EOS)
    trie, reference = IdentifierTrie(sequences), NestedDictTrie(sequences)
    prompts = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    num_beams = 6
    common = dict(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=trie.max_depth,
        length_penalty=length_penalty,
        eos_token_id=EOS,
        pad_token_id=PAD,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    prompt_length = prompts.shape[1]
    with torch.no_grad():
        ours = tiny_lm.generate(**common, logits_processor=[trie.logits_processor(prompt_length, dead_token_id=PAD)])
        theirs = tiny_lm.generate(
            **common, prefix_allowed_tokens_fn=reference.prefix_allowed_tokens_fn(prompt_length, PAD)
        )
    # the same search step by step, down to the filler beams
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.sequences_scores, theirs.sequences_scores)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, theirs.scores, strict=True))
    found = trie.lookup(ours.sequences[:, prompt_length:], end_token_id=EOS).view(len(prompts), num_beams)
    # beams that finished an identifier; filler beams (fewer identifiers than beams) keep beam search's -1e9 and
    # may repeat a finished identifier
    finished = (ours.sequences_scores > -1e8).view(len(prompts), num_beams)
    assert (found[finished] >= 0).all()
    distinct = len({tuple(s) for s in sequences})
    assert finished.sum(1).tolist() == [min(num_beams, distinct)] * len(prompts)
    assert all(len(set(row[ok].tolist())) == int(ok.sum()) for row, ok in zip(found, finished))  # no repeats
