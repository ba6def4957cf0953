"""TrieBeamSearch, the retriever's fast path, against transformers' beam search with `TrieLogitsProcessor`: the same
finished identifiers in the same order with the same scores; its step compiles as one graph; neither it nor the trie
processor reads anything on the host (checked on the meta device, where a read raises)."""

import random

import pytest
import torch

from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from grace_hf.retrieval import IdentifierTrie, TrieBeamSearch
from tests.helpers import tiny_flamingo

VOCAB = 64
MEDIA, EOC, PAD = 1, 0, 2


@pytest.fixture(scope="module")
def model():
    return tiny_flamingo(VOCAB)  # the gates open, so that the image features matter


def random_identifiers(count: int, seed: int = 0) -> list[list[int]]:
    """Identifiers of 1-4 tokens + EOC sharing prefixes; with many, the root and its children are wide (dense rows)."""
    rng = random.Random(seed)
    sequences = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 4))] for _ in range(count)]
    sequences += [s[:-1] + [rng.randrange(3, VOCAB)] for s in sequences[: count // 2] if len(s) > 1]
    return [s + [EOC] for s in sequences]


def random_trie(count: int, seed: int = 0) -> IdentifierTrie:
    return IdentifierTrie(random_identifiers(count, seed))


def prompts(model, with_images: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Three prompts of 7 tokens ending in `<image>`, the second left-padded by 2; features of one image each."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
    input_ids[:, -1] = MEDIA
    input_ids[1, :2] = PAD
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    features = None
    if with_images:
        size = model.config.vision_config["image_size"]
        features = model.get_image_features(torch.randn(3, 1, 1, 3, size, size, generator=generator))
    return input_ids, attention_mask, features


def generate_beams(model, trie, input_ids, attention_mask, features, num_beams, length_penalty):
    """What `GraceRetriever` gets from `generate`: identifier index and score per beam, (B, K)."""
    prompt_length = input_ids.shape[1]
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_features=features,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=trie.max_depth,
        length_penalty=length_penalty,
        early_stopping=False,
        do_sample=False,
        eos_token_id=EOC,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
        logits_processor=[trie.logits_processor(prompt_length, PAD, inplace=True)],
    )
    found = trie.lookup(output.sequences[:, prompt_length:], end_token_id=EOC).view(-1, num_beams)
    return found, output.sequences_scores.view(-1, num_beams)


def assert_same_beams(output, expected_ids, expected_scores):
    """Equal on the finished beams; filler beams (score ~ -1e9) only need to stay filler."""
    real = expected_scores > -1e8
    assert torch.equal(output.scores > -1e8, real)
    assert torch.equal(output.identifiers[real], expected_ids[real])
    assert (expected_ids[real] >= 0).all()
    torch.testing.assert_close(output.scores[real], expected_scores[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("count", "num_beams", "length_penalty", "with_images"),
    [(60, 6, 0.0, False), (60, 3, 1.0, True), (3, 6, -2.0, True)],  # the last: fewer identifiers than beams
)
def test_same_beams_as_generate(model, count, num_beams, length_penalty, with_images):
    trie = random_trie(count)
    inputs = prompts(model, with_images)
    expected = generate_beams(model, trie, *inputs, num_beams, length_penalty)
    search = TrieBeamSearch(model, trie, num_beams, EOC, PAD, length_penalty)
    assert_same_beams(search(*inputs), *expected)


def test_reused_cache_gives_the_same_beams(model):
    """A second call with the same shapes reuses the cache (stale keys must not leak); another shape gets its own."""
    trie = random_trie(60)
    search = TrieBeamSearch(model, trie, 4, EOC, PAD, max_shapes=1)
    first = prompts(model, with_images=True)
    other = prompts(model, with_images=True, seed=2)
    expected = generate_beams(model, trie, *first, 4, 0.0)
    assert_same_beams(search(*first), *expected)
    search(*other)
    search(first[0][:1], first[1][:1], first[2][:1])  # another batch size: the oldest cache is dropped
    assert_same_beams(search(*first), *expected)
    assert len(search._shapes) == 1


def test_compiled_step_gives_the_same_beams(model):
    """The decoding step (model forward on the static cache, trie mask and advance, beam bookkeeping, cache reorder)
    traces as one graph under `torch.compile(fullgraph=True)` and gives the same beams."""
    trie = random_trie(60)
    inputs = prompts(model, with_images=True)
    traced = TrieBeamSearch(model, trie, 4, EOC, PAD, compile={"backend": "eager"})
    assert_same_beams(traced(*inputs), *generate_beams(model, trie, *inputs, 4, 0.0))


def host_reads(fn, *args) -> str | None:
    """Run `fn` on meta tensors, which have shapes but no data: a host read (`.item()`, `int(tensor)`, `.tolist()`,
    a shape that depends on values: `unique`, boolean indexing) raises; returns its message, None if there is none."""
    try:
        fn(*args)
    except (RuntimeError, NotImplementedError) as err:
        return str(err).splitlines()[0]
    return None


def test_search_and_trie_step_read_nothing_on_the_host():
    """The whole search after the prompt check (prefill, every step), and the eager path's processor, on meta."""
    with torch.device("meta"):
        model = FlamingoForConditionalGeneration(FlamingoConfig.from_preset("tiny", text_config={"vocab_size": VOCAB}))
    trie = random_trie(60)
    search = TrieBeamSearch(model.eval(), trie, 4, EOC, PAD)
    input_ids = torch.zeros(3, 8, dtype=torch.long, device="meta")
    features = torch.zeros(3, 1, model.config.perceiver_num_latents, model.config.vision_width, device="meta")
    inputs = (input_ids, torch.ones_like(input_ids), features)
    shape = search._shape(("meta",), inputs)
    with torch.no_grad():
        for _ in range(2):  # the first call initialises the caches; the second is what a CUDA graph captures
            assert host_reads(search._search, shape, *inputs) is None
    processor = trie.logits_processor(prompt_length=2, dead_token_id=PAD, inplace=True)
    for depth in range(trie.max_depth + 1):
        scores = torch.zeros(12, VOCAB, device="meta")
        assert host_reads(processor, torch.zeros(12, 2 + depth, dtype=torch.long, device="meta"), scores) is None
    # what the processor did before: size the step by the widest row
    assert "item()" in host_reads(lambda count: torch.arange(int(count.max())), torch.ones(3, device="meta"))
    assert host_reads(torch.unique, torch.ones(3, device="meta")) is not None


def test_mask_for_any_depth_equals_mask_for_its_depth():
    """The compiled step sizes the mask for every depth at once (depth=None): the same result, wide nodes included."""
    identifiers = random_identifiers(60, seed=3)
    trie = IdentifierTrie(identifiers)
    tables = trie.step_tables()
    assert tables.wide_at[0] and not all(tables.wide_at)  # a wide root, narrow leaves
    generator = torch.Generator().manual_seed(0)
    longest = [s for s in identifiers if len(s) == 5]
    sequences = [longest[0], longest[1], [PAD, *longest[0][1:]]]  # the last leaves the trie at once
    node = torch.zeros(len(sequences), dtype=torch.long)
    for depth in range(5):
        scores = torch.randn(len(sequences), VOCAB, generator=generator)
        assert torch.equal(trie.mask_scores(node, scores, PAD, depth), trie.mask_scores(node, scores, PAD, None))
        tokens = torch.tensor([s[depth] for s in sequences])
        node = trie.advance(node, tokens)
        prefixes = torch.tensor([s[: depth + 1] for s in sequences])
        assert torch.equal(node, trie.walk(prefixes))
    assert trie.lookup(torch.tensor(sequences)).tolist() == [identifiers.index(s) for s in sequences[:2]] + [-1]
    assert node[2] == -1 and (node[:2] >= 0).all()
