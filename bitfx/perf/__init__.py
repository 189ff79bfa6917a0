"""Performance references measured on the machine at hand (DESIGN §5): never constants from another CPU."""
