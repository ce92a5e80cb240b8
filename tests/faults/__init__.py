"""Faults as tests: a job hit by a failure of one part of the service ends in the right terminal state, once,
with nothing half-published.

    test_process_kills.py     SIGKILL of `llmpress serve` (its whole session, local Ray included) and of the Ray
                              worker running the job
    test_s3_faults.py         S3 answering 500 to a share of uploads (retried) or to every upload after the first few
    test_disk_full.py         a tmpfs too small for the output, as the artifacts folder or as the work folder
    test_job_store_outage.py  PostgreSQL stopped mid-job for a few seconds and started again

Every test ends with the same three checks (``outcome.py``): the terminal status, its status events (exactly one
terminal one), and the published output (a manifest listing exactly the files present, their sha256 matching; or,
for a failed job, no manifest and none of the job's files). ``serve_session.py`` runs `llmpress serve` in a session
of its own, to kill it whole and check that nothing of it survives; tests/s3_fault_proxy.py is the failing S3.
"""
