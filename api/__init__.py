"""HTTP: the FastAPI job API, its schemas (the contract), the Python client, the CLI and the dashboard.

Imports: ``service`` and ``workers`` (the dispatcher); nothing imports this package.
"""
