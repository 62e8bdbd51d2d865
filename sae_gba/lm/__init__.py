"""The language-model layer: everything that touches a model goes through it.

- :mod:`sae_gba.lm.models`: the one model loader (embedded Gemma-3-270M, a local
  Hugging Face folder, or TransformerLens by name).
- :mod:`sae_gba.lm.windows`: the special-token rule, BOS-first token windows, local
  ``save_to_disk`` datasets and their row split (no model, no corpus).
- :mod:`sae_gba.lm.data`: the one token-window reader (embedded Wikipedia or a local
  dataset, training or held-out part).
- :mod:`sae_gba.lm.harvest`: the one activation harvest (a hook's activations on
  token windows, the forward pass stopped after its block).
"""
