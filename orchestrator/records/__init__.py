"""What happened in a sweep: one typed row per point (`row`), the table with its front and
choices (`table`) and plots (`plots`), the sweep's own journal (`journal`), its MLflow
runs (`mlflow`), and what a sweep writes to MLflow (`publish`). No Ray here."""
