"""Train a weighted TopK SAE (WSAE: the reconstruction error of input dimension i
weighted by gamma_i = var_i^alpha) on the embedded Gemma-3-270M.

    python examples/train_weighted_topk.py runs/example_wtopk

``train_preset`` is SAELens's runner with the preset's settings plus checkpoints
(Ctrl-C saves one; ``resume=True`` continues). EXAMPLE_TOKENS makes it smaller.
"""

import dataclasses
import os
import sys

from sae_gba.presets import EMBEDDED, train_preset

out = sys.argv[1] if len(sys.argv) > 1 else "runs/example_wtopk"
tokens = int(os.environ.get("EXAMPLE_TOKENS", 500_000))
preset = (
    EMBEDDED
    if tokens > 100_000
    else dataclasses.replace(
        EMBEDDED, store_batch_size_prompts=4, n_batches_in_buffer=4
    )
)
sae = train_preset(
    preset,
    out,
    d_sae=int(os.environ.get("EXAMPLE_D_SAE", 4096)),
    training_tokens=tokens,
    architecture="weighted_topk",
    k=32,
    weight_alpha=0.5,  # gamma_i = var_i^0.5
    weight_estimation_batches=2,  # batches whose variance sets the weights
)
gamma = sae.input_weights
print(f"weights from the {sae.input_weights_source}: gamma in [{gamma.min():.3f}, "
      f"{gamma.max():.3f}]; the SAE (plain topk) is in {out}/sae, the weights beside "
      "it in input_weights.safetensors")  # fmt: skip
