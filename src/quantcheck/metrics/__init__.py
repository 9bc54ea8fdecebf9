"""Per-item measurements: parsed answers and next-token differences between two models."""
