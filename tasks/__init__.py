"""Prefect tasks: one module per runbook stage, each a thin wrapper over a function in indicf5/.

Tasks add what Prefect is for (retries, cache keys, logging, UI state) and nothing else."""

from tasks.logs import quiet_expected_failures

quiet_expected_failures()
