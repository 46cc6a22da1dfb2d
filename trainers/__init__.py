"""Training-side code of orch: data, models, fine-tuning methods, metrics."""
