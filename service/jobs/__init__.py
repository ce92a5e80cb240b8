"""The job domain: what the service knows about a job besides compressing it.

``settings`` (one settings object read from the environment), ``api_keys`` (tenants and their keys),
``job_store`` (the SQLAlchemy job store: SQLite or PostgreSQL), ``storage`` (local folder or S3, manifest last),
``request`` (a job request, typed and checked, turned into the engine's options), ``job_runner`` (one job from
queued to a terminal state) and ``webhook`` (signed notifications). It knows nothing of Ray or HTTP.

Imports: ``service.engine`` and what it builds on; never ``workers`` or ``api``.
"""
