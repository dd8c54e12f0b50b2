"""Example networks for ``model.builder``: your own G and D, trained sparse-to-sparse by sgtrain."""
