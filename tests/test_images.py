"""The images hold what the code loads, on one Python, with the package versions CI tested.

No Docker daemon (nor GPU, NPU or EFA) here, so no image is built. Instead each docker/Dockerfile.* is
read with dockerfile-parse and the COPY / WORKDIR / ENV instructions of its final stage are replayed
into a temp directory laid out like the image's filesystem (sources from this checkout, filtered by
.dockerignore). Then, from that layout only -- cwd at the image's WORKDIR, the image's ENV with its
paths mapped into the layout, this checkout made unimportable -- a subprocess runs `troupe --help`,
loads the production serving config (it must require API keys, i.e. come from
configs/serving/production.yaml and not fall back to the test defaults), loads the gate and rollout
policies named by the image's default params.yaml, runs `troupe registry register` past its policy
step, and finds the RayJob chart values. RUN steps cannot be replayed: this venv's packages stand in
for the image's, and PYTHONPATH from the Dockerfile's ENV is what makes the laid-out source
importable (in the image the editable install points at the same directory).

Also: one Python patch version in every image (Ray refuses mixed patch versions in a cluster);
requirements.lock as the constraints of every image's one `pip install`; the gpu extra is `ray[llm]`
at the lock's Ray (so vLLM is the one Ray pins); the CUDA image carries aws-ofi-nccl. Slow: pip's
resolver against PyPI for every image's package set, and the reason the Ascend image has no vLLM.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib.util
import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse (dev extra)")
from dockerfile_parse.util import WordSplitter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGES = ("cpu", "cuda", "ascend")
#: What each image installs besides its requirements file: `pip install ... -e <this>`.
PROJECT = {"cpu": ".", "cuda": ".[gpu]", "ascend": "."}
#: Checkout paths whose every file (less .dockerignore) an image must hold under its WORKDIR: the code,
#: what the code reads relative to the repository root or cwd, and the inputs of the image's pip install.
TREES = ("troupe", "serving", "components", "pipelines", "configs", "data/sample", "charts")
FILES = ("params.yaml", "pyproject.toml", "README.md", "requirements.lock", "docker/constraints.py")


def _load_constraints_module():
    spec = importlib.util.spec_from_file_location("troupe_docker_constraints", DOCKER / "constraints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


constraints_py = _load_constraints_module()
LOCK = constraints_py.read_requirements(ROOT / "requirements.lock")


# ---------------------------------------------------------------------------------------------------
# Reading a Dockerfile and laying its image out
# ---------------------------------------------------------------------------------------------------


def parser(name: str) -> Any:
    return dockerfile_parse.DockerfileParser(fileobj=io.BytesIO((DOCKER / f"Dockerfile.{name}").read_bytes()))


def global_args(name: str) -> dict[str, str]:
    """ARGs declared before the first FROM (shared by every stage that redeclares them)."""
    out: dict[str, str] = {}
    for ins in parser(name).structure:
        if ins["instruction"] == "FROM":
            break
        if ins["instruction"] == "ARG":
            key, _, default = ins["value"].partition("=")
            out[key.strip()] = default.strip()
    return out


def final_stage(name: str) -> list[tuple[dict[str, Any], Any]]:
    """(instruction, context) pairs of the last stage; context has ``args`` and ``envs`` in effect."""
    p = parser(name)
    pairs = list(zip(p.structure, p.context_structure, strict=True))
    last_from = max(i for i, (ins, _) in enumerate(pairs) if ins["instruction"] == "FROM")
    return pairs[last_from + 1 :]


def words(ins: dict[str, Any], ctx: Any) -> list[str]:
    """The instruction's arguments, variables expanded (shell form or JSON form)."""
    value = ins["value"].strip()
    if value.startswith("["):
        return [str(w) for w in json.loads(value)]
    return list(WordSplitter(value, args=ctx.args, envs=ctx.envs).split(dequote=True))


class DockerIgnore:
    """.dockerignore semantics: Go filepath.Match patterns with ``**``, ``!`` exceptions, last match wins,
    and a path is excluded when it or any of its parent directories is."""

    def __init__(self, path: Path):
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((re.compile(self._regex(pat)), negate))

    @staticmethod
    def _regex(pat: str) -> str:
        out, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pat[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pat[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                out, i = out + fnmatch.translate(pat[i : j + 1])[4:-3], j + 1
            else:
                out, i = out + re.escape(pat[i]), i + 1
        return f"^{out}$"

    def excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        verdict = False
        for rx, negate in self.rules:
            if any(rx.match(c) for c in candidates):
                verdict = not negate
        return verdict


@dataclass
class Layout:
    """An image's files under ``root`` (image path ``/x`` is ``root/x``), its WORKDIR and ENV."""

    root: Path
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    external: list[str] = field(default_factory=list)  # COPY --from sources (other images/stages)

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    @property
    def cwd(self) -> Path:
        return self.path(self.workdir)


def copy_instructions(name: str) -> list[int]:
    """Indexes (in :func:`final_stage`) of the COPY/ADD instructions that take files from the build context."""
    out = []
    for i, (ins, ctx) in enumerate(final_stage(name)):
        if ins["instruction"] in ("COPY", "ADD") and not any(w.startswith("--from") for w in words(ins, ctx)):
            out.append(i)
    return out


def lay_out(name: str, dest: Path, skip: int | None = None) -> Layout:
    """Replay the final stage's WORKDIR/COPY/ADD/ENV into ``dest`` (``skip``: one instruction left out)."""
    layout = Layout(dest)
    ignore = DockerIgnore(ROOT / ".dockerignore")
    for i, (ins, ctx) in enumerate(final_stage(name)):
        kind = ins["instruction"]
        if kind == "WORKDIR":
            layout.workdir = posixpath.normpath(posixpath.join(layout.workdir, words(ins, ctx)[0]))
            layout.cwd.mkdir(parents=True, exist_ok=True)
        elif kind == "ENV":
            layout.env = dict(ctx.envs)
        elif kind in ("COPY", "ADD") and i != skip:
            args = words(ins, ctx)
            if any(a.startswith("--from") for a in args):
                layout.external.append(" ".join(args))
                continue
            *sources, target = [a for a in args if not a.startswith("--")]
            target_abs = posixpath.join(layout.workdir, target)
            into_dir = target.endswith("/") or len(sources) > 1
            for src in sources:
                matches = sorted(ROOT.glob(src)) if any(c in src for c in "*?[") else [ROOT / src]
                matches = [
                    m for m in matches if m.exists() and not ignore.excluded(m.relative_to(ROOT).as_posix())
                ]
                assert matches, f"Dockerfile.{name}: {ins['content'].strip()}: {src} not in the build context"
                for m in matches:
                    if m.is_dir():
                        _copy_tree(m, layout.path(target_abs), ignore)
                    else:
                        to = layout.path(posixpath.join(target_abs, m.name) if into_dir else target_abs)
                        to.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(m, to)
    return layout


def _copy_tree(src: Path, dst: Path, ignore: DockerIgnore) -> None:
    """COPY of a directory: its contents (not the directory itself) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.rglob("*")):
        if f.is_file() and not ignore.excluded(f.relative_to(ROOT).as_posix()):
            to = dst / f.relative_to(src)
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, to)


def expected_files(name: str) -> set[str]:
    """Paths (relative to the image's WORKDIR) that the image must hold: see :data:`TREES`, :data:`FILES`."""
    ignore = DockerIgnore(ROOT / ".dockerignore")
    out = {*FILES, f"docker/requirements-{name}.txt"}
    for tree in TREES:
        for f in (ROOT / tree).rglob("*"):
            rel = f.relative_to(ROOT).as_posix()
            if f.is_file() and not ignore.excluded(rel):
                out.add(rel)
    return out


def missing_files(name: str, layout: Layout) -> list[str]:
    return sorted(p for p in expected_files(name) if not (layout.cwd / p).is_file())


# ---------------------------------------------------------------------------------------------------
# Running the code from a layout
# ---------------------------------------------------------------------------------------------------

#: Runs inside the layout; prints one JSON line. The checkout must not be importable: the venv installs
#: troupe editable from it (setuptools' __editable__ finder), and the cwd is not on sys.path for the
#: image's `troupe` console script either.
CHECKER = r"""
import contextlib, io, json, os, sys
layout, checkout = sys.argv[1], sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != os.path.realpath(checkout)]
res = {}

def cli(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            from troupe.cli import main
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # noqa: BLE001
            print(f"{type(e).__name__}: {e}")
            code = 1
    return {"code": code, "output": buf.getvalue()[-3000:]}

def attempt(key, fn):
    try:
        res[key] = fn()
    except Exception as e:  # noqa: BLE001
        res[key] = {"error": f"{type(e).__name__}: {e}"}

import importlib
def modules():
    return {m: importlib.import_module(m).__file__ for m in ("troupe", "troupe.cli", "serving.app", "components.runtime", "pipelines")}
attempt("modules", modules)
res["help"] = cli(["--help"])

def serving_config():
    from serving.app import CONFIG_DIR, REPO_ROOT, load_serving_config
    out = {"config_dir": str(CONFIG_DIR)}
    for env in ("test", "production"):
        cfg = load_serving_config({"env": env})
        chars = cfg.get("characters") or []
        chars = [chars] if isinstance(chars, str) else list(chars)
        out[env] = {
            "require_api_key": cfg["gateway"]["require_api_key"],
            "characters": {c: os.path.isfile(os.path.join(str(REPO_ROOT), c)) for c in chars},
        }
    return out
attempt("serving", serving_config)

def policies():
    from troupe.config import load_params
    from troupe.registry import load_policy
    from troupe.rollout import Policy
    reg = load_params("params.yaml")["registry"]
    load_policy(reg["gate_policy"])
    Policy.load(reg["rollout_policy"])
    return {"gate_policy": os.path.abspath(reg["gate_policy"]), "rollout_policy": os.path.abspath(reg["rollout_policy"])}
attempt("policies", policies)
res["register"] = cli(["registry", "register"])

def chart():
    from troupe.kube.rayjob import default_chart_dir
    values = default_chart_dir() / "values.yaml"
    return {"values": str(values), "exists": values.is_file()}
attempt("chart", chart)
print("RESULT " + json.dumps(res))
"""


def image_env(layout: Layout, home: Path) -> dict[str, str]:
    """The image's ENV with its paths mapped into the layout (paths of the base image are dropped), run
    with this venv's interpreter and packages standing in for the image's."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONNOUSERSITE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
    }
    for key, value in layout.env.items():
        if key in ("PATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "PYTHONHOME") or key.startswith(("PIP_", "UV_")):
            continue
        if value.startswith("/") or ":/" in value:
            parts = [p for p in value.split(":") if p]
            parts = [
                str(layout.path(p)) for p in parts if layout.path("/" + p.lstrip("/").split("/")[0]).exists()
            ]
            value = ":".join(parts)
            if not value:
                continue
        env[key] = value
    return env


def run_from_layout(layout: Layout, tmp: Path) -> dict[str, Any]:
    checker = tmp / "checker.py"
    checker.write_text(CHECKER, encoding="utf-8")
    (tmp / "home").mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(checker), str(layout.root), str(ROOT)],
        cwd=layout.cwd,
        env=image_env(layout, tmp / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"checker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------------------------
# Layout: what the images hold, and that the code runs from it
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGES)
def test_image_runs_from_its_own_files(name: str, tmp_path: Path) -> None:
    """troupe --help, the production serving config, the policies and `registry register` from the layout."""
    layout = lay_out(name, tmp_path / "image")
    missing = missing_files(name, layout)
    assert not missing, f"not under the image's WORKDIR {layout.workdir}: {missing[:10]}"
    root = str(layout.root)
    res = run_from_layout(layout, tmp_path)

    mods = res["modules"]
    assert "error" not in mods, mods
    for mod, path in mods.items():
        assert path.startswith(str(layout.cwd) + "/"), (
            f"{mod} imported from {path}, not from the image's {layout.workdir}"
        )

    assert res["help"]["code"] == 0 and "Usage" in res["help"]["output"], res["help"]

    srv = res["serving"]
    assert "error" not in srv, srv
    assert srv["config_dir"].startswith(root)
    assert srv["production"]["require_api_key"] is True, "production serving config fell back to the defaults"
    for env in ("test", "production"):
        # a characters file the checkout would find must be in the image too (none: they come with the model)
        found_here = [c for c in srv[env]["characters"] if (ROOT / c).is_file()]
        if found_here:
            assert any(srv[env]["characters"][c] for c in found_here), (env, srv[env]["characters"])

    pol = res["policies"]
    assert "error" not in pol, pol
    assert pol["gate_policy"].startswith(root) and pol["rollout_policy"].startswith(root)
    reg = res["register"]
    # past the policy it stops, with Troupe's one-line error, at an input of a later step (no evaluation
    # has run in the layout): not at the policy, and not on an import or packaging error
    assert reg["code"] == 2 and reg["output"].startswith("error:"), reg
    assert "gate policy" not in reg["output"], reg

    assert res["chart"].get("exists") is True and res["chart"]["values"].startswith(root), res["chart"]


@pytest.mark.parametrize("name", IMAGES)
def test_every_copy_is_needed(name: str, tmp_path: Path) -> None:
    """Leaving out any COPY from the build context loses files the image must hold."""
    copies = copy_instructions(name)
    assert len(copies) >= 8
    for i in copies:
        layout = lay_out(name, tmp_path / f"without-{i}", skip=i)
        ins = final_stage(name)[i][0]["content"].strip()
        assert missing_files(name, layout), f"Dockerfile.{name} without `{ins}` still holds everything"


def test_layout_check_catches_a_missing_configs_dir(tmp_path: Path) -> None:
    """Without `COPY configs` the production serving config falls back to the defaults and the policies
    are missing: the run from the layout says so (the defect this test file was written for)."""
    skip = next(
        i for i in copy_instructions("cpu") if final_stage("cpu")[i][0]["value"].startswith("configs")
    )
    res = run_from_layout(lay_out("cpu", tmp_path / "image", skip=skip), tmp_path)
    assert res["serving"]["production"]["require_api_key"] is False
    assert "error" in res["policies"]
    assert "gate policy not found" in res["register"]["output"]


def test_dockerignore_keeps_local_state_out() -> None:
    ignore = DockerIgnore(ROOT / ".dockerignore")
    for rel in (
        "troupe/__pycache__/cli.cpython-311.pyc",
        ".venv/bin/python",
        "troupe.egg-info/PKG-INFO",
        "work/x",
        "mlflow.db",
        "data/raw/big.jsonl",
    ):
        assert ignore.excluded(rel), rel
    for rel in (
        "troupe/cli.py",
        "configs/gate_policy.yaml",
        "data/sample/characters.jsonl",
        "charts/troupe-training/values.yaml",
    ):
        assert not ignore.excluded(rel), rel


@pytest.mark.parametrize("name", IMAGES)
def test_runtime_shape(name: str) -> None:
    """Non-root, WORKDIR at the source tree (cwd-relative defaults resolve), PYTHONPATH at it."""
    stage = final_stage(name)
    layout_env = dict(stage[-1][1].envs)
    workdirs = [words(ins, ctx)[0] for ins, ctx in stage if ins["instruction"] == "WORKDIR"]
    users = [ins["value"] for ins, _ in stage if ins["instruction"] == "USER"]
    assert workdirs[-1] == "/app" and users[-1] == "10001:10001"
    assert layout_env["PYTHONPATH"].split(":")[0] == "/app"
    assert layout_env["TROUPE_CHARTS_DIR"] == "/app/charts"


# ---------------------------------------------------------------------------------------------------
# Python, lock, extras, EFA
# ---------------------------------------------------------------------------------------------------


def test_one_python_patch_version() -> None:
    """Every image installs the same python-build-standalone patch version and checks it in the build."""
    from packaging.specifiers import SpecifierSet

    versions = {name: global_args(name).get("PYTHON_VERSION") for name in IMAGES}
    uv = {name: global_args(name).get("UV_VERSION") for name in IMAGES}
    assert len(set(versions.values())) == 1, versions
    assert len(set(uv.values())) == 1 and re.fullmatch(r"\d+\.\d+\.\d+", uv["cpu"]), uv
    version = versions["cpu"]
    assert re.fullmatch(r"3\.\d+\.\d+", version), version
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert version in SpecifierSet(requires)
    for name in IMAGES:
        stage = final_stage(name)
        runs = " ".join(ins["value"] for ins, _ in stage if ins["instruction"] == "RUN")
        assert 'uv python install "${PYTHON_VERSION}"' in runs
        assert 'uv python find --managed-python "${PYTHON_VERSION}")" -m venv /opt/troupe' in runs
        assert "assert v == '${PYTHON_VERSION}'" in runs  # the build fails on any other interpreter
        assert ["ARG", "PYTHON_VERSION"] in [[ins["instruction"], ins["value"]] for ins, _ in stage]
        assert "deadsnakes" not in runs and "--system-site-packages" not in runs
        uv_copies = [words(ins, ctx) for ins, ctx in stage if ins["instruction"] == "COPY"]
        assert ["--from=uv", "/uv", "/usr/local/bin/uv"] in uv_copies


@pytest.mark.parametrize("name", IMAGES)
def test_one_pip_install_with_the_lock(name: str) -> None:
    """The image's one `pip install` takes requirements.lock (+ the image's own pins) as constraints."""
    runs = [ins["value"] for ins, _ in final_stage(name) if ins["instruction"] == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r]
    assert len(pip_runs) == 1 and pip_runs[0].count("pip install") == 1, pip_runs
    run = " ".join(pip_runs[0].split())
    req = f"docker/requirements-{name}.txt"
    assert f"python docker/constraints.py requirements.lock {req} > /tmp/constraints.txt" in run
    project = PROJECT[name]
    assert re.search(
        rf"-c /tmp/constraints.txt (.* )?-r {re.escape(req)} -e \"?{re.escape(project)}\"?( |$)", run
    ), run
    # every pin the image changes differs from the lock (a pin equal to the lock's line is noise)
    own = constraints_py.read_requirements(DOCKER / f"requirements-{name}.txt")
    for pkg, version in own.items():
        if version is not None and pkg in LOCK:
            assert LOCK[pkg] != version, f"{req}: {pkg}=={version} is the lock's pin; write the bare name"
    lines = constraints_py.constraints(ROOT / "requirements.lock", DOCKER / f"requirements-{name}.txt")
    assert len(lines) >= len(LOCK)


def test_constraints_replace_only_the_named_pins(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("numpy==2.4.6\nPyYAML==6.0.3\ntorch==2.13.0\n")
    own = tmp_path / "own.txt"
    own.write_text("# why\ntorch==2.12.0  # reason\npyyaml\nTorch_NPU==2.12.0.post2\n")
    assert constraints_py.constraints(lock, own) == [
        "numpy==2.4.6",
        "pyyaml==6.0.3",
        "torch==2.12.0",
        "torch-npu==2.12.0.post2",
    ]
    own.write_text("cython\n")
    with pytest.raises(ValueError, match="cython: not in"):
        constraints_py.constraints(lock, own)
    own.write_text("torch>=2\n")
    with pytest.raises(ValueError, match="expected `name==version`"):
        constraints_py.constraints(lock, own)


def test_gpu_extra_is_rays_own_vllm_pin() -> None:
    """vLLM reaches the CUDA image only through ray[llm] at the lock's (and the charts') Ray version."""
    import yaml

    ray = LOCK["ray"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [f"ray[llm]=={ray}"]
    for chart in ("troupe-serving", "troupe-training"):
        assert yaml.safe_load((ROOT / "charts" / chart / "values.yaml").read_text())["rayVersion"] == ray
    for f in [*DOCKER.glob("Dockerfile.*"), *DOCKER.glob("requirements-*.txt")]:
        text = "\n".join(ln.split("#", 1)[0] for ln in f.read_text().splitlines())
        assert not re.search(r"\bvllm(-ascend)?\s*(==|\[|\s|$)", text), f"{f.name} installs vLLM itself"


def test_cuda_image_carries_aws_ofi_nccl() -> None:
    """EFA user space from a pinned AWS EFA installer, its NCCL plugin on the loader path, EFA env."""
    stage = final_stage("cuda")
    args = {k: v for ins, ctx in stage for k, v in ctx.args.items()}
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["EFA_INSTALLER_VERSION"])
    run = " ".join(" ".join(ins["value"] for ins, _ in stage if ins["instruction"] == "RUN").split())
    assert "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in run
    assert "./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify" in run
    assert "/etc/ld.so.conf.d/aws-efa.conf" in run and "/opt/amazon/ofi-nccl/lib" in run and "ldconfig" in run
    assert "find /opt/amazon/ofi-nccl -name 'libnccl-net-ofi.so' | grep -q ." in run  # build fails without it
    env = dict(stage[-1][1].envs)
    assert env["FI_PROVIDER"] == "efa" and env["NCCL_TUNER_PLUGIN"] == "ofi"
    assert env["NCCL_SOCKET_IFNAME"].startswith("^lo")


# ---------------------------------------------------------------------------------------------------
# Slow: pip's resolver on PyPI
# ---------------------------------------------------------------------------------------------------

#: aarch64 wheel tags for a glibc 2.35 (Ubuntu 22.04) host; pip does not expand --platform by itself.
AARCH64 = [f"manylinux_2_{x}_aarch64" for x in range(35, 16, -1)] + ["manylinux2014_aarch64", "linux_aarch64"]


def pypi_or_skip() -> None:
    import httpx

    try:
        httpx.get("https://pypi.org/simple/pip/", timeout=30).raise_for_status()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PyPI unreachable ({type(e).__name__}: {e}); the resolver check needs it")


def pip_env() -> dict[str, str]:
    """This machine's pip settings (local indexes, find-links, caps) left out: PyPI alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def pip_dry_run(args: list[str], report: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--report",
        str(report),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=pip_env(), timeout=1800)


def installed(report: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(report.read_text())
    return {constraints_py.canonical(i["metadata"]["name"]): i for i in data["install"]}


def image_constraints(name: str, tmp: Path) -> Path:
    path = tmp / f"constraints-{name}.txt"
    path.write_text(
        "\n".join(constraints_py.constraints(ROOT / "requirements.lock", DOCKER / f"requirements-{name}.txt"))
    )
    return path


def metadata_wheel(meta: dict[str, Any], dest: Path) -> Path:
    """A wheel with ``meta``'s name, version and dependencies and no code (stands in for a package pip
    cannot fetch for a foreign platform: an sdist, or one on an index this machine cannot reach)."""
    name = re.sub(r"[-_.]+", "_", meta["name"]).lower()
    dist = f"{name}-{meta['version']}.dist-info"
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}"]
    if meta.get("requires_python"):
        lines.append(f"Requires-Python: {meta['requires_python']}")
    lines += [f"Provides-Extra: {e}" for e in meta.get("provides_extra") or []]
    lines += [f"Requires-Dist: {r}" for r in meta.get("requires_dist") or []]
    files = {
        f"{dist}/METADATA": "\n".join(lines) + "\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: troupe-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = dest / f"{name}-{meta['version']}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        record = []
        for arc, text in files.items():
            z.writestr(arc, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={digest},{len(text)}")
        z.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,"]) + "\n")
    return path


def resolve_for_platform(
    reqs: list[str], constraints: Path, platforms: list[str], tmp: Path
) -> dict[str, dict[str, Any]]:
    """pip's resolver for another platform (wheels only). Packages published only as sdists -- found by
    resolving the same set on this host first -- are stood in for by metadata wheels built from their
    own sdist metadata (pip prepares it here), so their dependencies still take part in the resolution.
    Anything else missing on that platform fails the test."""
    stubs = tmp / "sdist-metadata"
    stubs.mkdir(exist_ok=True)
    host = tmp / "host-report.json"
    proc = pip_dry_run(["-c", str(constraints), *reqs], host)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for item in installed(host).values():
        if not item["download_info"]["url"].endswith(".whl"):
            metadata_wheel(item["metadata"], stubs)
    report = tmp / "platform-report.json"
    plat = [x for p in platforms for x in ("--platform", p)]
    args = ["--only-binary", ":all:", *plat, "--python-version", "3.11", "--target", str(tmp / "target"),
            "-c", str(constraints), "--find-links", str(stubs), *reqs]  # fmt: skip
    proc = pip_dry_run(args, report)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return installed(report)


def troupe_requirements(extra: str | None = None) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(project["optional-dependencies"][extra] if extra else [])]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cpu", "cuda", "ascend"])
def test_image_packages_resolve_on_pypi_x86_64(name: str, tmp_path: Path) -> None:
    """pip's resolver, PyPI only, this host (x86_64, Python 3.11): what the image's `pip install` asks.
    (The images take torch from the PyTorch CPU index where they say so: same version numbers.)"""
    pypi_or_skip()
    report = tmp_path / "report.json"
    cons = image_constraints(name, tmp_path)
    project = f"{ROOT}[gpu]" if name == "cuda" else str(ROOT)
    proc = pip_dry_run(["-c", str(cons), "-r", str(DOCKER / f"requirements-{name}.txt"), project], report)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = {n: i["metadata"]["version"] for n, i in installed(report).items()}
    own = constraints_py.read_requirements(DOCKER / f"requirements-{name}.txt")
    for pkg, version in got.items():
        expected = own.get(pkg) or LOCK.get(pkg)
        if expected:
            assert version == expected, f"{pkg}: {version}, constraints say {expected}"
    assert got["ray"] == LOCK["ray"]
    if name == "cuda":
        ray_meta = installed(report)["ray"]["metadata"]["requires_dist"]
        vllm_pin = next(r for r in ray_meta if r.startswith("vllm") and 'extra == "llm"' in r)
        assert re.match(rf"vllm(\[[^\]]*\])?=={re.escape(got['vllm'])};", vllm_pin), (vllm_pin, got["vllm"])
        assert got["torch"] == LOCK["torch"]
    if name == "ascend":
        assert got["torch"] == own["torch"] and got["torch-npu"] == own["torch-npu"]


@pytest.mark.slow
def test_ascend_packages_resolve_on_pypi_aarch64(tmp_path: Path) -> None:
    """The Ascend set for aarch64 (Kunpeng hosts), wheels as pip would pick them there."""
    pypi_or_skip()
    cons = image_constraints("ascend", tmp_path)
    own = [
        ln.split("#", 1)[0].strip() for ln in (DOCKER / "requirements-ascend.txt").read_text().splitlines()
    ]
    got = resolve_for_platform([*troupe_requirements(), *filter(None, own)], cons, AARCH64, tmp_path)
    versions = {n: i["metadata"]["version"] for n, i in got.items()}
    pins = constraints_py.read_requirements(DOCKER / "requirements-ascend.txt")
    assert versions["torch"] == pins["torch"] and versions["torch-npu"] == pins["torch-npu"]
    assert versions["ray"] == LOCK["ray"]
    assert got["torch-npu"]["download_info"]["url"].endswith("aarch64.whl")


@pytest.mark.slow
def test_no_vllm_ascend_release_fits_ray_serve(tmp_path: Path) -> None:
    """Why the Ascend image has no vLLM: the newest vllm-ascend release and Ray Serve at the lock's Ray
    want disjoint fastapi versions. When this fails, a vllm-ascend fits: add it to the Ascend image."""
    from packaging.requirements import Requirement

    pypi_or_skip()
    report = tmp_path / "report.json"
    proc = pip_dry_run(
        ["--no-deps", "--only-binary", ":all:", "vllm-ascend", f"ray[serve]=={LOCK['ray']}"], report
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = installed(report)

    def fastapi_spec(pkg: str, extra: str | None):
        for raw in got[pkg]["metadata"].get("requires_dist") or []:
            r = Requirement(raw)
            env = {
                "extra": extra or "",
                "python_version": "3.11",
                "sys_platform": "linux",
                "platform_machine": "aarch64",
            }
            if r.name == "fastapi" and (r.marker is None or r.marker.evaluate(env)):
                return r.specifier
        return None

    ours, theirs = fastapi_spec("ray", "serve"), fastapi_spec("vllm-ascend", None)
    assert ours is not None and theirs is not None
    candidates = [f"0.{minor}.{patch}" for minor in range(100, 200) for patch in range(10)]
    both = [v for v in candidates if v in ours and v in theirs]
    assert both == [], (
        f"vllm-ascend {got['vllm-ascend']['metadata']['version']} ({theirs}) fits ray[serve] ({ours})"
    )
