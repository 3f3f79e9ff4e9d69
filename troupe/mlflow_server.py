"""Entrypoint of the troupe-mlflow chart: resolve the DB URI at start, then run MLflow.

    python -m troupe.mlflow_server server [mlflow server options...]   # exec `mlflow server`
    python -m troupe.mlflow_server db-upgrade [--auth]                 # `mlflow db upgrade` (+ auth DB)

The backend store URI comes from one of two places:

* ``MLFLOW_BACKEND_STORE_URI`` (a Kubernetes Secret holding the whole URI, chart value
  ``backendStore.source=existingSecret``): used as it is. A rotated password needs the Secret updated.
* AWS Secrets Manager (``backendStore.source=secretsManager``): ``TROUPE_MLFLOW_DB_SECRET_ID`` names
  the RDS-managed secret (JSON ``{"username": .., "password": ..}``; rotation-Lambda secrets also
  carry ``host``, ``port``, ``dbname``), read through the pod's IRSA role at every start.
  ``TROUPE_MLFLOW_DB_URI_TEMPLATE`` is a URI with ``{placeholders}``: every field of the secret
  (URL-quoted) plus ``{endpoint}`` / ``{database}`` from ``TROUPE_MLFLOW_DB_ENDPOINT`` /
  ``TROUPE_MLFLOW_DB_NAME``. RDS rotates the password every 7 days; connections already open keep
  working, and a restarted pod (``kubectl rollout restart deploy/troupe-mlflow``) reads the new one.

With ``--app-name basic-auth`` (server) or ``--auth`` (db-upgrade), MLflow's basic-auth app gets an
auth config file written to ``$TMPDIR`` (mode 0600) whose ``database_uri`` is
``TROUPE_MLFLOW_AUTH_DB_URI`` when set, else the backend store URI with its database replaced by
``TROUPE_MLFLOW_AUTH_DB_NAME`` when set (same server and user), else the backend store URI itself
(the auth tables live beside the tracking tables, with their own Alembic version table). The admin user and password come from
``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD`` (read by MLflow itself; used only
when the admin user does not exist yet) and the CSRF key from ``MLFLOW_FLASK_SERVER_SECRET_KEY``.

The URI is handed to MLflow through the environment (never argv), so the password is not in the
process list. Exit code 2 with a message naming the setting when the configuration is incomplete.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

BACKEND_URI = "MLFLOW_BACKEND_STORE_URI"
SECRET_ID = "TROUPE_MLFLOW_DB_SECRET_ID"
URI_TEMPLATE = "TROUPE_MLFLOW_DB_URI_TEMPLATE"
DB_ENDPOINT = "TROUPE_MLFLOW_DB_ENDPOINT"
DB_NAME = "TROUPE_MLFLOW_DB_NAME"
AUTH_DB_URI = "TROUPE_MLFLOW_AUTH_DB_URI"
AUTH_DB_NAME = "TROUPE_MLFLOW_AUTH_DB_NAME"
AUTH_DEFAULT_PERMISSION = "TROUPE_MLFLOW_AUTH_DEFAULT_PERMISSION"
AUTH_CONFIG_PATH = "MLFLOW_AUTH_CONFIG_PATH"


class ConfigError(Exception):
    """The entrypoint's environment is incomplete or wrong (exit code 2)."""


def fetch_secret(secret_id: str) -> dict[str, object]:
    """The JSON of a Secrets Manager secret (credentials from IRSA; ``AWS_ENDPOINT_URL`` is honoured)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client = boto3.client("secretsmanager")
        text = client.get_secret_value(SecretId=secret_id)["SecretString"]
    except (ClientError, BotoCoreError) as e:
        raise ConfigError(f"cannot read secret {secret_id!r} ({SECRET_ID}) from Secrets Manager: {e}") from e
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"secret {secret_id!r} ({SECRET_ID}) is not JSON: {e.msg}") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"secret {secret_id!r} ({SECRET_ID}) is not a JSON object")
    return fields


def fill_uri(template: str, secret: Mapping[str, object], env: Mapping[str, str]) -> str:
    """``template`` with ``{field}`` replaced: secret fields URL-quoted, ``endpoint``/``database`` from env."""
    fields = {"endpoint": env.get(DB_ENDPOINT, ""), "database": env.get(DB_NAME, "")}
    fields.update({k: quote(str(v), safe="") for k, v in secret.items()})
    try:
        uri = template.format_map(fields)
    except KeyError as e:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{URI_TEMPLATE} names {{{e.args[0]}}}, which is not one of: {known}") from None
    for name, env_name in (("endpoint", DB_ENDPOINT), ("database", DB_NAME)):
        if "{" + name + "}" in template and not fields[name]:
            raise ConfigError(f"{URI_TEMPLATE} uses {{{name}}} but {env_name} is empty")
    return uri


def backend_store_uri(env: Mapping[str, str] = os.environ) -> str:
    """The backend store URI: ``MLFLOW_BACKEND_STORE_URI`` as given, else built from Secrets Manager."""
    if env.get(BACKEND_URI):
        return env[BACKEND_URI]
    secret_id = env.get(SECRET_ID, "")
    if not secret_id:
        raise ConfigError(
            f"no database: set {BACKEND_URI} (existing Secret) or {SECRET_ID} (Secrets Manager)"
        )
    template = env.get(URI_TEMPLATE, "")
    if not template:
        raise ConfigError(f"{SECRET_ID} is set but {URI_TEMPLATE} is empty")
    return fill_uri(template, fetch_secret(secret_id), env)


def write_auth_config(database_uri: str, default_permission: str = "READ") -> Path:
    """A basic-auth config file (mode 0600, in $TMPDIR) pointing at ``database_uri``."""
    text = (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    fd, name = tempfile.mkstemp(prefix="mlflow-auth-", suffix=".ini")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name)


def auth_db_uri(backend_uri: str, env: Mapping[str, str] = os.environ) -> str:
    """The auth store URI: ``TROUPE_MLFLOW_AUTH_DB_URI``, else the backend URI (database from ``..._AUTH_DB_NAME``)."""
    if env.get(AUTH_DB_URI):
        return env[AUTH_DB_URI]
    if env.get(AUTH_DB_NAME):
        from sqlalchemy.engine import make_url

        return make_url(backend_uri).set(database=env[AUTH_DB_NAME]).render_as_string(hide_password=False)
    return backend_uri


def _auth_env(backend_uri: str, env: Mapping[str, str]) -> dict[str, str]:
    path = write_auth_config(auth_db_uri(backend_uri, env), env.get(AUTH_DEFAULT_PERMISSION) or "READ")
    return {AUTH_CONFIG_PATH: str(path)}


def _wants_auth(args: Sequence[str]) -> bool:
    return "--app-name=basic-auth" in args or any(
        a == "--app-name" and b == "basic-auth" for a, b in zip(args, args[1:], strict=False)
    )


def db_upgrade(backend_uri: str, auth: bool, env: Mapping[str, str] = os.environ) -> None:
    """``mlflow db upgrade`` on the backend store (in process: the URI stays off argv), then the auth DB."""
    from mlflow.db import upgrade

    upgrade.main([backend_uri], standalone_mode=False)
    if auth:
        from mlflow.server.auth.db.utils import migrate_if_needed
        from mlflow.store.db.utils import create_sqlalchemy_engine_with_retry

        engine = create_sqlalchemy_engine_with_retry(auth_db_uri(backend_uri, env))
        migrate_if_needed(engine, "head")
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("server", "db-upgrade"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        uri = backend_store_uri()
        if args[0] == "db-upgrade":
            db_upgrade(uri, auth="--auth" in args[1:])
            print("mlflow db upgrade: done", file=sys.stderr)
            return 0
        extra = _auth_env(uri, os.environ) if _wants_auth(args[1:]) else {}
    except ConfigError as e:
        print(f"troupe.mlflow_server: {e}", file=sys.stderr)
        return 2
    os.environ.update({BACKEND_URI: uri, **extra})
    # exec: `mlflow server` becomes this process (PID 1 in the pod) and forwards SIGTERM to uvicorn.
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "server", *args[1:]])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
