"""Behaviour of FlamingoForConditionalGeneration on the tiny preset."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.generation import LogitsProcessor, LogitsProcessorList

from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from grace_hf.models.flamingo.modeling_flamingo import media_index_from_input_ids
from tests.helpers import tiny_flamingo

VOCAB = 64
MEDIA, EOC, PAD = 1, 0, 2


class FlamingoTester:
    """Tiny config and inputs: two rows, one left-padded, each with one `<image>` in the middle."""

    batch_size = 2

    def __init__(self, **overrides):
        self.config = FlamingoConfig.from_preset("tiny", text_config={"vocab_size": VOCAB}, **overrides)
        self.image_size = self.config.vision_config["image_size"]

    def model(self, seed: int = 0, open_gates: bool = True) -> FlamingoForConditionalGeneration:
        return tiny_flamingo(seed=seed, open_gates=open_gates, config=self.config)

    def inputs(self, seed: int = 1, with_labels: bool = False) -> dict:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(3, VOCAB, (self.batch_size, 9), generator=generator)
        input_ids[:, 4] = MEDIA
        input_ids[1, :2] = PAD
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :2] = 0
        pixel_values = torch.randn(self.batch_size, 1, 1, 3, self.image_size, self.image_size, generator=generator)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        if with_labels:
            labels = input_ids.clone()
            labels[:, :5] = -100
            inputs["labels"] = labels
        return inputs


@pytest.fixture(scope="module")
def model_tester():
    return FlamingoTester()


def test_forward_shapes_and_loss(model_tester):
    model = model_tester.model()
    inputs = model_tester.inputs(with_labels=True)
    out = model(**inputs)
    assert out.logits.shape == (2, 9, VOCAB)
    assert isinstance(out.cache, DynamicCache) and out.cache.get_seq_length() == 9
    labels = inputs["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    features = model.get_image_features(inputs["pixel_values"])
    assert features.shape == (2, 1, model_tester.config.perceiver_num_latents, model_tester.config.vision_width)


def test_tokens_attend_only_to_most_recent_image(model_tester):
    model = model_tester.model()
    input_ids = torch.tensor([[5, 6, MEDIA, 7, 8, MEDIA, 9, 10]])
    pixel_values = torch.randn(1, 2, 1, 3, model_tester.image_size, model_tester.image_size)
    base = model(input_ids=input_ids, pixel_values=pixel_values).logits
    changed_first = pixel_values.clone()
    changed_first[:, 0] = torch.randn_like(changed_first[:, 0])
    other = model(input_ids=input_ids, pixel_values=changed_first).logits
    # text before the first image sees no image; after the second image only the second one counts
    torch.testing.assert_close(other[:, :2], base[:, :2])
    assert not torch.allclose(other[:, 2:5], base[:, 2:5], atol=1e-4)
    assert torch.equal(media_index_from_input_ids(input_ids, MEDIA), torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]]))


def test_text_only_forward_skips_cross_attention(model_tester):
    input_ids = torch.tensor([[5, 6, MEDIA, 7, 8]])
    pixel_values = torch.randn(1, 1, 1, 3, model_tester.image_size, model_tester.image_size)
    open_model, closed_model = model_tester.model(), model_tester.model(open_gates=False)
    text_only = open_model(input_ids=input_ids).logits
    # without images the blocks are skipped: the same as closed (zero) gates, unlike open gates with images
    torch.testing.assert_close(text_only, closed_model(input_ids=input_ids, pixel_values=pixel_values).logits)
    assert not torch.allclose(text_only, open_model(input_ids=input_ids, pixel_values=pixel_values).logits, atol=1e-4)


def test_cache_matches_full_forward_and_refuses_tuples(model_tester):
    model = model_tester.model()
    inputs = model_tester.inputs()
    full = model(**inputs).logits
    features = model.get_image_features(inputs["pixel_values"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prefix = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], image_features=features, use_cache=True)
    step = model(
        input_ids=ids[:, 6:],
        attention_mask=mask,
        image_features=features,
        media_index=media_index_from_input_ids(ids, MEDIA)[:, 6:],
        past_key_values=prefix.cache,
    )
    torch.testing.assert_close(step.logits, full[:, 6:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Cache"):
        model(input_ids=ids, cache=((torch.zeros(1),),))


def test_static_cache_matches_dynamic_cache(model_tester):
    """A `StaticCache` (fixed shapes: keys span its whole length, its fill level stays on the device) gives the
    dynamic cache's logits, step by step and through `generate` (beam search and greedy)."""
    model = model_tester.model()
    inputs = model_tester.inputs()
    features = model.get_image_features(inputs["pixel_values"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    media_index = media_index_from_input_ids(ids, MEDIA)
    outputs = {}
    for name, cache in (("dynamic", DynamicCache()), ("static", StaticCache(config=model.config, max_cache_len=12))):
        prefix = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], image_features=features, cache=cache)
        step = model(
            input_ids=ids[:, 6:],
            attention_mask=mask,
            image_features=features,
            media_index=media_index[:, 6:],
            cache=cache,
        )
        outputs[name] = torch.cat([prefix.logits, step.logits], 1)
    assert torch.is_tensor(cache.get_seq_length())  # read on the device, never on the host
    real = mask.bool()  # a padding position attends to nothing real: its output differs and is never used
    torch.testing.assert_close(outputs["static"][real], outputs["dynamic"][real], atol=1e-5, rtol=1e-5)

    inputs["input_ids"], inputs["attention_mask"] = ids[:, :5], mask[:, :5]
    for num_beams in (3, 1):
        kwargs = dict(num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=4, pad_token_id=PAD)
        kwargs.update(eos_token_id=EOC, do_sample=False, return_dict_in_generate=True, output_scores=True)
        dynamic = model.generate(**inputs, **kwargs)
        static = model.generate(**inputs, cache_implementation="static", **kwargs)
        assert torch.equal(static.sequences, dynamic.sequences)
        if num_beams > 1:
            torch.testing.assert_close(static.sequences_scores, dynamic.sequences_scores)


def test_generate_beam_search_with_and_without_cache(model_tester, monkeypatch):
    model = model_tester.model()
    inputs = model_tester.inputs()
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, :5], inputs["attention_mask"][:, :5]
    calls = []
    vision_forward = model.model.vision_model.forward
    monkeypatch.setattr(model.model.vision_model, "forward", lambda x: calls.append(x.shape) or vision_forward(x))
    kwargs = dict(
        num_beams=4,
        num_return_sequences=4,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=PAD,
        eos_token_id=EOC,
    )
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    assert calls == [
        (2, 3, model_tester.image_size, model_tester.image_size)
    ]  # images encoded once per call, not per beam/step
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert cached.sequences.shape[0] == 8
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores)


def test_generate_with_logits_processor_and_prefix_fn(model_tester):
    model = model_tester.model()
    inputs = model_tester.inputs()
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, :5], inputs["attention_mask"][:, :5]
    allowed = [10, 11, EOC]

    class OnlyAllowed(LogitsProcessor):
        def __call__(self, input_ids, scores):
            mask = torch.full_like(scores, float("-inf"))
            mask[:, allowed] = 0
            return scores + mask

    out = model.generate(
        **inputs,
        num_beams=3,
        max_new_tokens=4,
        logits_processor=LogitsProcessorList([OnlyAllowed()]),
        pad_token_id=PAD,
        eos_token_id=EOC,
    )
    assert set(out[:, 5:].flatten().tolist()) <= set(allowed) | {PAD}
    out = model.generate(
        **inputs, num_beams=3, max_new_tokens=4, prefix_allowed_tokens_fn=lambda b, ids: [12], eos_token_id=EOC
    )
    assert (out[:, 5:] == 12).all()
    text_only = model.generate(input_ids=inputs["input_ids"], max_new_tokens=3, pad_token_id=PAD, eos_token_id=EOC)
    assert text_only.shape == (2, 8)


def test_save_load_and_push_round_trip(model_tester, tmp_path, monkeypatch):
    model = model_tester.model()
    inputs = model_tester.inputs()
    expected = model(**inputs).logits

    hub_root = tmp_path / "hub"

    def create_repo(self, repo_id, **kwargs):
        (hub_root / repo_id).mkdir(parents=True, exist_ok=True)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            target = hub_root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(op.path_or_fileobj, target)

    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no card on the fake hub")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_remote_card))
    model.push_to_hub("someone/tiny-flamingo")
    pushed = hub_root / "someone/tiny-flamingo"
    assert (pushed / "model.safetensors").is_file() and (pushed / "config.json").is_file()

    model.save_pretrained(tmp_path / "local")
    for directory in (tmp_path / "local", pushed):
        loaded, info = FlamingoForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        assert torch.equal(loaded.eval()(**inputs).logits, expected)
        assert not any(p.requires_grad for p in loaded.model.vision_model.parameters())
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "local")
    assert isinstance(auto, FlamingoForConditionalGeneration)
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "local"), FlamingoConfig)


def test_gradient_checkpointing_gives_same_gradients(model_tester):
    inputs = model_tester.inputs(with_labels=True)
    grads = []
    for checkpointing in (False, True):
        model = model_tester.model().train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any("perceiver" in name for name in grads[0]) and not any("vision_model" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_init_weights_reaches_every_parameter(model_tester):
    model = model_tester.model(open_gates=False)
    with torch.no_grad():
        for module in model.modules():
            module._is_hf_initialized = False
        for param in model.parameters():
            param.fill_(float("nan"))
            param.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()
    not_initialised = [name for name, p in model.named_parameters() if torch.isnan(p).any()]
    assert not_initialised == []
    gates = [p for name, p in model.named_parameters() if name.endswith("_gate")]
    assert gates and all(g.item() == 0 for g in gates)
    assert 0.5 < model.model.perceiver.latents.std().item() < 1.5


def test_resize_token_embeddings_keeps_tied_head(model_tester):
    model = model_tester.model()
    model.resize_token_embeddings(VOCAB + 5)
    assert model.config.text_config.vocab_size == VOCAB + 5
    assert model.lm_head.weight.shape == (VOCAB + 5, model_tester.config.text_config.d_model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(input_ids=torch.tensor([[VOCAB + 4, MEDIA]])).logits.shape == (1, 2, VOCAB + 5)


def test_presets_build_on_meta_device():
    for name, layers, every_n in (("openflamingo-3b-vitl-mpt1b", 24, 1), ("openflamingo-9b-vitl-mpt7b", 32, 4)):
        config = FlamingoConfig.from_preset(name)
        with torch.device("meta"):
            model = FlamingoForConditionalGeneration(config)
        blocks = model.model.layers
        assert len(blocks) == layers
        assert [j for j, b in enumerate(blocks) if b.gated_cross_attn is not None] == list(
            range(every_n - 1, layers, every_n)
        )
        assert (blocks[0].self_attn.q_layernorm is not None) == config.text_config.qk_ln
    config = FlamingoConfig.from_preset("openflamingo-3b-vitl-mpt1b")
    assert config.vision_config["width"] == 1024 and config.text_config.d_model == 2048
    with pytest.raises(ValueError, match="unknown Flamingo preset"):
        FlamingoConfig.from_preset("huge")


ZERO3_SCRIPT = """
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration

accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
torch.manual_seed(0)
config = FlamingoConfig.from_preset("tiny", text_config={"vocab_size": 64})
model = FlamingoForConditionalGeneration(config)
model.activation_checkpointing_enable({"use_reentrant": False})
before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)
input_ids = torch.randint(3, 64, (2, 8))
input_ids[:, 2] = config.media_token_id
labels = input_ids.clone()
labels[:, :3] = -100
loss = model(input_ids=input_ids, pixel_values=torch.randn(2, 1, 1, 3, 32, 32), labels=labels).loss
accelerator.backward(loss)
optimizer.step()
state = accelerator.get_state_dict(model)
changed = sum(not torch.equal(state[n].float(), before[n].float()) for n in before if n in state)
assert torch.isfinite(loss), loss
assert changed > len(before) // 2, (changed, len(before))
print("ZERO3_OK", float(loss), changed, len(before))
"""

ZERO3_CONFIG = """
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_save_16bit_model: true
  zero3_init_flag: false
  gradient_clipping: 1.0
  gradient_accumulation_steps: 1
  offload_optimizer_device: none
  offload_param_device: none
mixed_precision: 'no'
num_machines: 1
num_processes: 1
machine_rank: 0
use_cpu: false
"""


@pytest.mark.slow
def test_zero3_training_step_on_cpu(tmp_path):
    (tmp_path / "step.py").write_text(textwrap.dedent(ZERO3_SCRIPT))
    (tmp_path / "zero3.yaml").write_text(ZERO3_CONFIG)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml")]
    result = subprocess.run(
        [*launcher, str(tmp_path / "step.py")], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ZERO3_OK" in result.stdout


def test_config_round_trip_keeps_sub_configs(model_tester, tmp_path):
    config = model_tester.config
    config.save_pretrained(tmp_path)
    loaded = FlamingoConfig.from_pretrained(tmp_path)
    assert loaded.text_config.vocab_size == VOCAB and loaded.vision_config == model_tester.config.vision_config
    assert loaded.to_dict() == config.to_dict()


def test_refuses_ambiguous_or_inconsistent_inputs(model_tester):
    model = model_tester.model()
    inputs = model_tester.inputs()
    features = model.get_image_features(inputs["pixel_values"])
    with pytest.raises(ValueError, match="either pixel_values or image_features"):
        model(**inputs, image_features=features)
    two_images = inputs["input_ids"].clone()
    two_images[:, 6] = MEDIA
    with pytest.raises(ValueError, match="2 <image> tokens but only 1 images"):
        model(input_ids=two_images, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"\(batch, images, frames, C, H, W\)"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:, 0])
