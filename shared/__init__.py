"""What the API and the worker both import: settings, the job model, the store, image references, errors."""
