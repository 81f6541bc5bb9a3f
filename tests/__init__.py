"""vfm's test suite; shared helpers are in tests.helpers (imported as `tests.helpers.<module>`)."""
