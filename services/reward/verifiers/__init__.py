"""Verifiers: the ``Verifier`` contract, the registry of built-ins, and the user adapters."""
