"""``troupe rayjob render|submit``: the training RayJob from params.yaml + chart values files.

``render`` prints the params ConfigMap and the RayJob (the same objects ``helm template
charts/troupe-training`` renders for the same values); ``submit`` creates/updates the ConfigMap,
creates the RayJob, follows it and exits non-zero with KubeRay's reason when it fails.
"""

from __future__ import annotations

import time
from typing import Any

import click
import yaml

from troupe.cli import step_options
from troupe.config import ConfigError, apply_overrides
from troupe.kube.rayjob import (
    RayJobError,
    Terminated,
    params_configmap,
    rayjob_manifest,
    training_values,
)


class _BlockDumper(yaml.SafeDumper):
    """YAML dumper that writes multi-line strings (the params file) as ``|`` blocks."""


_BlockDumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def _chart_overrides(items: tuple[str, ...]) -> dict[str, Any]:
    """``--chart-set a.b=c`` items as a nested dict (YAML-typed values, like ``--set``)."""
    return apply_overrides({}, items)


def run_options(f: Any) -> Any:
    """Options shared by ``render`` and ``submit`` (besides --params/--set)."""
    f = click.option("--step", type=click.Choice(["sft", "dpo"]), required=True, help="training step")(f)
    f = click.option(
        "--env",
        "env",
        type=click.Choice(["test", "prod"]),
        default=None,
        help="add the chart's values-<env>.yaml",
    )(f)
    f = click.option(
        "-f",
        "--values",
        "value_files",
        multiple=True,
        metavar="FILE",
        help="chart values file (repeatable; relative names are looked up in the chart too)",
    )(f)
    f = click.option(
        "--chart-set",
        "chart_sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="chart value override, e.g. --chart-set aws.roleArn=arn:aws:iam::...:role/x",
    )(f)
    f = click.option("--namespace", "-n", default="default", show_default=True, help="Kubernetes namespace")(
        f
    )
    return f


def _build(
    params: dict[str, Any],
    step: str,
    env: str | None,
    value_files: tuple[str, ...],
    chart_sets: tuple[str, ...],
    release: str,
    namespace: str,
) -> tuple[dict, dict, dict]:
    """(params ConfigMap, RayJob, chart values) for one step."""
    files = ([f"values-{env}.yaml"] if env else []) + list(value_files)
    values = training_values(params, step, value_files=files, overrides=_chart_overrides(chart_sets))
    cm = params_configmap(values, release=release, namespace=namespace)
    return cm, rayjob_manifest(values, release=release, namespace=namespace), values


@click.group("rayjob")
def rayjob_cli() -> None:
    """Training as a KubeRay RayJob (production path; see docs/production.md)."""


@rayjob_cli.command("render")
@step_options
@run_options
@click.option(
    "--release", default="troupe", show_default=True, help="release name (RayJob = <release>-<step>)"
)
def render_cmd(
    params: dict[str, Any],
    step: str,
    env: str | None,
    value_files: tuple[str, ...],
    chart_sets: tuple[str, ...],
    namespace: str,
    release: str,
) -> None:
    """Print the params ConfigMap and the RayJob as YAML (nothing is contacted)."""
    cm, job, _ = _build(params, step, env, value_files, chart_sets, release, namespace)
    click.echo(yaml.dump_all([cm, job], Dumper=_BlockDumper, sort_keys=False, allow_unicode=True), nl=False)


@rayjob_cli.command("submit")
@step_options
@run_options
@click.option("--release", default=None, help="release name (default troupe-<UTC timestamp>)")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=48 * 3600,
    show_default=True,
    help="seconds to wait for the job",
)
@click.option(
    "--poll", "poll_s", type=float, default=10.0, show_default=True, help="seconds between status reads"
)
def submit_cmd(
    params: dict[str, Any],
    step: str,
    env: str | None,
    value_files: tuple[str, ...],
    chart_sets: tuple[str, ...],
    namespace: str,
    release: str | None,
    timeout_s: float,
    poll_s: float,
) -> None:
    """Check inputs are reachable from every pod, apply the params ConfigMap, create the RayJob and wait.

    Exits 1 with KubeRay's reason on failure (or naming the unreachable ``paths.*`` before anything
    is created); SIGTERM deletes the RayJob before exiting.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from troupe.kube.rayjob import check_cluster_locations, kube_api_client, submit_rayjob

    release = release or time.strftime("troupe-%Y%m%d-%H%M%S", time.gmtime())
    cm, job, values = _build(params, step, env, value_files, chart_sets, release, namespace)
    check_cluster_locations(params, step, values["checkpoints"]["s3Uri"])
    api_client = kube_api_client()
    core = client.CoreV1Api(api_client)
    try:
        core.create_namespaced_config_map(namespace, cm)
    except ApiException as e:
        if e.status != 409:
            raise click.ClickException(f"ConfigMap {namespace}/{cm['metadata']['name']}: {e.reason}") from e
        core.replace_namespaced_config_map(cm["metadata"]["name"], namespace, cm)
    try:
        submit_rayjob(
            job, namespace, timeout_s, client.CustomObjectsApi(api_client), poll_s=poll_s, log=click.echo
        )
    except RayJobError as e:
        raise click.ClickException(str(e)) from e
    except Terminated as e:
        raise SystemExit(143) from e


__all__ = ["rayjob_cli", "ConfigError"]
