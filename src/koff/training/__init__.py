"""Training: the decompose / add-domain pipeline, the offloading loop, memory planning."""
