"""Per-target schedules and compilers: one module per target (`host`, ...)."""
