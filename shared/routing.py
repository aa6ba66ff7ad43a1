"""Which model a job is for, and which queue carries it: a queue per model, one for webhook deliveries and one
for the batch worker.

Each model has a queue of its own, named from the model alone (`<VISIONQ_QUEUE>:<model>`), so that the API and
every worker, on any host, agree on it without talking to each other. A worker serves exactly one model (its
VISIONQ_MODEL) and consumes only that model's queue.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from shared.config import Settings
from shared.errors import UnknownModel
from shared.store.keys import batch_queue as batch_queue_of
from shared.store.keys import job_queue
from shared.store.keys import webhook_queue as webhook_queue_of


def queue_for(settings: Settings, model: str) -> str:
    """The queue (a Redis list) of one model's jobs."""
    return job_queue(settings.queue, model)


def worker_queue(settings: Settings) -> str:
    """The queue a worker of these settings consumes: its own model's."""
    return queue_for(settings, settings.model)


def webhook_queue(settings: Settings) -> str:
    """The Celery queue of webhook deliveries (consumed by CPU workers, never by the GPU worker)."""
    return webhook_queue_of(settings.queue)


def batch_queue(settings: Settings) -> str:
    """The Celery queue of the batch worker (CPU: inputs, admission, results; never a GPU worker)."""
    return batch_queue_of(settings.queue)


def takes_num_crops(settings: Settings, model: str) -> bool:
    """Whether jobs for this model may set num_crops (settings.num_crops_models says, by the model's name)."""
    return any(fnmatchcase(model.lower(), pattern.lower()) for pattern in settings.num_crops_models)


def resolve_model(settings: Settings, requested: str | None) -> str:
    """The model a job runs on: the one it names, else the default; one the server does not list is refused."""
    if requested is None:
        return settings.model
    if requested not in settings.served_models:
        raise UnknownModel(f"model must be one of: {', '.join(settings.served_models)}")
    return requested
