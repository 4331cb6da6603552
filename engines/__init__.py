"""Engines: adapters from one loaded model to the batched, streaming generation llmgrpc serves.

Importing this package imports no engine library; see ``base`` for the interface and
``catalogue`` for the engines and what each needs.
"""
