"""The ``troupe`` command line: one subcommand per pipeline step (dvc.yaml and KFP call these).

Subcommands are imported lazily so ``troupe --help`` stays fast and a step only pays for its own
imports (torch, ray, mlflow...). Every step takes ``--params`` (default ``params.yaml``) and any number
of ``--set key.sub=value`` overrides.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import click

#: name -> "module:attribute" of a click command or group.
COMMANDS: dict[str, str] = {
    "data": "troupe.data.cli:data",
    "characters": "troupe.characters.cli:characters",
    "model": "troupe.modeling:model_cli",
    "train": "troupe.train.cli:train",
    "evaluate": "troupe.evaluate:evaluate_cmd",
    "registry": "troupe.registry:registry_cli",
    "deploy": "troupe.deploy:deploy_cmd",
    "chat": "troupe.deploy:chat_cmd",
    "rollout": "troupe.rollout:rollout_cli",
    "plan": "troupe.plan:plan_cmd",
    "pipeline": "troupe.pipeline:pipeline_cli",
    "rayjob": "troupe.kube.cli:rayjob_cli",
    "params": "troupe.params:params_cli",
    "feedback": "troupe.feedback.cli:feedback",
    "judge": "troupe.dialogue.judge_cli:judge_cli",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use (see click docs, "Lazy Loading")."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        return getattr(importlib.import_module(mod), attr)


def step_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--params PATH`` and repeatable ``--set KEY=VALUE`` to a step command.

    The wrapped function receives ``params`` (the loaded, overridden, validated dict with defaults
    filled in; see troupe.params) instead of the two options. A params file or override that does not
    validate is a usage error: exit 2 with the message (file, dotted key, nearest valid key).
    """
    import functools

    from troupe.config import ConfigError, load_params

    @click.option(
        "--params",
        "params_path",
        default="params.yaml",
        show_default=True,
        type=click.Path(dir_okay=False),
        help="params.yaml to read",
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="override a params entry, e.g. --set sft.max_steps=3 (repeatable)",
    )
    @functools.wraps(f)
    def wrapper(params_path: str, overrides: tuple[str, ...], **kw: Any) -> Any:
        try:
            params = load_params(params_path, overrides)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
        return f(params=params, **kw)

    return wrapper


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="troupe")
def cli() -> None:
    """Troupe: role-play model pipeline (import -> validate -> split -> SFT -> DPO -> evaluate ->
    register/gate -> deploy) and its production front doors (plan, pipeline, rayjob, rollout)."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; errors from Troupe (ValueError subclasses) exit 2 with one line."""
    from troupe.config import ConfigError
    from troupe.contract import ContractError

    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as e:
        if e.exit_code:
            sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        sys.exit(1)
    except (ConfigError, ContractError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
