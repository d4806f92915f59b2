"""What the installed dependencies must not do to this project's own packages."""

from __future__ import annotations

import importlib.metadata

import pytest


def test_no_distribution_claims_the_kernels_package_name() -> None:
    """transformers 5.25 requires Hugging Face's ``kernels`` and imports it whenever it is installed;
    this project's top-level ``kernels/`` (Triton) shadows it and every model import then fails
    with "cannot import name ... from 'kernels'". pyproject.toml pins transformers below 5.25."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    pytest.fail(
        f"the 'kernels' distribution {dist.version} is installed and collides with this project's "
        "kernels/ package: find what requires it (pip show kernels) and pin that below the version "
        "that added it, as pyproject.toml does for transformers"
    )
