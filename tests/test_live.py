"""The live-model API in one process (the TP/PP/EP cases run under torchrun in test_parallel.py)."""
import pytest
import torch

from converter import ConversionError, derive, load_hf_weights, megatron_model, save_hf_weights
from converter.model import mcore_logits
from converter.verify import SAMPLE_TEXT, compare, token_ids
from test_convert import assert_bit_exact


@pytest.mark.parametrize("name", ["Qwen/Qwen3-30B-A3B", "microsoft/Phi-3-mini-4k-instruct"])
def test_megatron_model_matches_hf_and_saves_back(name, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_models(name)
    model = megatron_model(hf, dtype="fp32").eval()
    ids = token_ids(hf, SAMPLE_TEXT, derive(hf).vocab_size)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(ids).logits
    r = compare(mcore_logits(model, ids), ref)
    assert r["rel_err"] < 1e-5 and r["top1_agreement"] == 1.0, r
    assert_bit_exact(hf, save_hf_weights(model, tmp_path / "back", like=hf))
    with pytest.raises(ConversionError, match="exists"):
        save_hf_weights(model, tmp_path / "back", like=hf)


def test_wrong_checkpoint_is_named(tiny_models):
    model = derive(tiny_models("Qwen/Qwen3-8B")).build_model(device="cpu")
    with pytest.raises(ConversionError, match="q_norm|k_norm|layernorm"):
        load_hf_weights(model, tiny_models("meta-llama/Llama-2-7b-hf"))
