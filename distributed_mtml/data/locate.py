"""Where a command's suite is: the config's path, made first by its generator when it names one."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from distributed_mtml.data.generators import make_suite
from distributed_mtml.data.suite import SUITE_FILE
from distributed_mtml.errors import InputError

if TYPE_CHECKING:
    from distributed_mtml.config import Config, SuiteConfig


def ensure_suite(config: Config) -> str:
    """The suite's absolute location, generating it first when the config names a generator."""
    if config.suite is None:
        raise InputError("suite: this command needs a 'suite' section (path or generator)")
    return ensure_suite_at(config.suite)


def ensure_suite_at(suite: SuiteConfig) -> str:
    path = suite.resolved_path()
    exists = "://" in path or os.path.exists(os.path.join(path, SUITE_FILE))
    if not exists and suite.generator:
        make_suite(suite.generator, path, suite.options)
    return path
