"""The job domain: what the service knows about a job besides compressing it.

``settings`` (one settings object read from the environment), ``api_keys`` (tenants and their keys),
``job_store`` (the SQLAlchemy job store: SQLite or PostgreSQL, and which job owns which output folder),
``storage`` (local folder or S3, manifest last), ``s3_checkpoint`` (a model on S3 read tensor by tensor with
ranged GETs), ``checkpoints`` (a job's per-block checkpoints: records in the store, shards in the output),
``request`` (a job request, typed and checked, turned into the
engine's options), ``job_runner`` (one job from queued to a terminal state), ``webhook`` (signed notifications)
and ``outbound`` (which addresses the server may send requests to for a tenant's URL). It knows nothing of Ray or
HTTP.

Imports: ``service.engine`` and what it builds on; never ``workers`` or ``api``.
"""
