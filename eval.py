"""Evaluate models (HF dir, .gguf, hub id, training run dir) as fp or PTQ: perplexity and lm-eval tasks.

    python eval.py --model PATH [--model PATH2] --quant fp,w2 --ppl-files data/austen/test/persuasion.txt.gz \
        --seqlen 512 --max-tokens 8192 [--tasks arc_easy --limit 100] [--json out.json]

See `python eval.py --help` and `fairy2i_jax/evaluation/cli.py` for every option.
"""

import sys

from fairy2i_jax.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
