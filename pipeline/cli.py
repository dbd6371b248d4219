"""The shape every stage CLI shares: flags from a config dataclass, then `run(config)`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import add_config_arguments, resolve_config
from pipeline.errors import exit_on_user_error


def stage_main(
    config_cls: type,
    run: Callable[[Any], Any],
    *,
    prog: str,
    section: str,
    description: str,
    examples: str,
    argv: Sequence[str] | None = None,
) -> Any:
    """Parse flags into `config_cls` (defaults < --params section < flags) and call `run`.

    A UserError anywhere becomes one line on stderr and exit code 2.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, config_cls, section)
    args = parser.parse_args(argv)
    return exit_on_user_error(lambda: run(resolve_config(config_cls, args)))
