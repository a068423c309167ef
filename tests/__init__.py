"""pesc-serve test suite (a package so helpers import as tests.fixtures / tests.reference)."""
