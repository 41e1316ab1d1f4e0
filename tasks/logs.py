"""Expected failures read as one line in the run's logs, not a traceback.

Prefect's task engine logs a task's final failure with its traceback. For the failures a build or a
watch expects (the hub unreachable or refusing, bad input, an engine failing its parity gate, a
backend that cannot run here) the message already says what happened and what to do, so the
traceback is dropped; a failure returned as a state logs no "NoneType: None" either. Anything else
keeps its traceback.
"""

from __future__ import annotations

import logging

from indicf5.backends.base import BackendUnavailable
from indicf5.errors import InputError
from indicf5.hub import TransientHubError
from indicf5.stages import ParityError

EXPECTED = (InputError, TransientHubError, ParityError, BackendUnavailable)


class ExpectedFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (record.exc_info[1] is None or isinstance(record.exc_info[1], EXPECTED)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_failures() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedFailures) for f in logger.filters):
            logger.addFilter(ExpectedFailures())
