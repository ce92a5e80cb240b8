"""llmpress's engine and job domain, in four packages whose imports point one way (tests/test_layout.py checks):

    algorithms  <-  recipes  <-  engine  <-  jobs        (each imports only the packages to its left)

``workers/`` (Ray execution) and ``api/`` (HTTP, CLI, dashboard) build on these; nothing here imports them.
"""
