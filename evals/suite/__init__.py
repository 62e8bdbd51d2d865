"""The recovery suite: data families, methods, runs, and the ``suite`` / ``scaling``
commands (see ``evals.suite.suite``)."""
