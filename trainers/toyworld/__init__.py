"""The procedural toy world: a tiny CLIP-like setting where robust fine-tuning effects show up."""
