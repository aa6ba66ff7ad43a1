"""The GPU worker: the Celery app, its task, and the model engine (loaded once per process)."""
