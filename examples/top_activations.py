"""Load an SAE folder back and print its latents' top-activating tokens on held-out
text of the embedded Gemma-3-270M.

    python examples/top_activations.py runs/example_gba/ [N_LATENTS]

EXAMPLE_WINDOWS sets how many 128-token held-out windows are read (default 64).
"""

import os
import sys

import torch

from sae_gba import load_sae
from sae_gba.embedded import EMBEDDED_MODEL_NAME, embedded_token_dataset
from sae_gba.lm.models import load_model

sae = load_sae(sys.argv[1])  # any SAELens SAE folder, checked before loading
n_latents = int(sys.argv[2]) if len(sys.argv) > 2 else 5
n_windows = int(os.environ.get("EXAMPLE_WINDOWS", 64))
model = load_model(EMBEDDED_MODEL_NAME)
tokens = torch.tensor(embedded_token_dataset("held_out", 128)["tokens"][:n_windows])
hook = sae.cfg.metadata.hook_name
with torch.no_grad():
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    acts = sae.encode(cache[hook])[:, 1:]  # (windows, positions, latents); no BOS
tokens = tokens[:, 1:]

fired = (acts > 0).flatten(0, 1).float().mean(0)
for latent in fired.argsort(descending=True)[:n_latents].tolist():
    print(f"latent {latent}: fires on {fired[latent]:.2%} of tokens")
    flat = acts[..., latent].flatten()
    for index in flat.topk(3).indices.tolist():
        row, pos = divmod(index, tokens.shape[1])
        before = model.tokenizer.decode(tokens[row, max(0, pos - 8) : pos])
        token = model.tokenizer.decode(tokens[row, pos])
        print(f"  {flat[index]:7.2f}  ...{before!r} [{token!r}]")
