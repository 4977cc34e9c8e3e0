"""Peer: verl's mbridge (0.15.1), HF safetensors -> GPTModel (`load_weights`), then megatron-core's torch_dist save.
Run by benchmarks/run.py in mbridge's own virtual environment (benchmarks/peers/setup.sh); mbridge writes no
Megatron checkpoint itself. Usage: python mbridge_import.py HF_DIR OUT_DIR

Stand-ins so that it runs on a CPU-only machine, each the least that works:
- its layer spec asks for Transformer Engine: the local spec (`use_transformer_engine=False`) instead;
- its `get_model()` moves the model to CUDA: the model is built through its own provider instead, on the CPU,
  with megatron-core's random initialisation off (`perform_initialization=False`: the weights are loaded next);
- with the local spec the layer norms are modules of their own: their names are given to its name mapping as
  the Transformer Engine names it knows where it knows no other (the norm fused into linear_qkv / linear_fc1);
- it asks for persistent layer norms, which the local spec's torch norm refuses: `persist_layer_norm=False`;
- MoE: megatron-core's all-to-all token dispatcher makes a CUDA stream when built: the all-gather dispatcher
  (which dispatcher routes tokens has no bearing on the weights);
- megatron-core's torch_dist save asks CUDA for its device and synchronizes it: hf2mcore's CPU patches for
  megatron-core (`converter.runtime.cpu_patches`) during the save;
- transformers 5 keeps `rope_theta` under `rope_parameters`: copied to where mbridge reads it.
"""
import os
import sys
import warnings

warnings.filterwarnings("ignore")


def main(hf_dir: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import gpt_layer_specs
    from transformers import AutoConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    from mbridge import AutoBridge
    from mbridge.core import llm_bridge

    spec = gpt_layer_specs.get_gpt_decoder_block_spec
    llm_bridge.get_gpt_decoder_block_spec = lambda config, use_transformer_engine=True, **kw: spec(
        config, use_transformer_engine=False, **kw)
    cfg = AutoConfig.from_pretrained(hf_dir)
    if getattr(cfg, "rope_theta", None) is None:
        cfg.rope_theta = cfg.rope_parameters["rope_theta"]
    bridge = AutoBridge.from_config(cfg, dtype=torch.bfloat16)
    bridge.config.perform_initialization = False
    bridge.config.use_cpu_initialization = True
    bridge.config.persist_layer_norm = False
    bridge.config.moe_token_dispatcher_type = "allgather"
    to_hf = bridge._weight_name_mapping_mcore_to_hf
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}

    def local_to_hf(name):
        try:
            return to_hf(name)
        except NotImplementedError:  # a dense layer's norm, which mbridge knows under its fused name only
            local = next((k for k in te_names if name.endswith(k)), None)
            if local is None:
                raise
            return to_hf(name.removesuffix(local) + te_names[local])

    bridge._weight_name_mapping_mcore_to_hf = local_to_hf
    model = bridge._model_provider([])(pre_process=True, post_process=True)
    bridge.load_weights([model], hf_dir)
    os.makedirs(out_dir, exist_ok=True)
    from converter.runtime import cpu_patches

    with cpu_patches():
        dist_checkpointing.save(model.sharded_state_dict(), out_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
