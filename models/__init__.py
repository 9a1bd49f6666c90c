"""Models: base pipelines, adapter families, adapter files, CLIP loading and the toy world."""
