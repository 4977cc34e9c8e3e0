"""Peer: ms-swift's mcore-bridge (1.6.5), HF safetensors -> GPTModel (`GPTBridge.load_weights`), then
megatron-core's torch_dist save. Run by benchmarks/run.py in mcore-bridge's own virtual environment
(benchmarks/peers/setup.sh); mcore-bridge writes no Megatron checkpoint itself.
Usage: python mcore_bridge_import.py HF_DIR OUT_DIR

Stand-ins so that it runs on a CPU-only machine, each the least that works:
- it imports transformer_engine when imported: empty stub modules, put in place after peft and megatron-core
  have decided that Transformer Engine is absent; and it patches methods onto megatron-core's Transformer Engine
  classes, which are None or MagicMocks without it: empty classes of those names (nothing is built from them);
- its layer spec is Transformer Engine's: the local spec (`use_transformer_engine=False`), with
  `persist_layer_norm=False`, and the two layer norms it sets under their Transformer Engine names (fused into
  linear_qkv / linear_fc1) set under their local names;
- MoE: megatron-core's all-to-all token dispatcher makes a CUDA stream when built: the all-gather dispatcher,
  which needs fixed sequence lengths (neither has any bearing on the weights);
- megatron-core's torch_dist save asks CUDA for its device and synchronizes it: hf2mcore's CPU patches for
  megatron-core (`converter.runtime.cpu_patches`) during the save.
"""
import os
import sys
import types
import warnings

warnings.filterwarnings("ignore")


def _stub_transformer_engine() -> None:
    import megatron.core.extensions.transformer_engine as te  # (decides HAVE_TE = False first)
    import peft  # noqa: F401  (likewise)

    for name in dir(te):
        if name.startswith("TE") and not isinstance(getattr(te, name), type):  # None or a MagicMock
            setattr(te, name, type(name, (), {}))

    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.attention"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["transformer_engine"].pytorch = sys.modules["transformer_engine.pytorch"]
    attention = sys.modules["transformer_engine.pytorch"].attention = sys.modules["transformer_engine.pytorch.attention"]
    attention.apply_rotary_pos_emb = attention._SplitAlongDim = None


def main(hf_dir: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from transformers import AutoConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29518")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    _stub_transformer_engine()
    from mcore_bridge import ModelConfig, get_mcore_model, hf_to_mcore_config
    from mcore_bridge.bridge import gpt_bridge
    from mcore_bridge.model import register

    spec = register.get_gpt_decoder_block_spec
    register.get_gpt_decoder_block_spec = lambda config, use_transformer_engine=True, **kw: spec(
        config, use_transformer_engine=False, **kw)
    local = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    set_state = gpt_bridge.GPTBridge._set_state_dict
    gpt_bridge.GPTBridge._set_state_dict = lambda self, module, key, *a, **kw: set_state(
        self, module, local.get(key, key), *a, **kw)

    hf_config = AutoConfig.from_pretrained(hf_dir)
    config = ModelConfig(**hf_to_mcore_config(hf_config), params_dtype=torch.bfloat16, bf16=True,
                         persist_layer_norm=False, use_cpu_initialization=True, perform_initialization=False,
                         moe_token_dispatcher_type="allgather", variable_seq_lengths=False)
    models = get_mcore_model(config)
    config.bridge.load_weights(models, hf_dir)
    from converter.runtime import cpu_patches

    os.makedirs(out_dir, exist_ok=True)
    with cpu_patches():
        dist_checkpointing.save(models[0].sharded_state_dict(), out_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
