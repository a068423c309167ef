"""Independent slow reference implementations used by the parity tests (never imports pesc_serve)."""
