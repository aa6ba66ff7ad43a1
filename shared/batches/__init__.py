"""Batches: one request for many jobs. The batch model and its statuses (batch), reading its input (inputs) and
checking each line (lines), the background step that admits lines as jobs in chunks (creator), the results file
(results), and the CPU batch worker's Celery app (worker_app). The Redis side is shared/store/batches.py and the
Lua scripts it names; a batch's counts by job status are moved by the job transitions themselves."""
