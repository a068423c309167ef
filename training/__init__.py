"""Training side of pesc-serve: craft dense models into PESC models and instruction-tune them."""
