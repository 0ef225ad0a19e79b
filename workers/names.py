"""Queue and task names: what beat entries, queued messages and routes refer to.

A module of its own, importing nothing, so the Celery app and the beat schedule (which the app
loads) can both use the names without importing each other.
"""

from __future__ import annotations

QUEUE_TRAIN = "train"
QUEUE_PREDICT = "predict"
QUEUE_HOUSEKEEPING = "housekeeping"
QUEUES = (QUEUE_TRAIN, QUEUE_PREDICT, QUEUE_HOUSEKEEPING)

TASK_MODULES = ("workers.tasks.training", "workers.tasks.prediction", "workers.tasks.housekeeping")

# Stable task names (beat entries and queued messages refer to these, never to module paths).
TASK_TRAIN = "sonoseg.train"
TASK_PREDICT_PROJECT = "sonoseg.predict_project"
TASK_DISPATCH = "sonoseg.dispatch_due_runs"
TASK_REAP = "sonoseg.reap_stale_runs"
TASK_DRAIN_WEBHOOKS = "sonoseg.drain_webhook_events"
TASK_SCHEDULED_RETRAIN = "sonoseg.scheduled_retrain"
TASK_SCORE_PROJECT = "sonoseg.score_project"
TASK_SCORE_NEW_IMAGES = "sonoseg.score_new_images"

TASK_ROUTES = {
    TASK_TRAIN: {"queue": QUEUE_TRAIN},
    TASK_PREDICT_PROJECT: {"queue": QUEUE_PREDICT},
    TASK_SCORE_PROJECT: {"queue": QUEUE_PREDICT},
    TASK_DISPATCH: {"queue": QUEUE_HOUSEKEEPING},
    TASK_REAP: {"queue": QUEUE_HOUSEKEEPING},
    TASK_DRAIN_WEBHOOKS: {"queue": QUEUE_HOUSEKEEPING},
    TASK_SCHEDULED_RETRAIN: {"queue": QUEUE_HOUSEKEEPING},
    TASK_SCORE_NEW_IMAGES: {"queue": QUEUE_HOUSEKEEPING},
}
