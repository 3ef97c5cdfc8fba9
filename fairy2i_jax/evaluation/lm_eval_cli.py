"""lm-eval's own command line with the ``fairy2i`` model registered: ``fairy2i-lm-eval`` (or
``python -m fairy2i_jax.evaluation.lm_eval_cli``) takes exactly lm-eval's arguments, e.g.

    fairy2i-lm-eval run --model fairy2i --model_args pretrained=runs/smollm2_135m_w2,quant=trained \\
        --tasks arc_easy --limit 100 --output_path results/

lm-eval 0.4 looks models up in a registry that only its own modules fill, and has no plugin entry point, so
the plain ``lm_eval`` command cannot know ``fairy2i``; this module imports the adapter (whose
``@register_model("fairy2i")`` fills the registry) and then hands over to ``lm_eval.__main__.cli_evaluate``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI on ``argv`` (default: ``sys.argv[1:]``) with ``--model fairy2i`` available."""
    from lm_eval.__main__ import cli_evaluate

    import fairy2i_jax.evaluation.lm_eval_adapter  # noqa: F401  (registers the "fairy2i" model)
    from fairy2i_jax.errors import Fairy2iError

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except Fairy2iError as e:  # a model source or model argument the user can fix: one line
        print(f"fairy2i-lm-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
