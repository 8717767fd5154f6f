"""Pipeline stages: each module exposes ``run(config) -> report`` over the xpsr_core library."""
