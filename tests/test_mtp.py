"""Multi-token-prediction layers (issue 17) are converted, or left out only when asked and then said; what
megatron-core cannot represent is refused by name. Megatron-LM's own load of them, their logits against the
reference and the round trips: test_megatron_lm.py::test_mtp_layers_in_megatron_lm."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter import ConversionError
from converter.convert import convert

DS = "deepseek-ai/DeepSeek-V3"


def _edit(hf, dst, fn):
    shutil.copytree(hf, dst)
    t = load_file(dst / "model.safetensors")
    fn(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_left_out_only_when_asked_and_then_said(mtp_models, tmp_path):
    hf = mtp_models(DS)
    r = subprocess.run([sys.executable, "-m", "converter", "convert", hf, tmp_path / "no", "--no-mtp",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "WARNING: multi-token-prediction layers left out on purpose (--no-mtp): the tensors of model.layers.3" \
        in r.stdout
    m = json.loads((tmp_path / "no" / "hf2mcore.json").read_text())
    assert m["mtp_layers"] == 0 and any("--no-mtp" in w for w in m["warnings"])
    held = [k for k in load_file(hf / "model.safetensors") if k.startswith("model.layers.3.")]
    assert sorted(m["tensors"]["ignored"]) == sorted(held)
    assert "--mtp-num-layers" not in (tmp_path / "no" / "megatron_args.sh").read_text()
    r = subprocess.run([sys.executable, "-m", "converter", "inspect", hf, "--format", "args"],
                       capture_output=True, text=True)
    assert "--mtp-num-layers 1" in r.stdout, r.stdout + r.stderr


def test_declared_but_absent_is_said(tiny_models, tmp_path):
    """Most re-uploads strip the MTP layer but keep num_nextn_predict_layers: nothing to convert, and it says so."""
    out = convert(tiny_models(DS), tmp_path / "mc", progress=False)
    m = json.loads((out / "hf2mcore.json").read_text())
    assert m["mtp_layers"] == 0 and any("the weights hold none" in w for w in m["warnings"])


def test_a_copy_that_differs_is_refused(mtp_models, tmp_path):
    def change(t):
        t["model.layers.3.embed_tokens.weight"][5, 0] += 1
    bad = _edit(mtp_models(DS), tmp_path / "hf", change)
    with pytest.raises(ConversionError, match=r"model.layers.3.embed_tokens.weight differs from "
                                              r"model.embed_tokens.weight \(rows from 0\)"):
        convert(bad, tmp_path / "mc", progress=False)
    assert not (tmp_path / "mc").exists()


def test_an_incomplete_mtp_layer_is_named(mtp_models, tmp_path):
    bad = _edit(mtp_models(DS), tmp_path / "hf", lambda t: t.pop("model.layers.3.eh_proj.weight"))
    with pytest.raises(ConversionError, match="model.layers.3.eh_proj.weight"):
        convert(bad, tmp_path / "mc", progress=False)


def test_live_model_carries_mtp(mtp_models, tmp_path):
    """The library's megatron_model builds and fills the MTP block too, and save_hf_weights writes it back."""
    from converter import megatron_model, save_hf_weights
    from test_convert import assert_bit_exact

    hf = mtp_models("transformers:glm4_moe:Glm4MoeForCausalLM")
    model = megatron_model(hf, dtype="fp32")
    assert model.config.mtp_num_layers == 1
    assert torch.equal(model.mtp.layers[0].eh_proj.weight, load_file(hf / "model.safetensors")[
        f"model.layers.{model.config.num_layers}.eh_proj.weight"])
    assert_bit_exact(hf, save_hf_weights(model, tmp_path / "back", like=hf))
