"""Configuration of a Fairy2i ``packed`` checkpoint for transformers (remote code; needs only torch + transformers).

Written by ``fairy2i_jax`` into every ``packed`` export, next to ``modeling_fairy2i.py``, and named by the
``auto_map`` of its ``config.json``; load the checkpoint with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

``config.json`` is the base model's own config (Llama 2/3, Mistral, Qwen2 or Qwen3 keys, flat) plus::

    "model_type": "fairy2i", "base_model_type": "llama", "architectures": ["Fairy2iForCausalLM"],
    "auto_map": {...}, "quantization_config": {"quant_method": "fairy2i", "format": "packed", "layout_version": 1,
                                             "modules": {"model.layers.0.self_attn.q_proj": {...}, ...}}

A ``model_type`` of its own is what makes transformers refuse the directory without ``trust_remote_code``
(instead of building a base model with random weights where the codes are). :meth:`Fairy2iConfig.base_config`
rebuilds the base family's config class (e.g. ``LlamaConfig``) from the same keys, so the model runs
transformers' own code for that family. ``quantization_config`` is held as ``fairy2i_quantization`` in memory
(written back under its name by :meth:`Fairy2iConfig.to_dict`), so transformers' quantizer lookup does not warn
about an unknown ``quant_method`` and "skip the quantization" on every load.
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig

# base model_type -> transformers class built by Fairy2iForCausalLM
BASE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
LAYOUT_VERSION = 1
_OWN_KEYS = ("model_type", "base_model_type", "quantization_config", "fairy2i_quantization", "auto_map",
             "architectures", "transformers_version")


class Fairy2iConfig(PreTrainedConfig):
    """The packed export's ``config.json``: the base family's keys, ``base_model_type`` and the packed modules.

    ``fairy2i_quantization`` (``quantization_config`` on disk): ``{"quant_method": "fairy2i", "layout_version": 1,
    "modules": {name: {"out_features", "in_features", "method", "stages", "numerics", "granularity",
    "group_size"}}}``, one entry per linear stored as 2-bit phase codes.
    """

    model_type = "fairy2i"

    def __init__(self, base_model_type="llama", fairy2i_quantization=None, **kwargs):
        if "quantization_config" in kwargs:
            fairy2i_quantization = kwargs.pop("quantization_config")
        self.base_model_type = base_model_type
        self.fairy2i_quantization = dict(fairy2i_quantization or {})
        super().__init__(**kwargs)

    def to_dict(self):
        """The ``config.json`` dict (``quantization_config`` under its on-disk name)."""
        out = super().to_dict()
        out["quantization_config"] = out.pop("fairy2i_quantization", {})
        return out

    @property
    def packed_modules(self):
        """``{module name: entry}`` of the linears stored as codes; checks the quantization method and layout."""
        qc = self.fairy2i_quantization or {}
        if qc.get("quant_method") != "fairy2i" or qc.get("layout_version") != LAYOUT_VERSION:
            raise ValueError(f"config.json quantization_config: quant_method {qc.get('quant_method')!r}, "
                             f"layout_version {qc.get('layout_version')!r}; this code reads quant_method 'fairy2i' "
                             f"with layout_version {LAYOUT_VERSION}")
        return dict(qc.get("modules") or {})

    def base_config(self):
        """The base family's own config object (e.g. ``LlamaConfig``) from the same keys, with this config's
        attention implementation and name; raises ``ValueError`` for a family this code does not build."""
        from transformers import AutoConfig

        if self.base_model_type not in BASE_ARCHITECTURES:
            raise ValueError(f"config.json base_model_type {self.base_model_type!r} is not supported; supported: "
                             f"{', '.join(BASE_ARCHITECTURES)}")
        fields = {k: v for k, v in self.to_dict().items() if k not in _OWN_KEYS}
        config = AutoConfig.for_model(self.base_model_type, **fields)
        config.architectures = [BASE_ARCHITECTURES[self.base_model_type]]
        config.name_or_path = self.name_or_path
        if getattr(self, "_attn_implementation_internal", None) is not None:
            config._attn_implementation = self._attn_implementation_internal
        return config
