"""Evaluate an SAE folder with SAEBench (core metrics; absorption with --absorption)
on the embedded model's held-out Wikipedia articles.

    python examples/evaluate_saebench.py runs/example_gba/ runs/example_gba_eval

Any SAELens SAE folder of Gemma-3-270M works. EXAMPLE_TOKENS limits the tokens.
"""

import os
import sys
from pathlib import Path

from sae_gba_evals.saebench import evaluate

sae_dir, out = sys.argv[1], sys.argv[2]
evals = ["core", "absorption"] if "--absorption" in sys.argv else ["core"]
tokens = int(os.environ.get("EXAMPLE_TOKENS", 0)) or None  # None: all held-out
report = evaluate(
    sae_dir,
    out,
    evals,
    **({} if tokens is None else {"n_tokens": tokens, "n_recon_tokens": tokens}),
)
print(Path(report["summary"]).read_text())
