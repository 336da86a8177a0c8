"""The CLI's malloc settings: applied on glibc, left alone when the user chose their own."""
from __future__ import annotations

import os
import platform

import pytest

from bdsan.allocator import keep_freed_memory

settings = keep_freed_memory.__wrapped__  # the uncached function


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_on_glibc(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("BDSAN_KEEP_FREED_MEMORY", raising=False)
    assert settings() is True


@pytest.mark.parametrize("name, value", [("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0"),
                                         ("BDSAN_KEEP_FREED_MEMORY", "0")])
def test_the_users_own_settings_win(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert settings() is False
