"""Child process of ``test_remote_code.py``: a Python with torch + transformers and WITHOUT fairy2i_jax.

Run as ``python -I -S remote_code_child.py SPEC.json`` (isolated, no site: neither the project nor its editable
install is on ``sys.path``); ``SPEC.json`` names the site-packages to add, the cases (a packed dir and the
dequantized dir of the same model) and where to write the results. For each case it loads the dequantized dir
with vanilla transformers and the packed dir with ``trust_remote_code=True``, and records the loading report,
the module types, whether every decoded ``Fairy2iLinear`` weight equals the dequantized weight bit for bit, the
logits difference on a padded batch, and both models' greedy generations. It also records that
``import fairy2i_jax`` fails here and what transformers raises without ``trust_remote_code``.
"""

import json
import sys


def _error(fn):
    try:
        fn()
    except Exception as e:  # the refusal being tested: its type and message are the result
        return {"type": type(e).__name__, "message": str(e)}
    return None


def run_case(case, torch, transformers):
    auto = transformers.AutoModelForCausalLM
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[case.get("dtype")]
    kwargs = {} if dtype is None else {"dtype": dtype}
    reference = auto.from_pretrained(case["dequantized"], **kwargs).eval()
    model, info = auto.from_pretrained(case["packed"], trust_remote_code=True, output_loading_info=True, **kwargs)
    model.eval()
    quantized = {n: m for n, m in model.named_modules() if type(m).__name__ == "Fairy2iLinear"}
    ids = torch.tensor(case["ids"], dtype=torch.long)
    mask = torch.tensor(case["mask"], dtype=torch.long)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits.float()
        got = model(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    weights_equal = {n: bool(torch.equal(m.dense_weight(reference.dtype, torch.device("cpu")),
                                         reference.get_submodule(n).weight)) for n, m in quantized.items()}
    result = {
        "class": type(model).__name__, "bases": [c.__name__ for c in type(model).__mro__[1:3]],
        "config_class": type(model.config).__name__, "dtype": str(model.dtype).removeprefix("torch."),
        "loading_info": {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items()},
        "fairy2i_linears": sorted(quantized), "weights_equal": weights_equal,
        "biases": sorted(n for n, m in quantized.items() if m.bias is not None),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight if hasattr(model.lm_head, "weight") else False,
        "max_abs_diff": float((got - want).abs()[keep].max()), "max_abs_ref": float(want.abs()[keep].max()),
        "save_refused": _error(lambda: model.save_pretrained(case["packed"] + "_resaved")),
    }
    prompt = ids[:1, :6]
    if case.get("tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(case["packed"])
        prompt = tokenizer(case["tokenizer"], return_tensors="pt")["input_ids"]
        result["prompt"] = prompt[0].tolist()
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    result["generated"] = model.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)[0].tolist()
    result["generated_ref"] = reference.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)[0].tolist()
    return result


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    sys.path.extend(spec["site_packages"])
    out = {"fairy2i_jax_importable": _error(lambda: __import__("fairy2i_jax")) is None, "cases": {}}
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    refusal_dir = spec["cases"][0]["packed"]
    out["refusal_default"] = _error(lambda: transformers.AutoModelForCausalLM.from_pretrained(refusal_dir))
    out["refusal_false"] = _error(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        refusal_dir, trust_remote_code=False))
    for case in spec["cases"]:
        out["cases"][case["name"]] = run_case(case, torch, transformers)
    with open(spec["result"], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
