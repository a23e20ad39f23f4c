"""msModelSlim 26.1.0's own CLI (``msmodelslim quant``) on a CPU, with the smallest shim that lets its DeepSeek-V3
adapter run there. Run it with the interpreter of a venv that has msModelSlim and torch (not goldstick's):

    /work/venv-msl/bin/python benchmarks/msmodelslim_shim/run_msmodelslim.py quant --model_path M --save_path OUT \
        --device cpu --model_type DeepSeek-V3 --config_path benchmarks/msmodelslim_shim/deepseek_w8a8_cpu.yaml

What the shim changes, and why (paths inside the msmodelslim wheel):
  * ``.to("npu")`` becomes ``.to("cpu")``: model/deepseek_v3/model_adapter.py:204-205 moves the MTP head to the
    NPU whatever --device says.
  * the router's ``e_score_correction_bias`` is a parameter, as in the DeepSeek remote code msModelSlim was
    written against (transformers 4.48): transformers' own DeepseekV3 (>= 4.49) keeps it as a buffer, which the
    layer loader (model_adapter.py:470-487, ``named_parameters`` only) never loads and the saver never writes.
  * a decoder layer returns a tuple, and computes its rotary embeddings from ``position_ids`` when not given
    them: msModelSlim's runner takes ``output[0]`` as the next layer's input and its MTP step
    (model_adapter.py:210-240) passes ``position_ids`` (the 4.48 remote code's conventions); transformers' own
    layer returns the tensor itself and takes ``position_embeddings`` from the model.
  * the config a decoder layer is built from names the attention implementation: model_adapter.py:500 builds
    layers 1.. from the adapter's own config, which transformers >= 4.49 leaves without one (only the loaded
    model's config gets ``eager``).
  * the MTP layer is read from the shards the index names for it: mtp_quant_module.py:106-115 opens the R1
    release's last shard (``model-00163-of-000163.safetensors``) and strips ``model.layers.61.``; it is built in
    the model's bf16, not in float32 (whose outputs the bf16 MTP decoder layer cannot take).
Nothing else is patched: calibration, smoothing, quantization and the saver are msModelSlim's.
"""

from __future__ import annotations

import sys

import torch


def _cpu(value):
    if isinstance(value, str) and value.startswith("npu"):
        return "cpu"
    if isinstance(value, torch.device) and value.type == "npu":
        return torch.device("cpu")
    return value


def _redirect(method):
    def to(self, *args, **kwargs):
        args = tuple(_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return method(self, *args, **kwargs)
    return to


torch.nn.Module.to = _redirect(torch.nn.Module.to)
torch.Tensor.to = _redirect(torch.Tensor.to)


def _bias_as_parameter(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bias = self.e_score_correction_bias
        del self._buffers["e_score_correction_bias"]
        self.e_score_correction_bias = torch.nn.Parameter(bias, requires_grad=False)
    return wrapped


def _as_tuple(forward, rotary_class):
    rotary: dict = {}

    def wrapped(self, hidden_states, *args, **kwargs):
        if kwargs.get("position_embeddings") is None and kwargs.get("position_ids") is not None:
            if id(self.self_attn.config) not in rotary:
                rotary[id(self.self_attn.config)] = rotary_class(config=self.self_attn.config)
            kwargs["position_embeddings"] = rotary[id(self.self_attn.config)](hidden_states, kwargs["position_ids"])
        out = forward(self, hidden_states, *args, **kwargs)
        return (out,) if isinstance(out, torch.Tensor) else out
    return wrapped


def _mtp_from_index(mtp_layer_class):
    def get_mtp_layer(config, model_path):
        import json
        import re

        from safetensors import safe_open

        weight_map = json.loads(open(f"{model_path}/model.safetensors.index.json").read())["weight_map"]
        mtp = max(int(m.group(1)) for k in weight_map if (m := re.match(r"model\.layers\.(\d+)\.", k)))
        prefix = f"model.layers.{mtp}."
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # the model's dtype; msModelSlim builds the MTP extras in float32
        try:
            layer = mtp_layer_class(config)
        finally:
            torch.set_default_dtype(default)
        wanted = layer.state_dict().keys()
        state = {}
        for key, file in weight_map.items():
            if key.startswith(prefix) and key[len(prefix):] in wanted:
                with safe_open(f"{model_path}/{file}", framework="pt", device="cpu") as f:
                    state[key[len(prefix):]] = f.get_tensor(key)
        layer.load_state_dict(state)
        return layer
    return get_mtp_layer


def main() -> None:
    from msmodelslim.model.deepseek_v3 import model_adapter
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    layer = modeling_deepseek_v3.DeepseekV3DecoderLayer
    layer.forward = _as_tuple(layer.forward, modeling_deepseek_v3.DeepseekV3RotaryEmbedding)

    router = modeling_deepseek_v3.DeepseekV3TopkRouter
    router.__init__ = _bias_as_parameter(router.__init__)
    adapter = model_adapter.DeepSeekV3ModelAdapter
    load_decoder = adapter.load_decoder_if_not_exist

    def load_decoder_if_not_exist(self, model, name, idx):
        if getattr(self.config, "_attn_implementation", None) is None:
            self.config._attn_implementation = model.config._attn_implementation or "eager"
        return load_decoder(self, model, name=name, idx=idx)

    adapter.load_decoder_if_not_exist = load_decoder_if_not_exist
    from msmodelslim.model.deepseek_v3 import mtp_quant_module

    model_adapter.get_mtp_layer = _mtp_from_index(mtp_quant_module.MTPLayer)
    from msmodelslim.cli.__main__ import main as cli

    sys.argv = ["msmodelslim", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
