"""Checks of the Kubernetes deployment in k8s/ (KubeRay) and the Dockerfile.

Schema validation uses the shared offline validator and KubeRay CRDs in ../shared (skipped when
they are absent). Overlays are rendered with `kustomize build` or `kubectl kustomize` when one of
them is installed (skipped otherwise). Everything else needs only pyyaml.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SHARED = REPO.parent / "shared"
CRDS = SHARED / "kuberay-crds"
VALIDATOR = SHARED / "tools" / "validate_k8s.py"

SECRET_NAME = "framescribe-s3"
RUN_CONFIGMAP = "framescribe-run"
TEMPLATE_CONFIGMAP = "framescribe-incremental-template"
IMAGE_NAME = "framescribe"  # the name the base uses; overlays rename it with `images:`
MAX_RAYJOB_NAME = 47  # KubeRay v1.7 MaxRayJobNameLength (RayCluster 53 - 6)
MAX_RAYCRONJOB_NAME = 36  # KubeRay v1.7 MaxRayCronJobNameLength
GFD_LABEL = "nvidia.com/gpu.present"
MODELS_PVC, MODELS_MOUNT = "framescribe-models", "/models"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# ---------------------------------------------------------------- helpers

def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_docs(path: Path) -> list[dict]:
    """Kubernetes objects in a file (kustomization files are not objects)."""
    if path.name == "kustomization.yaml":
        return []
    return [d for d in load_docs(path) if isinstance(d, dict) and "kind" in d]


def all_manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in yaml_files() for d in manifest_docs(p)]


def one(path: Path) -> dict:
    docs = manifest_docs(path)
    assert len(docs) == 1, f"{path}: expected one document, found {len(docs)}"
    return docs[0]


def walk(node, path=""):
    """Yield (path, mapping) for every mapping, descending into YAML embedded in strings."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}/{i}")
    elif isinstance(node, str) and "\n" in node:
        try:
            inner = list(yaml.safe_load_all(node))
        except yaml.YAMLError:
            return
        for i, d in enumerate(inner):
            if isinstance(d, (dict, list)):
                yield from walk(d, f"{path}<yaml:{i}>")


def cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """The Ray cluster specs of a RayCluster, RayJob or RayCronJob."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "RayCluster":
        return [("spec", spec)]
    if kind == "RayJob" and "rayClusterSpec" in spec:
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    if kind == "RayCronJob":
        return [("spec.jobTemplate.rayClusterSpec", spec["jobTemplate"]["rayClusterSpec"])]
    return []


def rayjob_specs(doc: dict) -> list[tuple[str, dict]]:
    if doc["kind"] == "RayJob":
        return [("spec", doc["spec"])]
    if doc["kind"] == "RayCronJob":
        return [("spec.jobTemplate", doc["spec"]["jobTemplate"])]
    return []


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    out = []
    for where, cs in cluster_specs(doc):
        out.append((f"{where}.headGroupSpec", cs["headGroupSpec"]["template"]["spec"]))
        for g in cs.get("workerGroupSpecs", []):
            out.append((f"{where}.workerGroupSpecs[{g['groupName']}]", g["template"]["spec"]))
    for where, rj in rayjob_specs(doc):
        if "submitterPodTemplate" in rj:
            out.append((f"{where}.submitterPodTemplate", rj["submitterPodTemplate"]["spec"]))
    if doc["kind"] == "CronJob":
        out.append(("jobTemplate", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def images_of(doc: dict) -> set[str]:
    return {c["image"] for _, ps in pod_specs(doc) for c in ps.get("containers", []) + ps.get("initContainers", [])}


def gpus(resources: dict) -> int:
    return int(str((resources or {}).get("limits", {}).get("nvidia.com/gpu", 0)))


def base_templates() -> dict[str, Path]:
    """Overlay name (or 'base') -> its incremental RayJob template file, from configMapGenerator."""
    out = {}
    for name, kdir in [("base", BASE)] + [(o, K8S / "overlays" / o) for o in OVERLAYS]:
        kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
        for gen in kust.get("configMapGenerator", []):
            if gen["name"] == TEMPLATE_CONFIGMAP:
                (entry,) = gen["files"]
                key, _, fname = entry.partition("=")
                assert key == "rayjob.yaml", f"{kdir}: template key must be rayjob.yaml (the CronJob reads /template/rayjob.yaml)"
                out[name] = kdir / fname
    return out


def run_validator(*paths: Path) -> subprocess.CompletedProcess:
    if not CRDS.is_dir() or not VALIDATOR.is_file():
        pytest.skip(f"shared KubeRay CRDs or validator not found ({CRDS}, {VALIDATOR})")
    return subprocess.run([sys.executable, str(VALIDATOR), *map(str, paths)], capture_output=True, text=True, timeout=300)


def assert_valid(*paths: Path) -> str:
    r = run_validator(*paths)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"validate_k8s.py {' '.join(map(str, paths))} failed:\n{out}"
    return out


def kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(kdir: Path) -> list[dict]:
    cmd = kustomize_cmd()
    assert cmd is not None
    r = subprocess.run([*cmd, str(kdir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} {kdir} failed:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d is not None]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"].get("name", "").startswith(name))]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


# ---------------------------------------------------------------- schema validation (shared validator)

def test_every_yaml_under_k8s_validates():
    out = assert_valid(K8S)
    n_docs = sum(len(manifest_docs(p)) for p in yaml_files())
    assert out.count("OK ") >= n_docs, out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay, tmp_path):
    kdir = K8S / "overlays" / overlay
    if kustomize_cmd() is None:
        # No renderer: validate the overlay's patch files that are complete documents on their own.
        kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
        files = [kdir / p["path"] for p in kust.get("patches", []) if "path" in p]
        complete = [f for f in files if all({"apiVersion", "kind", "metadata"} <= d.keys() for d in load_docs(f))]
        if complete:
            assert_valid(*complete)
        pytest.skip("neither kustomize nor kubectl is installed: only the overlay's complete patch documents were "
                    "validated; inline JSON patches were not rendered")
    docs = render(kdir)
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    # The incremental RayJob template inside the rendered ConfigMap is a RayJob too: validate it.
    tmpl = tmp_path / "incremental-template.yaml"
    tmpl.write_text(find(docs, "ConfigMap", TEMPLATE_CONFIGMAP)["data"]["rayjob.yaml"])
    assert_valid(out, tmpl)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_with_optional_resources_enabled(overlay, tmp_path):
    """raycluster.yaml and raycronjob.yaml are off by default; switched on, each overlay must still
    render, validate and give them the overlay's cluster spec."""
    if kustomize_cmd() is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kust = copy / "base" / "kustomization.yaml"
    text = kust.read_text()
    for f in ("raycluster.yaml", "raycronjob.yaml"):
        text, n = re.subn(rf"^# - {re.escape(f)}.*$", f"- {f}", text, flags=re.M)
        assert n == 1, f"base/kustomization.yaml should list `# - {f}` as an optional resource"
    kust.write_text(text)
    docs = render(copy / "overlays" / overlay)
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    assert_valid(out)
    rj = find(docs, "RayJob", "framescribe-label")
    assert find(docs, "RayCluster")["spec"] == rj["spec"]["rayClusterSpec"]
    assert find(docs, "RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"] == rj["spec"]["rayClusterSpec"]


# ---------------------------------------------------------------- credentials

AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA|A3T[A-Z0-9])[A-Z0-9]{16}\b")
INLINE_SECRET = re.compile(r"AWS_SECRET_ACCESS_KEY\s*[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{16,}")


def test_no_secret_values_under_k8s():
    files = [p for p in K8S.rglob("*") if p.is_file()] + [REPO / "Dockerfile"]
    for p in files:
        text = p.read_text(errors="replace")
        assert not AWS_KEY_ID.search(text), f"{p}: looks like an AWS access key id"
        assert not INLINE_SECRET.search(text), f"{p}: AWS_SECRET_ACCESS_KEY with a literal value"
    for p, doc in all_manifests():
        assert doc["kind"] != "Secret", f"{p}: Secrets are created with kubectl, never committed (see k8s/README.md)"
        for where, m in walk(doc):
            name = m.get("name")
            if isinstance(name, str) and name.startswith("AWS_") and "value" in m:
                raise AssertionError(f"{p}{where}: {name} has a literal value; use secretKeyRef or envFrom")
            env_vars = m.get("env_vars")
            if isinstance(env_vars, dict):
                bad = [k for k in env_vars if str(k).startswith("AWS_")]
                assert not bad, f"{p}{where}: runtime env sets {bad}; credentials come from the Secret"


def test_aws_env_comes_from_the_secret():
    ray_containers = 0
    for p, doc in all_manifests():
        for where, m in walk(doc):
            name = m.get("name")
            if isinstance(name, str) and name.startswith("AWS_") and ("valueFrom" in m or "value" in m):
                ref = m.get("valueFrom", {}).get("secretKeyRef")
                assert ref and ref.get("name"), f"{p}{where}: {name} must come from a secretKeyRef"
        for where, ps in pod_specs(doc):
            for c in ps["containers"]:
                if c["name"] not in ("ray-head", "ray-worker"):
                    continue
                ray_containers += 1
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
                refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
                assert SECRET_NAME in refs, f"{p} {where}: Ray container {c['name']} gets no credentials from Secret {SECRET_NAME}"
    assert ray_containers >= 2


# ---------------------------------------------------------------- Ray cluster shape

def base_ray_docs() -> list[tuple[str, dict]]:
    docs = [(p.name, one(p)) for p in (BASE / "raycluster.yaml", BASE / "rayjob.yaml", BASE / "raycronjob.yaml")]
    docs += [(f"{k}:{p.name}", one(p)) for k, p in base_templates().items() if k in ("base", "prod-gpu")]
    return docs


BASE_RAY_DOCS = base_ray_docs()


@pytest.mark.parametrize("name,doc", BASE_RAY_DOCS, ids=[n for n, _ in BASE_RAY_DOCS])
def test_gpu_cluster_shape(name, doc):
    (_, cs), = cluster_specs(doc)
    assert cs.get("enableInTreeAutoscaling") is True, f"{name}: autoscaling must be on (workers scale from 0)"
    assert "autoscalerOptions" in cs
    head = cs["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    assert head["rayStartParams"].get("num-gpus") == "0"
    mounts = {m["mountPath"]: m["name"] for m in head["template"]["spec"]["containers"][0].get("volumeMounts", [])}
    vols = {v["name"]: v for v in head["template"]["spec"].get("volumes", [])}
    assert vols[mounts["/config"]]["configMap"]["name"] == RUN_CONFIGMAP, f"{name}: head must mount {RUN_CONFIGMAP} at /config"
    groups = {g["groupName"]: g for g in cs["workerGroupSpecs"]}
    assert "gpu-workers" in groups, f"{name}: no worker group gpu-workers"
    g = groups["gpu-workers"]
    assert g["minReplicas"] == 0, f"{name}: GPU workers must scale to zero"
    assert g["maxReplicas"] >= 1
    assert g.get("replicas", 0) == 0
    ps = g["template"]["spec"]
    worker = ps["containers"][0]
    assert gpus(worker["resources"]) >= 1, f"{name}: gpu-workers must request nvidia.com/gpu in limits"
    # a label added after boot (GPU feature discovery) is invisible to a scale-from-zero autoscaler
    assert GFD_LABEL not in (ps.get("nodeSelector") or {}), f"{name}: nodeSelector on {GFD_LABEL}"
    assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in ps.get("tolerations", []))
    wmounts = {m["mountPath"]: m["name"] for m in worker.get("volumeMounts", [])}
    wvols = {v["name"]: v for v in ps.get("volumes", [])}
    assert wvols[wmounts["/dev/shm"]]["emptyDir"].get("medium") == "Memory", f"{name}: /dev/shm must be a memory emptyDir"


def test_base_cluster_specs_in_sync():
    """raycluster.yaml, rayjob.yaml, the incremental template and raycronjob.yaml share one cluster spec."""
    cluster = one(BASE / "raycluster.yaml")["spec"]
    rayjob = one(BASE / "rayjob.yaml")
    template = one(base_templates()["base"])
    cron = one(BASE / "raycronjob.yaml")
    assert rayjob["spec"]["rayClusterSpec"] == cluster
    assert template["spec"]["rayClusterSpec"] == cluster
    assert cron["spec"]["jobTemplate"] == template["spec"]


def test_rayjobs_shut_down_and_run_the_package():
    docs = [(p, d) for p, d in all_manifests() if d["kind"] in ("RayJob", "RayCronJob")]
    assert docs
    seen = set()
    for p, doc in docs:
        for where, rj in rayjob_specs(doc):
            ident = f"{p.relative_to(REPO)} {where}"
            assert rj.get("shutdownAfterJobFinishes") is True, f"{ident}: shutdownAfterJobFinishes must be true"
            assert rj.get("ttlSecondsAfterFinished", 0) > 0
            assert rj.get("activeDeadlineSeconds", 0) > 0
            assert rj.get("backoffLimit", 0) >= 0
            m = re.fullmatch(r"python -m (jobs\.(?:label|incremental)) --config /config/run\.yaml", rj["entrypoint"])
            assert m, f"{ident}: unexpected entrypoint {rj['entrypoint']!r}"
            seen.add(m.group(1))
            env = yaml.safe_load(rj.get("runtimeEnvYAML", "{}"))
            assert isinstance(env, dict), f"{ident}: runtimeEnvYAML must be a YAML mapping"
            assert "working_dir" not in env, f"{ident}: code comes from the image"
    assert one(BASE / "rayjob.yaml")["spec"]["entrypoint"].startswith("python -m jobs.label ")
    for k, t in base_templates().items():
        assert one(t)["spec"]["entrypoint"].startswith("python -m jobs.incremental "), t
    assert seen == {"jobs.label", "jobs.incremental"}


@pytest.mark.parametrize("module", ["jobs.label", "jobs.incremental"])
def test_entrypoint_modules_exist(module):
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO)} not written yet")
    assert "__main__" in path.read_text(), f"{path}: `python -m {module}` needs a __main__ block"


def test_names_fit_kuberay_limits():
    for p, doc in all_manifests():
        meta = doc["metadata"]
        if doc["kind"] == "RayJob":
            name = meta.get("name") or meta["generateName"] + "x" * 5
            assert len(name) <= MAX_RAYJOB_NAME and DNS1035.match(name), f"{p}: RayJob name {name!r}"
        if doc["kind"] == "RayCronJob":
            assert len(meta["name"]) <= MAX_RAYCRONJOB_NAME and DNS1035.match(meta["name"]), p
        if doc["kind"] == "RayCluster":
            assert len(meta["name"]) <= MAX_RAYJOB_NAME + 6 and DNS1035.match(meta["name"]), p


def test_ray_version_matches_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    assert m, "Dockerfile: ARG RAY_VERSION=... missing"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-(gpu|cu\d+|\$\{CUDA\})", text, re.M), \
        "Dockerfile: FROM rayproject/ray:${RAY_VERSION}-py3xx-<cuda>"
    assert re.search(r"pip install --no-cache-dir (--no-deps )?\.", text)
    for p, doc in all_manifests():
        for where, cs in cluster_specs(doc):
            assert cs.get("rayVersion") == m.group(1), f"{p} {where}: rayVersion {cs.get('rayVersion')} != Dockerfile {m.group(1)}"


def test_dockerignore():
    entries = {l.strip().rstrip("/") for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    assert {".git", ".venv"} <= entries


# ---------------------------------------------------------------- run configs

def run_configs() -> list[tuple[Path, str]]:
    return [(p, d["data"]["run.yaml"]) for p, d in all_manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == RUN_CONFIGMAP]


def test_run_configs_load_as_runconfig():
    configs = run_configs()
    assert len(configs) == 1 + len(OVERLAYS)
    try:
        from pipeline.config import RunConfig
    except ImportError as e:
        pytest.skip(f"pipeline.config not importable: {e}")
    for p, text in configs:
        cfg = RunConfig(**yaml.safe_load(text))
        assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://"), p


def gpu_budget_ok(cfg: dict, cluster_spec: dict) -> str | None:
    groups = cluster_spec["workerGroupSpecs"]
    cluster_gpus = sum(g["maxReplicas"] * gpus(g["template"]["spec"]["containers"][0].get("resources")) for g in groups)
    per_actor = cfg.get("num_gpus_per_actor")
    if cluster_gpus == 0:
        return None if per_actor == 0 else f"cluster has no GPUs but num_gpus_per_actor is {per_actor!r} (must be 0)"
    need = cfg.get("concurrency", 1) * (1 if per_actor is None else per_actor)
    return None if need <= cluster_gpus else f"{need} GPUs for model actors > {cluster_gpus} GPUs the workers can have"


def test_base_config_fits_base_cluster():
    cfg = yaml.safe_load(one(BASE / "configmap-run.yaml")["data"]["run.yaml"])
    problem = gpu_budget_ok(cfg, one(BASE / "rayjob.yaml")["spec"]["rayClusterSpec"])
    assert problem is None, problem


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_is_consistent(overlay):
    if kustomize_cmd() is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    docs = render(K8S / "overlays" / overlay)
    rj = find(docs, "RayJob", "framescribe-label")
    cfg = yaml.safe_load(find(docs, "ConfigMap", RUN_CONFIGMAP)["data"]["run.yaml"])
    problem = gpu_budget_ok(cfg, rj["spec"]["rayClusterSpec"])
    assert problem is None, f"{overlay}: {problem}"
    # The incremental template (inside a ConfigMap, out of reach of patches) must match the RayJob.
    tmpl = yaml.safe_load(find(docs, "ConfigMap", TEMPLATE_CONFIGMAP)["data"]["rayjob.yaml"])
    assert tmpl["spec"]["rayClusterSpec"] == rj["spec"]["rayClusterSpec"], (
        f"{overlay}: rayjob-incremental-template.yaml's rayClusterSpec differs from the rendered RayJob's")
    assert images_of(tmpl) == images_of(rj), f"{overlay}: template images {images_of(tmpl)} != RayJob images {images_of(rj)}"
    cron = find(docs, "CronJob")
    vols = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("configMap", {}).get("name") == find(docs, "ConfigMap", TEMPLATE_CONFIGMAP)["metadata"]["name"] for v in vols)
    if overlay != "dev-cpu":
        assert not any(i.startswith(IMAGE_NAME + ":") for i in images_of(rj)), f"{overlay}: still the placeholder image"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_template_image_matches_images_transformer(overlay):
    """Without rendering: the template copy must use the image the overlay's `images:` sets."""
    kust = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    (entry,) = [i for i in kust.get("images", []) if i["name"] == IMAGE_NAME]
    base_tag = next(iter(images_of(one(BASE / "rayjob.yaml")))).rpartition(":")[2]
    want = f"{entry.get('newName', IMAGE_NAME)}:{entry.get('newTag', base_tag)}"
    tmpl = one(base_templates()[overlay])
    assert images_of(tmpl) == {want}, f"{overlay}: template images {images_of(tmpl)}, overlay sets {want}"


# ---------------------------------------------------------------- scheduling and RBAC

def test_rbac_only_rayjobs():
    kinds = {}
    for p, doc in all_manifests():
        kinds.setdefault(doc["kind"], []).append(doc)
        assert doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"), f"{p}: no cluster-wide RBAC"
    (role,) = kinds["Role"]
    assert role["rules"], "empty Role"
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["ray.io"], rule
        assert rule["resources"] == ["rayjobs"], rule
        assert set(rule["verbs"]) <= {"create", "get", "list", "delete"}, rule
        assert "resourceNames" not in rule or rule["resourceNames"]
    (binding,) = kinds["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    (sa,) = kinds["ServiceAccount"]
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"]} in binding["subjects"]
    (cron,) = kinds["CronJob"]
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_kustomization_references_exist():
    for kdir in [BASE] + [K8S / "overlays" / o for o in OVERLAYS]:
        kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
        refs = list(kust.get("resources", [])) + [p["path"] for p in kust.get("patches", []) if "path" in p]
        refs += [f.partition("=")[2] or f for g in kust.get("configMapGenerator", []) for f in g.get("files", [])]
        for r in refs:
            assert (kdir / r).exists(), f"{kdir}/kustomization.yaml: {r} does not exist"
    resources = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert "cronjob-rayjob.yaml" in resources and "rayjob.yaml" in resources
    # Alpha RayCronJob (feature gate off by default) and the standing cluster are opt-in.
    assert "raycronjob.yaml" not in resources and "raycluster.yaml" not in resources


def test_raycronjob_marked_alpha():
    text = (BASE / "raycronjob.yaml").read_text()
    assert "alpha" in text.lower() and "RayCronJob" in text and "false" in text
    readme = (K8S / "README.md").read_text()
    assert "feature gate" in readme.lower() and "RayCronJob" in readme


def launcher() -> tuple[dict, str]:
    cron = one(BASE / "cronjob-rayjob.yaml")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["/bin/bash", "-c"]
    env = {e["name"]: e["value"] for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (tvol,) = [v for v in pod["volumes"] if "configMap" in v]
    assert tvol["configMap"]["name"] == TEMPLATE_CONFIGMAP
    assert env["TEMPLATE"] == mounts[tvol["name"]] + "/rayjob.yaml"
    return env, c["args"][0]


FAKE_KUBECTL = r'''#!PYTHON
"""Stand-in for kubectl: keeps RayJobs in a JSON state file and logs every call."""
import json, os, sys
state_path = os.environ["FAKE_STATE"]
st = json.load(open(state_path))
args = sys.argv[1:]
st["calls"].append(args)
def save():
    json.dump(st, open(state_path, "w"))
def job(name):
    return next(j for j in st["jobs"] if j["name"] == name)
out = ""
if args[:2] == ["get", "rayjobs"]:
    assert "-l" in args and "--sort-by=.metadata.creationTimestamp" in args
    out = "".join(f"{j['name']} {j['seq'][0]}\n" for j in st["jobs"])
elif args[:2] == ["create", "-f"]:
    import yaml
    t = yaml.safe_load(open(args[2]))
    assert t["kind"] == "RayJob" and "generateName" in t["metadata"]
    name = t["metadata"]["generateName"] + "x" * 5
    st["jobs"].append({"name": name, "seq": st.pop("new_seq"), "jobStatus": st.pop("new_job_status")})
    out = name
elif args[:2] == ["get", "rayjob"]:
    j, query = job(args[2]), args[args.index("-o") + 1]
    if "jobDeploymentStatus" in query:
        out = j["seq"][0]
        if len(j["seq"]) > 1:
            j["seq"].pop(0)
    elif "jobStatus" in query:
        out = j["jobStatus"]
    else:
        out = "AppFailed: boom"
elif args[:2] == ["delete", "rayjob"]:
    st["jobs"] = [j for j in st["jobs"] if j["name"] not in args[2:]]
    st["deleted"] += args[2:]
else:
    print("fake kubectl: unexpected", args, file=sys.stderr)
    sys.exit(2)
save()
sys.stdout.write(out)
'''


def run_launcher(tmp_path, jobs, new_seq=("",), new_job_status="SUCCEEDED", keep=2):
    if not shutil.which("bash"):
        pytest.skip("bash not installed")
    env, script = launcher()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "kubectl"
    fake.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable, 1))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"calls": [], "deleted": [], "new_seq": list(new_seq), "new_job_status": new_job_status,
                                 "jobs": [{"name": n, "seq": [s], "jobStatus": ""} for n, s in jobs]}))
    run_env = {**os.environ, **env, "TEMPLATE": str(base_templates()["base"]), "POLL_SECONDS": "0", "KEEP": str(keep),
               "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_STATE": str(state), "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "-c", script], env=run_env, capture_output=True, text=True, timeout=60)
    return r, json.loads(state.read_text())


def test_launcher_creates_waits_and_prunes(tmp_path):
    r, st = run_launcher(tmp_path, [("old-a", "Complete"), ("old-b", "Failed"), ("old-c", "Complete")],
                         new_seq=["", "Initializing", "Running", "Complete"])
    assert r.returncode == 0, r.stdout + r.stderr
    creates = [c for c in st["calls"] if c[0] == "create"]
    assert len(creates) == 1
    assert "created rayjob/framescribe-incremental-xxxxx" in r.stdout
    assert "finished: SUCCEEDED" in r.stdout
    # 4 finished incremental RayJobs, KEEP=2: the two oldest go.
    assert st["deleted"] == ["old-a", "old-b"]


def test_launcher_skips_while_a_run_is_active(tmp_path):
    r, st = run_launcher(tmp_path, [("old-a", "Complete"), ("old-b", "Running")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "old-b is still Running" in r.stdout
    assert not [c for c in st["calls"] if c[0] in ("create", "delete")]


@pytest.mark.parametrize("seq,job_status", [(["Initializing", "Failed"], ""), (["Running", "Complete"], "FAILED"),
                                            (["ValidationFailed"], "")])
def test_launcher_fails_when_the_rayjob_fails(tmp_path, seq, job_status):
    r, st = run_launcher(tmp_path, [], new_seq=seq, new_job_status=job_status)
    assert r.returncode == 1, r.stdout + r.stderr
    assert len([c for c in st["calls"] if c[0] == "create"]) == 1


def test_readme_documents_the_deployment():
    readme = (K8S / "README.md").read_text()
    for needle in ["helm install", "kubectl create secret generic framescribe-s3", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "kubectl apply -k k8s/overlays/prod-gpu", "kubectl get rayjob",
                   "nvidia.com/gpu", "docker build"]:
        assert needle in readme, f"k8s/README.md does not mention {needle!r}"


# ---------------------------------------------------------------- production pitfalls (k8s/README.md table)

def rendered_and_base() -> list[tuple[str, dict]]:
    """Every object of the base files and of each rendered overlay (incremental templates included)."""
    docs = [(str(p.relative_to(REPO)), d) for p, d in all_manifests()]
    if kustomize_cmd() is not None:
        for o in OVERLAYS:
            rendered = render(K8S / "overlays" / o)
            docs += [(f"{o}:{d['kind']}/{d['metadata'].get('name', '')}", d) for d in rendered]
            tmpl = find(rendered, "ConfigMap", TEMPLATE_CONFIGMAP)["data"]["rayjob.yaml"]
            docs.append((f"{o}:incremental-template", yaml.safe_load(tmpl)))
    return docs


DOCS = rendered_and_base()
RAY_DOCS = [(n, d) for n, d in DOCS if d["kind"] in ("RayCluster", "RayJob", "RayCronJob")]


def containers_of(ps: dict) -> list[dict]:
    return ps.get("initContainers", []) + ps.get("containers", [])


def test_rayjobs_use_http_mode_and_a_lease_owner():
    """HTTPMode: no submitter pod whose ended log stream fails a running job; retries share a lease owner."""
    seen = 0
    for name, doc in RAY_DOCS:
        for where, rj in rayjob_specs(doc):
            seen += 1
            assert rj.get("submissionMode") == "HTTPMode", f"{name} {where}: submissionMode must be HTTPMode"
            assert "submitterPodTemplate" not in rj, f"{name} {where}: HTTPMode has no submitter pod"
            env = yaml.safe_load(rj["runtimeEnvYAML"])["env_vars"]
            assert env.get("FRAMESCRIBE_LEASE_OWNER", "").startswith("rayjob/"), f"{name} {where}: no lease owner"
    assert seen >= 4 + 2 * len(OVERLAYS) * (kustomize_cmd() is not None)


def test_ray_clusters_have_token_auth_and_protected_heads():
    for name, doc in RAY_DOCS:
        for where, cs in cluster_specs(doc):
            assert cs.get("authOptions", {}).get("mode") == "token", f"{name} {where}: Ray token auth off"
            ann = cs["headGroupSpec"]["template"]["metadata"].get("annotations", {})
            assert ann.get("cluster-autoscaler.kubernetes.io/safe-to-evict") == "false", f"{name} {where}: head evictable"
            assert ann.get("karpenter.sh/do-not-disrupt") == "true", f"{name} {where}: head disruptable"
            for g in [cs["headGroupSpec"], *cs["workerGroupSpecs"]]:
                a = g["template"]["metadata"].get("annotations", {})
                assert a.get("prometheus.io/scrape") == "true" and a.get("prometheus.io/port") == "8080", \
                    f"{name} {where}: Ray metrics not scraped"


def test_every_pod_passes_restricted_pod_security():
    pods = 0
    for name, doc in DOCS:
        for where, ps in pod_specs(doc):
            pods += 1
            sc = ps.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, f"{name} {where}: runAsNonRoot"
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name} {where}: seccompProfile"
            assert not any("hostPath" in v for v in ps.get("volumes", [])), f"{name} {where}: hostPath"
            for c in containers_of(ps):
                csc = c.get("securityContext", {})
                assert csc.get("allowPrivilegeEscalation") is False, f"{name} {where} {c['name']}: allowPrivilegeEscalation"
                assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{name} {where} {c['name']}: drop ALL"
                assert not csc.get("privileged") and csc.get("runAsUser", 1) != 0
    assert pods >= 8


def test_no_moving_image_tags():
    for name, doc in DOCS:
        for image in images_of(doc):
            ref = image.split("@")[0]
            tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else None
            assert "@sha256:" in image or (tag and tag != "latest"), f"{name}: image {image} has no fixed tag"


def test_ephemeral_storage_requested_where_pods_write_to_node_disk():
    for name, doc in DOCS:
        for where, ps in pod_specs(doc):
            for c in containers_of(ps):
                req = c.get("resources", {}).get("requests", {})
                assert "ephemeral-storage" in req, f"{name} {where} {c['name']}: no ephemeral-storage request"


def test_model_cache_volume_filled_once_and_shared():
    for name, doc in RAY_DOCS:
        for where, cs in cluster_specs(doc):
            groups = [("head", cs["headGroupSpec"])] + [(g["groupName"], g) for g in cs["workerGroupSpecs"]]
            for gname, g in groups:
                ps = g["template"]["spec"]
                vols = {v["name"]: v for v in ps["volumes"]}
                for c in containers_of(ps):
                    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                    if c["name"] == "ray-head" or c["name"] == "ray-worker" or c["name"] == "fetch-model":
                        assert vols[mounts[MODELS_MOUNT]].get("persistentVolumeClaim", {}).get("claimName") == MODELS_PVC, \
                            f"{name} {where} {gname}/{c['name']}: model cache volume not mounted at {MODELS_MOUNT}"
                        env = {e["name"]: e.get("value") for e in c.get("env", [])}
                        assert env.get("HF_HOME", "").startswith(MODELS_MOUNT + "/")
                        assert env.get("FRAMESCRIBE_CACHE", "").startswith(MODELS_MOUNT + "/")
                        if c["name"] != "fetch-model":
                            assert env.get("HF_HUB_OFFLINE") == "1", f"{name} {where} {c['name']}: would download"
            init = cs["headGroupSpec"]["template"]["spec"].get("initContainers", [])
            assert [c["command"][:3] for c in init] == [["python", "-m", "jobs.fetch_model"]], f"{name} {where}"
    pvcs = [d for n, d in DOCS if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == MODELS_PVC]
    assert pvcs and "ReadWriteMany" in one(BASE / "pvc-models.yaml")["spec"]["accessModes"]
    for path, run_yaml in run_configs():  # the revision is pinned in the shipped configs
        assert "model_revision" in yaml.safe_load(run_yaml), path


def test_worker_sizing_leaves_no_gpu_stranded():
    """prod-gpu: one worker pod per 8-GPU node, fitting the smaller common 8-GPU shapes."""
    doc = one(base_templates()["prod-gpu"])
    (g,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    res = g["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert str(res["nvidia.com/gpu"]) == "8"
    assert float(res["cpu"]) <= 90 and int(str(res["memory"]).removesuffix("Gi")) <= 600   # p4d / a2-highgpu-8g


def test_dockerfile_installs_dependencies_before_the_source():
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [i for i, ln in enumerate(lines) if ln.startswith("COPY")]
    first_src = next(i for i in copies if "pyproject.toml" not in lines[i])
    deps = [i for i, ln in enumerate(lines) if ln.startswith("RUN") and "pip install" in ln and i < first_src]
    assert deps and any("pyproject.toml" in lines[i] for i in copies if i < deps[0]), \
        "Dockerfile: COPY pyproject.toml, install the dependencies, then COPY the source"
    text = "\n".join(lines)
    cuda = re.search(r"ARG CUDA=(cu\d+)", text)
    assert cuda and re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-\$\{CUDA\}", text, re.M)
    assert re.search(r"torch==\$\{TORCH_VERSION\}", text) and "download.pytorch.org/whl/${CUDA}" in text, \
        "Dockerfile: torch pinned to the base image's CUDA"


def test_readme_table_covers_every_production_pitfall():
    readme = (K8S / "README.md").read_text()
    table = readme[readme.index("## Production pitfalls"):readme.index("## 1. Prerequisites")]
    for needle in ["lease", "exits **4**", "--wait-lease", "FRAMESCRIBE_LEASE_OWNER", "framescribe-models", "HF_HOME",
                   "FRAMESCRIBE_CACHE", "model_revision", "HTTPMode", "safe-to-evict", "do-not-disrupt",
                   "GCS fault tolerance", "nvidia.com/gpu.present", "Sizing", "authOptions", "runAsNonRoot",
                   "IRSA", "alpine/k8s", "Role", "RayCronJob", "Watching a run", "prometheus.io/scrape", "PodMonitor",
                   "ttlSecondsAfterFinished", "ephemeral-storage", "Dockerfile", "CUDA", "submitter image"]:
        assert needle in table, f"k8s/README.md pitfalls table does not cover {needle!r}"
