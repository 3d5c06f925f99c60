"""Celery tasks: thin edges that call plain functions of the worker."""
