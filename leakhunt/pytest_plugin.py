"""pytest plugin (entry point ``leakhunt``): fail a test whose repeated body grows native RSS.

Loaded into every pytest run of an environment where leakhunt is installed, so it imports
nothing heavy and does nothing at all for tests that do not ask for it.
"""

from __future__ import annotations

MARKER = "limit_native_growth"


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(limit, rounds=10, warmup=2): run the test body repeatedly and fail when native "
        "RSS (mmap growth included) grows faster than LIMIT per round (leakhunt)")
