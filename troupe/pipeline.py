"""``troupe pipeline compile|submit|run-local``: the Kubeflow Pipelines front door.

The pipeline itself is ``pipelines/troupe_pipeline.py`` (components in ``components/steps.py``); this
module compiles it to KFP IR YAML, submits it to a KFP API server (``kfp.Client``), or runs it on
this machine with ``kfp.local`` (``SubprocessRunner(use_venv=False)``: every task runs as a
subprocess of the current Python, so the installed ``troupe`` is used).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import click
import yaml

DEFAULT_IR = "pipelines/troupe_pipeline.yaml"


class PipelineError(click.ClickException):
    """A pipeline front-door failure with a one-line cause (exit 2)."""

    exit_code = 2


def kube_settings(path: str | None) -> Any:
    """``KubeSettings`` from a YAML file of its fields (None path = defaults).

    Raises:
        PipelineError: unreadable file or unknown field.
    """
    from pipelines.troupe_pipeline import KubeSettings

    if not path:
        return KubeSettings()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return KubeSettings(**data)
    except (OSError, TypeError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: cannot read Kubernetes settings: {e}") from e


def compile_pipeline(
    output: str | Path = DEFAULT_IR,
    kubernetes: bool = True,
    kube_file: str | None = None,
    params: str | None = None,
) -> Path:
    """Compile the pipeline to KFP IR YAML at ``output`` and return its path.

    Args:
        output: IR YAML path (parent directories created).
        kubernetes: attach the kfp-kubernetes platform config (secrets, node placement).
        kube_file: YAML of :class:`pipelines.troupe_pipeline.KubeSettings` fields.
        params: params.yaml for the ``params_yaml`` default (None = the repository's).
    """
    from kfp import compiler

    from pipelines.troupe_pipeline import DEFAULT_PARAMS, build_pipeline

    fn = build_pipeline(kube_settings(kube_file) if kubernetes else None, params or DEFAULT_PARAMS)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=fn, package_path=str(out))
    return out


def parse_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``name=value`` pipeline arguments (value parsed as a YAML scalar).

    Raises:
        PipelineError: an argument without ``=``.
    """
    out: dict[str, Any] = {}
    for a in pairs:
        if "=" not in a:
            raise PipelineError(f"--arg {a!r}: expected NAME=VALUE, e.g. --arg sft_max_steps=3")
        k, v = a.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v else ""
    return out


def probe(host: str, timeout: float = 10.0) -> None:
    """Check that ``host`` answers HTTP at all (any status: 401/302 behind auth still counts).

    Raises:
        PipelineError: connection refused, DNS failure, timeout or a malformed URL; names --host / KFP_HOST.
    """
    import urllib.error
    import urllib.request

    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()  # noqa: S310 (user-given API URL)
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise PipelineError(
            f"KFP API server at {host} is unreachable ({reason}); check --host / KFP_HOST "
            "(e.g. `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`, then --host http://localhost:8080)"
        ) from e


def submit(
    host: str | None,
    namespace: str | None,
    experiment: str,
    run_name: str | None,
    arguments: dict[str, Any],
    package: str | Path,
    timeout: float = 10.0,
) -> str:
    """Submit a compiled pipeline package as a run; return the run id.

    The API server is probed first (:func:`probe`), so an unreachable host fails before anything
    (experiment, run) is created.

    Raises:
        PipelineError: no host, host unreachable, or package missing.
    """
    import kfp

    if not host:
        raise PipelineError("no KFP host: pass --host URL or set KFP_HOST")
    if not Path(package).is_file():
        raise PipelineError(f"{package}: compiled pipeline not found (run `troupe pipeline compile`)")
    probe(host, timeout)
    try:
        client = kfp.Client(host=host, namespace=namespace or "kubeflow")
        experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    except Exception as e:  # kfp_server_api / urllib3 raise many types for one cause
        raise PipelineError(
            f"KFP API server at {host} refused the request: {e}; check --host / KFP_HOST"
        ) from e
    try:
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=run_name,
            experiment_id=experiment_id,
            enable_caching=False,
        )
    except Exception as e:
        raise PipelineError(f"KFP API server at {host} rejected the run: {e}") from e
    return result.run_id


def run_local(
    arguments: dict[str, Any], pipeline_root: str = "work/kfp-local", params: str | None = None
) -> Any:
    """Run the pipeline on this machine with ``kfp.local`` (no Kubernetes config); return the outputs.

    Raises:
        RuntimeError: a task failed (``kfp.local`` raise_on_error).
    """
    from kfp import local

    from pipelines.troupe_pipeline import DEFAULT_PARAMS, build_pipeline

    # The tasks name the Troupe image; here they run in this Python on purpose (same installed troupe).
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    fn = build_pipeline(None, params or DEFAULT_PARAMS)
    return fn(**arguments)


@click.group("pipeline")
def pipeline_cli() -> None:
    """Kubeflow Pipelines: compile the IR, submit a run, or run it locally."""


@pipeline_cli.command("compile")
@click.option("--output", "-o", default=DEFAULT_IR, show_default=True, help="IR YAML to write")
@click.option(
    "--kubernetes/--no-kubernetes", default=True, show_default=True, help="attach kfp-kubernetes config"
)
@click.option(
    "--kube-config",
    "kube_file",
    default=None,
    help="YAML with KubeSettings fields (secrets, storage root, nodes)",
)
@click.option("--params", default=None, help="params.yaml used as the params_yaml default")
def compile_cmd(output: str, kubernetes: bool, kube_file: str | None, params: str | None) -> None:
    """Write the pipeline IR YAML (upload it in the Kubeflow UI or use `submit`)."""
    click.echo(str(compile_pipeline(output, kubernetes, kube_file, params)))


@pipeline_cli.command("submit")
@click.option("--host", default=lambda: os.environ.get("KFP_HOST"), help="KFP API URL [env KFP_HOST]")
@click.option(
    "--namespace", default=lambda: os.environ.get("KFP_NAMESPACE"), help="Kubeflow profile namespace"
)
@click.option("--experiment", default="troupe", show_default=True)
@click.option("--run-name", default=None)
@click.option("--package", default=DEFAULT_IR, show_default=True, help="compiled IR YAML")
@click.option("--arg", "args", multiple=True, metavar="NAME=VALUE", help="pipeline argument (repeatable)")
@click.option("--params", default=None, help="params.yaml sent as the params_yaml argument")
def submit_cmd(
    host: str | None,
    namespace: str | None,
    experiment: str,
    run_name: str | None,
    package: str,
    args: tuple[str, ...],
    params: str | None,
) -> None:
    """Create a run of the compiled pipeline on a KFP API server."""
    arguments = parse_args(args)
    if params:
        arguments["params_yaml"] = Path(params).read_text(encoding="utf-8")
    run_id = submit(host, namespace, experiment, run_name, arguments, package)
    click.echo(f"submitted run {run_id} to {host} (experiment {experiment})")


@pipeline_cli.command("run-local")
@click.option("--arg", "args", multiple=True, metavar="NAME=VALUE", help="pipeline argument (repeatable)")
@click.option("--params", default=None, help="params.yaml used as params_yaml")
@click.option("--pipeline-root", default="work/kfp-local", show_default=True)
def run_local_cmd(args: tuple[str, ...], params: str | None, pipeline_root: str) -> None:
    """Run the same pipeline here with kfp.local's SubprocessRunner (each task a subprocess)."""
    try:
        run_local(parse_args(args), pipeline_root, params)
    except (
        RuntimeError
    ) as e:  # kfp.local: "Pipeline 'troupe' finished with status FAILURE. Inner task failed: ..."
        raise PipelineError(f"{e} (task logs above; outputs under {pipeline_root})") from e
    click.echo(f"pipeline finished; artifacts under {pipeline_root}")
