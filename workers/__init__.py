"""Ray execution: ``dispatch`` hands queued jobs to Ray tasks (or detached actors on a cluster) that run them, a
job with several workers in a placement group of its own; ``ray_workers`` is one job's workers (ranks 1..N-1 as
actors in that group, tensors through Ray's object store).

Imports: ``service``; never ``api``.
"""
