"""Running one build's plan on a driver: no database, no queue.

engine (the Runner: jobs in order, timeout, cancel, artifacts), output (masking
secrets in the job output stream), store (objects and artifacts on disk).
"""
