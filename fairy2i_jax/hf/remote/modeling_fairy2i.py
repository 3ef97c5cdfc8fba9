"""Fairy2i ``packed`` checkpoints in transformers (remote code; plain torch, no fairy2i_jax needed).

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

:class:`Fairy2iForCausalLM` builds transformers' own class for the base family (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``; tied or untied heads) from
:meth:`Fairy2iConfig.base_config` and, before the weights load, replaces every linear named in
``quantization_config["modules"]`` by a :class:`Fairy2iLinear`, whose persistent buffers ``u_codes``,
``w_codes``, ``u_scales``, ``w_scales`` receive the checkpoint tensors of the same names (biases stay
parameters). Everything else (embeddings, norms, unquantized linears, attention, generation) is the family's
own transformers code.

The format (layout version 1). A linear ``[out, in] = [2n, 2m]`` with T residual stages stores ``u_codes`` and
``w_codes``, uint32 ``[T, n, ceil(m/16)]`` (code ``j`` of word ``w`` at bits ``2j, 2j+1``, lowest first, along the
complex input dim; the tail padded with code 0), and ``u_scales``, ``w_scales`` ``[T, 2, *G]`` (``(s_re, s_im)`` on
axis 1; ``G`` = ``()`` per tensor, ``(n,)`` per row, ``(n, m // group_size)`` per group). Code ``k`` is ``i^k``:
stage ``t`` contributes ``re = +s_re`` (code 0) / ``-s_re`` (2), ``im = +s_im`` (1) / ``-s_im`` (3), the stages
are summed in order into ``U`` and ``W``, and the real matrix is the widely-linear recomposition
``A = [[Re W + Re U, Im W - Im U], [Im W + Im U, Re U - Re W]]`` (blocks ``[n, m]``). The decoding runs in
the quantizer's arithmetic (bf16 for ``numerics: bf16_exact``, fp32 for ``fp32``), so ``A_q`` equals the
``dequantized`` export's weight bit for bit; the layer computes ``x @ A_q.T + bias``.

Memory: each Fairy2iLinear decodes ``A_q`` once, at its first forward, into a dense weight in the activation
dtype and keeps it (recomputed only if the device or dtype changes). A loaded model holds the codes (T bits
per weight: 2 for W2, i.e. 1/8 of bf16) and, after the first forward, the dense weights: about the memory of
the base model in that dtype plus 12.5% (bf16, W2) or 6.25% (fp32, W2). No speed-up over the base model.
"""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from .configuration_fairy2i import BASE_ARCHITECTURES, Fairy2iConfig

CODES_PER_WORD = 16
WORK_DTYPES = {"bf16_exact": torch.bfloat16, "fp32": torch.float32}
PACKED_BUFFERS = ("u_codes", "w_codes", "u_scales", "w_scales")


def unpack_codes(words, m):
    """uint32 words ``[..., ceil(m/16)]`` -> int32 codes ``[..., m]`` in 0..3 (torch has no uint32 shifts, so
    the words are reinterpreted as int32: bits 2j, 2j+1 survive the arithmetic shift and the mask)."""
    shifts = torch.arange(0, 2 * CODES_PER_WORD, 2, dtype=torch.int32, device=words.device)
    codes = (words.view(torch.int32).unsqueeze(-1) >> shifts) & 3
    return codes.flatten(-2)[..., :m]


def decode_stages(words, scales, m, granularity, group_size, dtype):
    """``(Re, Im)`` ``[n, m]`` of one complex matrix: the sum over stages of the decoded codes, in ``dtype``."""
    codes = unpack_codes(words, m)
    scales = scales.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=scales.device)
    acc_re = acc_im = None
    for t in range(codes.shape[0]):
        s_re, s_im = scales[t, 0], scales[t, 1]
        if granularity == "tensor":
            s_re, s_im = s_re.reshape(1, 1), s_im.reshape(1, 1)
        elif granularity == "row":
            s_re, s_im = s_re[:, None], s_im[:, None]
        else:
            s_re, s_im = s_re.repeat_interleave(group_size, -1), s_im.repeat_interleave(group_size, -1)
        c = codes[t]
        re = torch.where(c == 0, s_re, torch.where(c == 2, -s_re, zero))
        im = torch.where(c == 1, s_im, torch.where(c == 3, -s_im, zero))
        acc_re = re if acc_re is None else acc_re + re
        acc_im = im if acc_im is None else acc_im + im
    return acc_re, acc_im


class Fairy2iLinear(nn.Module):
    """A linear stored as Fairy2i 2-bit phase codes and per-stage scales; computes ``x @ A_q.T + bias``.

    The buffers hold the checkpoint tensors as they are (codes uint32, scales in the quantizer's dtype);
    ``A_q`` is decoded at the first forward and cached in the activation dtype (module docstring: memory).
    Pick the dtype when loading (``from_pretrained(..., dtype=...)``): a later ``model.to(dtype)`` / ``.half()``
    casts the float scale buffers too, which rounds fp32-numerics scales (bf16 ones survive ``float32``).
    """

    def __init__(self, in_features, out_features, bias=False, stages=2, numerics="bf16_exact",
                 granularity="tensor", group_size=128, device=None, dtype=None):
        super().__init__()
        if in_features % 2 or out_features % 2:
            raise ValueError(f"Fairy2iLinear needs even dims, got [{out_features}, {in_features}]")
        if numerics not in WORK_DTYPES or granularity not in ("tensor", "row", "group"):
            raise ValueError(f"unsupported numerics {numerics!r} / granularity {granularity!r}")
        self.in_features, self.out_features, self.stages = in_features, out_features, stages
        self.numerics, self.granularity, self.group_size = numerics, granularity, group_size
        n, m = out_features // 2, in_features // 2
        words = -(-m // CODES_PER_WORD)
        groups = {"tensor": (), "row": (n,), "group": (n, m // group_size)}[granularity]
        for name in ("u_codes", "w_codes"):
            self.register_buffer(name, torch.zeros((stages, n, words), dtype=torch.uint32, device=device))
        for name in ("u_scales", "w_scales"):
            self.register_buffer(name, torch.zeros((stages, 2, *groups), dtype=WORK_DTYPES[numerics], device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._dense = None

    @torch.no_grad()
    def dequantize(self):
        """``A_q [out, in]`` in the quantizer's dtype (bf16 / fp32), from the codes and scales."""
        m, dtype = self.in_features // 2, WORK_DTYPES[self.numerics]
        args = (m, self.granularity, self.group_size, dtype)
        u_re, u_im = decode_stages(self.u_codes, self.u_scales, *args)
        w_re, w_im = decode_stages(self.w_codes, self.w_scales, *args)
        top = torch.cat([w_re + u_re, w_im - u_im], dim=-1)
        bottom = torch.cat([w_im + u_im, u_re - w_re], dim=-1)
        return torch.cat([top, bottom], dim=-2)

    def dense_weight(self, dtype, device):
        """The cached ``A_q`` in ``dtype`` on ``device`` (decoded on first use or after a move / cast)."""
        w = self._dense
        if w is None or w.dtype != dtype or w.device != device:
            w = self._dense = self.dequantize().to(device=device, dtype=dtype)
        return w

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None  # new codes: decode again
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x):
        return nn.functional.linear(x, self.dense_weight(x.dtype, x.device), self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"stages={self.stages}, numerics={self.numerics}, granularity={self.granularity}")


_FAMILY_CLASSES = {}


def _family_class(base_model_type):
    """``Fairy2i<Base>`` = (:class:`Fairy2iForCausalLM`, transformers' ``<Base>``), made once per family."""
    if base_model_type not in BASE_ARCHITECTURES:
        raise ValueError(f"config.json base_model_type {base_model_type!r} is not supported; supported: "
                         f"{', '.join(BASE_ARCHITECTURES)}")
    if base_model_type not in _FAMILY_CLASSES:
        import transformers

        base = getattr(transformers, BASE_ARCHITECTURES[base_model_type])
        name = "Fairy2i" + base.__name__
        _FAMILY_CLASSES[base_model_type] = type(name, (Fairy2iForCausalLM, base), {"__module__": __name__})
    return _FAMILY_CLASSES[base_model_type]


class Fairy2iForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose quantized linears are :class:`Fairy2iLinear`; everything else is the base family's.

    Constructing it (``from_pretrained``, ``from_config`` or ``Fairy2iForCausalLM(config)``) returns an instance
    of ``Fairy2i<Base>ForCausalLM``, a subclass of this class and of transformers' class for
    ``config.base_model_type``, so the forward, ``generate``, weight tying and loading are transformers' own.
    ``model.config`` is that family's config (:meth:`Fairy2iConfig.base_config`); ``model.fairy2i_config`` is
    the checkpoint's :class:`Fairy2iConfig`. ``save_pretrained`` is refused (re-export with fairy2i_jax).
    """

    config_class = Fairy2iConfig

    def __new__(cls, config, *args, **kwargs):
        if cls is Fairy2iForCausalLM:
            cls = _family_class(config.base_model_type)
        return super().__new__(cls)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config.base_config(), *args, **kwargs)
        self.fairy2i_config = config
        modules = config.packed_modules
        if "lm_head" in modules and self.config.tie_word_embeddings:
            raise ValueError("config.json: a quantized lm_head cannot be tied to the embeddings "
                             "(tie_word_embeddings must be false)")
        for name, entry in modules.items():
            self._swap(name, entry)

    def _swap(self, name, entry):
        """Replace the ``nn.Linear`` ``name`` by a :class:`Fairy2iLinear` of the entry's shape and quantizer."""
        parent_name, _, child = name.rpartition(".")
        parent = self.get_submodule(parent_name)
        old = getattr(parent, child, None)
        shape = (entry["out_features"], entry["in_features"])
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != shape:
            raise ValueError(f"config.json quantization_config module {name!r}: the {self.config.model_type} model "
                             f"has no linear of shape {list(shape)} there (found {type(old).__name__})")
        if entry.get("method", "complex_phase") != "complex_phase":
            raise ValueError(f"module {name!r}: method {entry.get('method')!r}, packed holds complex_phase codes")
        new = Fairy2iLinear(old.in_features, old.out_features, bias=old.bias is not None, stages=entry["stages"],
                            numerics=entry["numerics"], granularity=entry["granularity"],
                            group_size=entry.get("group_size", 128), device=old.weight.device,
                            dtype=old.weight.dtype)
        setattr(parent, child, new)

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError("a Fairy2i packed model is loaded for inference only; export it again with "
                                  "`python -m fairy2i_jax.export` (formats dequantized, master, packed)")
