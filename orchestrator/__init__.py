"""orch's orchestrator: sweep files -> Ray Tune trials -> MLflow records (the only package
that imports ray or mlflow)."""
