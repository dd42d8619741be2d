"""Adapters from other frameworks to the tidar ops and decode loop (one module per framework).

Each adapter calls the public ops, :mod:`tidar_kernels.training.objective` and
:mod:`tidar_kernels.model.generate`; none re-implements the mask, the kernels or the
decode step. Importing this package imports no framework: import the module
you need (e.g. ``tidar_kernels.integrations.transformers``).
"""
