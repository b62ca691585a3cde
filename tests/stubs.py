"""Stand-ins for the heavy packages that the reference optimizers' package ``__init__`` files import but
their optimizers never use (``transformers`` for a version check, ``bitsandbytes`` for 8-bit variants),
installed for one test through ``monkeypatch``."""

from __future__ import annotations

import sys
import types

import pytest


def stub_module(monkeypatch: pytest.MonkeyPatch, name: str, **attributes: object) -> None:
    """An empty module ``name`` with ``attributes``, in ``sys.modules`` for the test's duration."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)


def stub_transformers_version_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """``transformers.utils.versions.require_version`` as a no-op (all the references ask of it)."""
    stub_module(monkeypatch, "transformers")
    stub_module(monkeypatch, "transformers.utils")
    stub_module(monkeypatch, "transformers.utils.versions", require_version=lambda *args, **kwargs: None)
