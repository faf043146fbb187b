"""Multi-task runs: a manifest with several label columns, one backbone with one head per task.

See :mod:`tlkit.multitask.train` for the run, :mod:`tlkit.multitask.model` for the model and
:mod:`tlkit.multitask.losses` for the masking of missing labels. Nothing is imported here, so
importing a submodule loads only what it needs.
"""
