"""The toy world: Atelier's own tiny text-to-image model, its procedural data and its deterministic checks."""
