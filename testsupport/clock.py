"""The fixed clock of the fast tests: every pure decision is tested at this instant, never at the wall clock's."""

from __future__ import annotations

import datetime as dt

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
