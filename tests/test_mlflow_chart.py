"""troupe-mlflow chart: what the rendered pods run, run for real on loopback.

The chart is rendered with the Helm engine (helm-python-sdk) for values-prod.yaml. The migration Job's
and the Deployment's command, args and env are then run as rendered; only what needs AWS or a pod is
substituted: Secrets Manager is a moto server on loopback (``AWS_ENDPOINT_URL``), the RDS PostgreSQL is
SQLite (a real PostgreSQL on loopback in the slow rotation test), the S3 artifacts bucket is a local
directory, ``--host=0.0.0.0 --port=5000`` bind a free loopback port, and the ConfigMap / Secrets the
chart references are dicts playing the objects an operator creates (a reference to anything else
fails the test). Requests carry the Service's names as Host header, as in-cluster clients send them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (dev extra)")

from tests.conftest import free_port  # noqa: E402
from troupe import mlflow_server as entry  # noqa: E402
from troupe.kube.rayjob import merge_values  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "troupe-mlflow"
RELEASE = "troupe-mlflow"
PORT = 5000  # service.port
#: What the operator creates per environment (docs/production.md): no credential in values.
ADMIN = {"admin-username": "admin", "admin-password": "Adm1n-pass-word-42", "flask-secret-key": "csrf-key-1"}
#: RDS-managed passwords may hold characters a URI must quote.
DB_PASSWORD = "p@ss/w%rd:1?#x"


def require_auth_extra() -> None:
    """MLflow's basic-auth app imports Flask-WTF (mlflow[auth]); the image and the dev env must have it."""
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        pytest.fail("MLflow's basic-auth app needs mlflow[auth] (Flask-WTF): pip install 'mlflow[auth]'")


def values(env: str, override: dict[str, Any] | None = None) -> dict[str, Any]:
    """`helm install -f values-<env>.yaml --set aws.roleArn=..` (+ ``override``)."""
    vals = yaml.safe_load((CHART / f"values-{env}.yaml").read_text()) or {}
    vals = merge_values(vals, {"aws": {"roleArn": f"arn:aws:iam::123456789012:role/troupe-{env}-mlflow"}})
    return merge_values(vals, override or {})


def render(
    vals: dict[str, Any], namespace: str = "troupe-prod", release: str = RELEASE
) -> list[dict[str, Any]]:
    out = helm.Chart.load(CHART).render(vals, name=release, namespace=namespace, is_install=True)
    return [d for _, text in sorted(out.items()) for d in yaml.safe_load_all(text) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [d for d in docs if d["kind"] == kind]
    return obj


def container(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (c,) = one(docs, kind)["spec"]["template"]["spec"]["containers"]
    return c


def argv(c: dict[str, Any]) -> list[str]:
    """The container's command + args, with the image's `python` being this interpreter."""
    return [sys.executable if x == "python" else x for x in c["command"]] + [str(a) for a in c["args"]]


def pod_env(
    c: dict[str, Any], configmaps: dict[str, dict[str, str]], secrets: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The container's env as the kubelet resolves it (KeyError: the chart names an object or key that is not there)."""
    out = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = str(e["value"])
            continue
        ((kind, ref),) = e["valueFrom"].items()
        store = {"configMapKeyRef": configmaps, "secretKeyRef": secrets}[kind]
        out[e["name"]] = store[ref["name"]][ref["key"]]
    return out


def service_hosts(release: str = RELEASE, namespace: str = "troupe-prod") -> list[str]:
    names = [
        release,
        f"{release}.{namespace}",
        f"{release}.{namespace}.svc",
        f"{release}.{namespace}.svc.cluster.local",
    ]
    return names + [f"{n}:{PORT}" for n in names]


def allowed_hosts(c: dict[str, Any]) -> list[str]:
    (arg,) = [a for a in c["args"] if a.startswith("--allowed-hosts=")]
    return arg.split("=", 1)[1].split(",")


def loopback(args: list[str], port: int) -> list[str]:
    """Bind the pod's 0.0.0.0:5000 to a free loopback port; nothing else changes."""
    assert "--host=0.0.0.0" in args and f"--port={PORT}" in args, args
    return [
        {"--host=0.0.0.0": "--host=127.0.0.1", f"--port={PORT}": f"--port={port}"}.get(a, a) for a in args
    ]


def base_env(tmp: Path) -> dict[str, str]:
    """What the image provides besides the pod's env (PATH, an importable troupe)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp),
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture(scope="module")
def aws():
    """A moto server on loopback standing in for AWS Secrets Manager (what IRSA would reach)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    sm = boto3.client(
        "secretsmanager",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    yield SimpleNamespace(env=env, sm=sm)
    server.stop()


def rds_secret(aws, password: str = DB_PASSWORD) -> str:
    """An RDS-managed master user secret (JSON username/password); returns its ARN."""
    name = f"rds!db-{uuid.uuid4()}"
    return aws.sm.create_secret(
        Name=name, SecretString=json.dumps({"username": "mlflow", "password": password})
    )["ARN"]


def start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen, grace: float = 60) -> bool:
    """SIGTERM (what the kubelet sends); True when the server exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


# ---------------------------------------------------------------- rendering


def test_allowed_hosts_are_the_service_names_plus_extra_hosts() -> None:
    c = container(render(values("prod")), "Deployment")
    hosts = allowed_hosts(c)
    assert set(service_hosts()) <= set(hosts)
    assert "*" not in hosts
    docs = render(
        values("prod", {"server": {"extraAllowedHosts": ["mlflow.example.com"]}}), "team-a", "tracking"
    )
    hosts = allowed_hosts(container(docs, "Deployment"))
    assert set(service_hosts("tracking", "team-a")) <= set(hosts) and "mlflow.example.com" in hosts
    assert one(docs, "Service")["metadata"]["name"] == "tracking"


def test_migration_job_is_a_hook_with_the_servers_db_source() -> None:
    docs = render(values("prod"))
    job, sa = one(docs, "Job"), one(docs, "ServiceAccount")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    # The Job runs as the IRSA ServiceAccount, which must exist before a pre-install hook: it is an earlier hook.
    assert set(sa["metadata"]["annotations"]["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert int(sa["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    server, migrate = container(docs, "Deployment"), container(docs, "Job")
    assert migrate["command"] == server["command"] == ["python", "-m", "troupe.mlflow_server"]
    assert migrate["args"] == ["db-upgrade", "--auth"] and server["args"][0] == "server"
    assert migrate["image"] == server["image"]
    job_pod, server_pod = job["spec"]["template"]["spec"], one(docs, "Deployment")["spec"]["template"]["spec"]
    assert job_pod["serviceAccountName"] == server_pod["serviceAccountName"] == sa["metadata"]["name"]
    db = ("TROUPE_MLFLOW_DB_", "MLFLOW_BACKEND_STORE_URI", "TROUPE_MLFLOW_AUTH_DB", "AWS_")
    assert [e for e in server["env"] if e["name"].startswith(db)] == [
        e for e in migrate["env"] if e["name"].startswith(db)
    ]
    # The Service (and PDB) must not send traffic to / count the migration pod.
    selector = one(docs, "Service")["spec"]["selector"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert "Job" not in {d["kind"] for d in render(values("prod", {"migrations": {"enabled": False}}))}


def test_db_password_source_prod_secrets_manager_or_existing_secret() -> None:
    c = container(render(values("prod")), "Deployment")
    names = {e["name"] for e in c["env"]}
    assert {"TROUPE_MLFLOW_DB_SECRET_ID", "TROUPE_MLFLOW_DB_URI_TEMPLATE"} <= names
    assert "MLFLOW_BACKEND_STORE_URI" not in names  # no copied password that rotation would invalidate
    alt = render(
        values("prod", {"backendStore": {"source": "existingSecret", "existingSecret": "troupe-mlflow-db"}})
    )
    for kind in ("Deployment", "Job"):
        (uri,) = [e for e in container(alt, kind)["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
        assert uri["valueFrom"]["secretKeyRef"] == {"name": "troupe-mlflow-db", "key": "backend-store-uri"}
    literal = values(
        "prod", {"backendStore": {"secretsManager": {"secretId": "arn:x", "endpoint": "db:5432"}}}
    )
    env = pod_env(container(render(literal), "Deployment"), {}, {"troupe-mlflow-auth": ADMIN})
    assert env["TROUPE_MLFLOW_DB_SECRET_ID"] == "arn:x" and env["TROUPE_MLFLOW_DB_ENDPOINT"] == "db:5432"


def test_auth_on_in_prod_off_in_test() -> None:
    prod = render(values("prod"))
    c = container(prod, "Deployment")
    assert "--app-name=basic-auth" in c["args"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs["MLFLOW_AUTH_ADMIN_USERNAME"] == {"name": "troupe-mlflow-auth", "key": "admin-username"}
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"name": "troupe-mlflow-auth", "key": "admin-password"}
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"]["name"] == "troupe-mlflow-auth"
    test = render(values("test"), namespace="troupe-test")
    assert "--app-name=basic-auth" not in container(test, "Deployment")["args"]
    assert container(test, "Job")["args"] == ["db-upgrade"]
    assert set(service_hosts(namespace="troupe-test")) <= set(allowed_hosts(container(test, "Deployment")))
    own_db = render(values("prod", {"auth": {"database": "mlflow_auth", "databaseUriKey": "auth-db-uri"}}))
    env = {e["name"]: e for e in container(own_db, "Job")["env"]}
    assert env["TROUPE_MLFLOW_AUTH_DB_NAME"]["value"] == "mlflow_auth"
    assert env["TROUPE_MLFLOW_AUTH_DB_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "troupe-mlflow-auth",
        "key": "auth-db-uri",
    }


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ({"backendStore": {"source": "existingSecret", "existingSecret": ""}}, "backendStore.existingSecret"),
        ({"backendStore": {"source": "vault"}}, "backendStore.source"),
        ({"backendStore": {"secretsManager": {"configMap": ""}}}, "backendStore.secretsManager"),
        ({"aws": {"roleArn": ""}}, "aws.roleArn"),
        ({"auth": {"existingSecret": ""}}, "auth.existingSecret"),
        ({"artifacts": {"destination": ""}}, "artifacts.destination"),
    ],
)
def test_bad_values_fail_naming_the_setting(override: dict[str, Any], setting: str) -> None:
    with pytest.raises(helm.HelmError, match=setting.replace(".", r"\.")):
        render(values("prod", override))


# ---------------------------------------------------------------- entrypoint


def test_entrypoint_builds_the_uri_from_secrets_manager_at_each_start(aws, monkeypatch) -> None:
    arn = rds_secret(aws)
    c = container(render(values("prod")), "Deployment")
    cm = {
        "troupe-mlflow-db": {
            "secret-id": arn,
            "endpoint": "troupe-prod-mlflow.abc.us-east-1.rds.amazonaws.com:5432",
        }
    }
    env = {**pod_env(c, cm, {"troupe-mlflow-auth": ADMIN}), **aws.env}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_BACKEND_STORE_URI", raising=False)
    from sqlalchemy.engine import make_url

    uri = entry.backend_store_uri()
    assert uri == (
        f"postgresql+psycopg2://mlflow:{quote(DB_PASSWORD, safe='')}"
        "@troupe-prod-mlflow.abc.us-east-1.rds.amazonaws.com:5432/mlflow?sslmode=require"
    )
    assert make_url(uri).password == DB_PASSWORD and make_url(uri).query == {"sslmode": "require"}
    # RDS rotates the password: the next start (restart) reads the new one.
    aws.sm.put_secret_value(
        SecretId=arn, SecretString=json.dumps({"username": "mlflow", "password": "rotated-2"})
    )
    assert make_url(entry.backend_store_uri()).password == "rotated-2"
    monkeypatch.setenv("TROUPE_MLFLOW_AUTH_DB_NAME", "mlflow_auth")
    assert make_url(entry.auth_db_uri(uri)).database == "mlflow_auth"
    assert make_url(entry.auth_db_uri(uri)).password == DB_PASSWORD
    # The existing-Secret path is used as it is, without asking AWS.
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "sqlite:///x.db")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert entry.backend_store_uri() == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "TROUPE_MLFLOW_DB_SECRET_ID"),
        (
            {"TROUPE_MLFLOW_DB_SECRET_ID": "no-such-secret", "TROUPE_MLFLOW_DB_URI_TEMPLATE": "x"},
            "cannot read secret 'no-such-secret'",
        ),
        (
            {"TROUPE_MLFLOW_DB_SECRET_ID": "SECRET", "TROUPE_MLFLOW_DB_URI_TEMPLATE": "pg://{user}@h/d"},
            "{user}",
        ),
        (
            {
                "TROUPE_MLFLOW_DB_SECRET_ID": "SECRET",
                "TROUPE_MLFLOW_DB_URI_TEMPLATE": "pg://{username}@{endpoint}/d",
            },
            "TROUPE_MLFLOW_DB_ENDPOINT",
        ),
    ],
)
def test_entrypoint_bad_config_exits_2_naming_the_setting(aws, monkeypatch, capsys, env, message) -> None:
    arn = rds_secret(aws)
    for k in (
        "MLFLOW_BACKEND_STORE_URI",
        "TROUPE_MLFLOW_DB_SECRET_ID",
        "TROUPE_MLFLOW_DB_URI_TEMPLATE",
        "TROUPE_MLFLOW_DB_ENDPOINT",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**aws.env, "AWS_DEFAULT_REGION": "us-east-1", **env}.items():
        monkeypatch.setenv(k, arn if v == "SECRET" else v)
    assert entry.main(["db-upgrade"]) == 2
    err = capsys.readouterr().err
    assert message in err and DB_PASSWORD not in err


# ---------------------------------------------------------------- the rendered pods, run


def test_prod_pods_migrate_then_serve_service_names_with_auth(aws, tmp_path: Path) -> None:
    """Job (db upgrade) then server, both exactly as rendered for prod; Host = the Service's names."""
    require_auth_extra()
    docs = render(values("prod"))
    job_c, server_c = container(docs, "Job"), container(docs, "Deployment")
    configmaps = {"troupe-mlflow-db": {"secret-id": rds_secret(aws), "endpoint": "rds.invalid:5432"}}
    secrets = {"troupe-mlflow-auth": ADMIN}
    substitute = {
        # SQLite stands in for RDS; {username} is still filled from the Secrets Manager secret.
        "TROUPE_MLFLOW_DB_URI_TEMPLATE": f"sqlite:///{tmp_path}/{{username}}.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),  # s3://troupe-prod-mlflow-artifacts
        "HOME": str(tmp_path),  # the pod's /tmp emptyDir
    }

    def env_of(c: dict[str, Any]) -> dict[str, str]:
        env = pod_env(c, configmaps, secrets)
        assert "TROUPE_MLFLOW_DB_URI_TEMPLATE" in env
        env.update({k: v for k, v in substitute.items() if k in env})
        return {**base_env(tmp_path), **aws.env, **env}

    db = tmp_path / "mlflow.db"
    job = subprocess.run(
        argv(job_c), env=env_of(job_c), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert job.returncode == 0, job.stderr[-4000:]
    tables = {r[0] for r in sqlite3.connect(db).execute("select name from sqlite_master where type='table'")}
    assert {"alembic_version", "experiments", "alembic_version_auth", "users"} <= tables

    port, log = free_port(), tmp_path / "server.log"
    proc = start(loopback(argv(server_c), port), env_of(server_c), tmp_path, log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base, log)
        admin = (ADMIN["admin-username"], ADMIN["admin-password"])
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=5"
        fqdn = f"{RELEASE}.troupe-prod.svc.cluster.local:{PORT}"
        with httpx.Client(timeout=60) as http:
            for host in (fqdn, RELEASE):
                r = http.get(search, headers={"Host": host}, auth=admin)
                assert r.status_code == 200, (host, r.status_code, r.text[:300])
            # Every Service name passes the host check (which answers before auth: 401, not 403).
            for host in service_hosts():
                r = http.get(search, headers={"Host": host})
                assert r.status_code == 401, (host, r.status_code, r.text[:300])
            # The host check is on: a name the chart did not allow is refused (DNS rebinding guard).
            r = http.get(search, headers={"Host": "mlflow.attacker.example:5000"}, auth=admin)
            assert r.status_code == 403, r.text[:300]
            # Auth is on: no or wrong credentials are refused; the admin from the Secret gets in.
            assert http.get(search, headers={"Host": fqdn}).status_code == 401
            assert (
                http.get(search, headers={"Host": fqdn}, auth=("admin", "wrong-password-1")).status_code
                == 401
            )
            r = http.post(
                f"{base}/api/2.0/mlflow/experiments/create",
                json={"name": "chart-test"},
                headers={"Host": fqdn},
                auth=admin,
            )
            assert r.status_code == 200, r.text[:300]
        names = {r[0] for r in sqlite3.connect(db).execute("select name from experiments")}
        assert "chart-test" in names  # the server writes the DB the Job migrated
        assert not (tmp_path / "basic_auth.db").exists()  # auth tables went to the configured DB
    finally:
        assert stop(proc), f"mlflow server ignored SIGTERM:\n{log.read_text()[-2000:]}"


# ---------------------------------------------------------------- real PostgreSQL, real rotation


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(cands[-1]) if cands else None


@pytest.fixture
def postgres():
    """A PostgreSQL server on loopback with SSL (the prod URI says sslmode=require) and password auth."""
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (what the image has)")
    initdb, postgres_bin = _pg_bin("initdb"), _pg_bin("postgres")
    openssl = shutil.which("openssl")
    if not (initdb and postgres_bin and openssl):
        pytest.skip("needs PostgreSQL server binaries (Debian: postgresql) and openssl")
    import tempfile

    import psycopg2

    root = Path(tempfile.mkdtemp(prefix="troupe-pg-"))
    root.chmod(0o755)
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' user")
    data = root / "data"
    kw = {"user": user.pw_uid, "group": user.pw_gid} if user else {}
    if user:
        os.chown(root, user.pw_uid, user.pw_gid)
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"],
        check=True,
        capture_output=True,
        **kw,
    )
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(data / "server.key"), "-out", str(data / "server.crt")],
        check=True, capture_output=True, **kw,
    )  # fmt: skip
    (data / "server.key").chmod(0o600)
    port = free_port()
    (data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
    with (data / "postgresql.conf").open("a") as f:
        f.write(
            f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\nssl = on\nfsync = off\n"
        )
    log = root / "pg.log"
    proc = subprocess.Popen(
        [postgres_bin, "-D", str(data)], stdout=log.open("w"), stderr=subprocess.STDOUT, **kw
    )

    def admin_sql(sql: str) -> None:
        conn = psycopg2.connect(host=str(root), port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
        conn.close()

    try:
        for _ in range(100):
            try:
                admin_sql("select 1")
                break
            except psycopg2.OperationalError:
                if proc.poll() is not None:
                    pytest.fail(log.read_text())
                time.sleep(0.2)
        yield SimpleNamespace(port=port, sql=admin_sql)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def _cmdlines(pid: int) -> list[str]:
    """Command lines of ``pid`` and all its descendants."""
    import psutil

    try:
        p = psutil.Process(pid)
        return [" ".join(x.cmdline()) for x in [p, *p.children(recursive=True)]]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_rotated_db_password_is_read_at_restart(aws, postgres, tmp_path: Path) -> None:
    """Real PostgreSQL + prod URI template: rotate the password (DB and secret); a restart picks it up."""
    require_auth_extra()
    import psycopg2

    old, new = "first-P@ss:/%1", "second-P@ss?#2"
    postgres.sql(f"create role mlflow login password '{old}'")
    postgres.sql("create database mlflow owner mlflow")
    arn = rds_secret(aws, old)
    docs = render(values("prod"))
    job_c, server_c = container(docs, "Job"), container(docs, "Deployment")
    configmaps = {"troupe-mlflow-db": {"secret-id": arn, "endpoint": f"127.0.0.1:{postgres.port}"}}

    def env_of(c: dict[str, Any]) -> dict[str, str]:
        env = pod_env(c, configmaps, {"troupe-mlflow-auth": ADMIN})
        env.update(
            {
                k: v
                for k, v in {
                    "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "a"),
                    "HOME": str(tmp_path),
                }.items()
                if k in env
            }
        )
        return {**base_env(tmp_path), **aws.env, **env}

    job = subprocess.run(
        argv(job_c), env=env_of(job_c), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert job.returncode == 0, job.stderr[-4000:]
    admin = (ADMIN["admin-username"], ADMIN["admin-password"])
    host = {"Host": f"{RELEASE}.troupe-prod.svc.cluster.local:{PORT}"}

    def serve(check) -> None:
        port, log = free_port(), tmp_path / f"server-{time.time()}.log"
        proc = start(loopback(argv(server_c), port), env_of(server_c), tmp_path, log)
        try:
            wait_healthy(proc, f"http://127.0.0.1:{port}", log)
            check(f"http://127.0.0.1:{port}")
            for line in _cmdlines(proc.pid):
                assert old not in line and new not in line and quote(old, safe="") not in line
        finally:
            assert stop(proc)

    def before(base: str) -> None:
        r = httpx.post(
            f"{base}/api/2.0/mlflow/experiments/create",
            json={"name": "before-rotation"},
            headers=host,
            auth=admin,
            timeout=60,
        )
        assert r.status_code == 200, r.text[:300]

    serve(before)
    # RDS rotation: the DB password changes and the managed secret gets the new value.
    postgres.sql(f"alter role mlflow password '{new}'")
    aws.sm.put_secret_value(SecretId=arn, SecretString=json.dumps({"username": "mlflow", "password": new}))
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host="127.0.0.1",
            port=postgres.port,
            user="mlflow",
            password=old,
            dbname="mlflow",
            sslmode="require",
        )

    def after(base: str) -> None:
        r = httpx.get(
            f"{base}/api/2.0/mlflow/experiments/search?max_results=10", headers=host, auth=admin, timeout=60
        )
        assert r.status_code == 200, r.text[:300]
        assert "before-rotation" in {e["name"] for e in r.json()["experiments"]}

    serve(after)
