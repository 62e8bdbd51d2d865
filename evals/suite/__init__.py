"""The recovery suite: data families, methods, runs, and the ``suite`` / ``scaling``
commands (see ``sae_gba_evals.suite.suite``)."""
