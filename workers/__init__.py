"""Ray execution: hands queued jobs to Ray tasks (or detached actors on a cluster) that run them.

Imports: ``service``; never ``api``.
"""
