"""Celery tasks, one module per queue: ``training`` (train), ``prediction`` (predict) and
``housekeeping`` (dispatch, reap, drain webhooks, nightly retrain)."""
