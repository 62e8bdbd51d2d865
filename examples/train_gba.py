"""Train a GBA SAE with SAELens's own runner on the embedded Gemma-3-270M.

    python examples/train_gba.py runs/example_gba

Importing sae_gba registers the "gba" architecture; everything else is plain SAELens.
About 10 minutes on a laptop CPU; EXAMPLE_TOKENS and EXAMPLE_D_SAE make it smaller.
"""

import os
import sys

from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)

from sae_gba import GBATrainingSAEConfig
from sae_gba.embedded import EMBEDDED_MODEL_NAME, embedded_token_dataset
from sae_gba.lm.models import load_model

out = sys.argv[1] if len(sys.argv) > 1 else "runs/example_gba"
tokens = int(os.environ.get("EXAMPLE_TOKENS", 500_000))
buffer = 32 if tokens > 100_000 else 4  # forward passes mixed in the buffer

cfg = LanguageModelSAERunnerConfig(
    sae=GBATrainingSAEConfig(
        d_in=640,  # Gemma-3-270M's width
        d_sae=int(os.environ.get("EXAMPLE_D_SAE", 4096)),
        adaptation_interval=5,  # steps between bias adaptations
        normalize_activations="constant_norm_rescale",
    ),
    model_name="google/gemma-3-270m",
    hook_name="blocks.9.hook_resid_post",
    context_size=128,
    exclude_special_tokens=True,  # BOS activations are outliers, not text
    training_tokens=tokens,
    train_batch_size_tokens=512,
    store_batch_size_prompts=4,
    n_batches_in_buffer=buffer,
    lr=3e-4,
    logger=LoggingConfig(log_to_wandb=False),
    output_path=out,
    device="cpu",
)
sae = LanguageModelSAETrainingRunner(
    cfg,
    override_model=load_model(EMBEDDED_MODEL_NAME),
    override_dataset=embedded_token_dataset("train", 128).shuffle(seed=0),
).run()
print(f"wrote {out}: a {sae.cfg.d_sae}-latent SAE, exported as SAELens's jumprelu")
