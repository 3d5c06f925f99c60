"""The worker daemon: where the queue, the database and the runner meet.

queue (the Celery app and queue names), context (one worker's settings,
connections and stores), execute (one build from claim to final write), kill
(the kill channel), reaper (builds of dead workers), shutdown (drain and
hand-back on signals), health, and curlyq/gob (the Djinn server's own queue).
The Celery tasks and signal hooks that call into these live in djinn.tasks.
"""
