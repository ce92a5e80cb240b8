"""deploy/kubernetes/ against the schemas Kubernetes and KubeRay publish, and against the repository.

- Core kinds (Namespace, ConfigMap, Deployment, Service) by ``kubernetes-validate``: Kubernetes' own JSON schemas
  for one release, strict (an unknown field, e.g. a typo, is an error).
- RayCluster and RayJob by ``jsonschema`` with the ``openAPIV3Schema`` of KubeRay's v1 CRDs (vendored:
  tests/fixtures/kuberay, see tests/fixtures/SOURCE.md), made strict the same way: a CRD schema leaves out
  ``additionalProperties`` (the API server prunes unknown fields silently), so a walk over each manifest fails on a
  field its schema does not declare.
- The names the manifests use exist: the kustomization's files, the Secret's keys (secrets.env.example) and the
  ConfigMap's settings are documented in the README, the images are the ones the README builds, the probes are the
  API's routes, the port is the one the settings say, and the RayJob's command line parses with the real CLI.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex

import jsonschema
import pytest
import yaml
from tests.fixture_paths import FIXTURES, REPO

KUBE = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # a release KubeRay 1.7 supports; its schemas ship with kubernetes-validate
CRD_SCHEMAS = {"RayCluster": "ray.io_rayclusters.v1.schema.json.gz", "RayJob": "ray.io_rayjobs.v1.schema.json.gz"}
IMAGES = {"llmpress", "llmpress-cuda"}

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate "
                                          "(deploy/setup.sh --test installs it)")


def manifests() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(KUBE.glob("*.yaml"))}


def resources() -> list[tuple[str, dict]]:
    return [(name, doc) for name, docs in manifests().items() for doc in docs if doc.get("kind") != "Kustomization"]


def crd_schema(kind: str) -> dict:
    return json.loads(gzip.decompress((FIXTURES / "kuberay" / CRD_SCHEMAS[kind]).read_bytes()))["openAPIV3Schema"]


def undeclared(value, schema: dict, path: str = "") -> list[str]:
    """The fields of ``value`` that ``schema`` (an OpenAPI v3 schema of a CRD) does not declare."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key in schema["properties"]:
                found += undeclared(item, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += undeclared(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += undeclared(item, schema["items"], f"{path}[{i}]")
    return found


def test_every_file_the_kustomization_names_exists_and_every_manifest_is_in_it_or_an_example():
    kustomization = manifests()["kustomization.yaml"][0]
    listed = set(kustomization["resources"])
    for name in listed:
        assert (KUBE / name).is_file(), f"the kustomization lists {name}, which deploy/kubernetes lacks"
    assert set(manifests()) - {"kustomization.yaml"} - listed == {"rayjob-example.yaml"}
    secret = kustomization["secretGenerator"][0]
    assert secret["name"] == "llmpress-secrets" and secret["envs"] == ["secrets.env"]
    assert (KUBE / "secrets.env.example").is_file()
    assert "deploy/kubernetes/secrets.env" in (REPO / ".gitignore").read_text().splitlines()  # never committed


@pytest.mark.parametrize("name,doc", [r for r in resources() if r[1]["kind"] not in CRD_SCHEMAS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_core_resources_match_kubernetes_schemas_strictly(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name,doc", [r for r in resources() if r[1]["kind"] in CRD_SCHEMAS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kuberay_resources_match_the_crd_schemas_strictly(name, doc):
    schema = crd_schema(doc["kind"])
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, schema)
    assert undeclared(doc, schema) == []


def test_the_strict_walk_finds_a_misspelt_field():
    """The check above can fail: a typo KubeRay's schema does not declare is found, and a valid field is not."""
    doc = manifests()["raycluster.yaml"][0]
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert undeclared(doc, crd_schema("RayCluster")) == [".spec.workerGroupSpecs[0].maxReplica"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "spec": {**doc["spec"], "headGroupSpec": {"rayStartParams": {"num-cpus": 0}}}},
                            crd_schema("RayCluster"))


def containers(doc: dict) -> list[dict]:
    """Every container of a Deployment, RayCluster or RayJob."""
    spec = doc["spec"]
    if doc["kind"] == "Deployment":
        return spec["template"]["spec"]["containers"]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def readme_settings() -> set[str]:
    """The environment variables the README's settings table documents (AWS_* stands for boto3's)."""
    readme = (REPO / "README.md").read_text()
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)`", readme, flags=re.M)) | \
        set(re.findall(r"`([A-Z][A-Z0-9_]+)`", readme))


def test_images_settings_secrets_ports_and_probes_are_the_ones_the_project_has():
    from service.jobs.settings import Settings

    docs = [doc for _, doc in resources()]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    secret_keys = {line.split("=", 1)[0] for line in (KUBE / "secrets.env.example").read_text().splitlines()
                   if line and not line.startswith("#")}
    documented = readme_settings()
    for key in [*config["data"], *secret_keys]:
        assert key in documented or key.startswith("AWS_"), f"{key} is not a setting the README documents"
    settings = Settings(**{k.removeprefix("LLMPRESS_").lower(): v for k, v in config["data"].items()
                           if k.startswith("LLMPRESS_")})  # every LLMPRESS_ value is one the settings accept
    readme = (REPO / "README.md").read_text()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "RayCluster", "RayJob"):
            continue
        for container in containers(doc):
            assert container["image"] in IMAGES and f"`{container['image']}`" in readme, container["image"]
            refs = {next(iter(ref.values()))["name"] for ref in container.get("envFrom", [])}
            assert refs == {"llmpress-settings", "llmpress-secrets"}, (doc["kind"], refs)
    api = next(d for d in docs if d["kind"] == "Deployment")
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == settings.port == 8000
    routes = {route.path for route in create_app_routes()}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    # The API pod joins the cluster KubeRay names after the RayCluster: <name>-head-svc.
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert f"--address={cluster['metadata']['name']}-head-svc:6379" in container["args"][0]


def create_app_routes():
    from api.app import create_app
    from service.jobs.job_store import JobStore
    from service.jobs.settings import Settings

    store = JobStore("sqlite://")
    try:
        return create_app(Settings(), store, dispatcher=None).routes
    finally:
        store.close()


def test_the_rayjob_runs_a_command_line_the_cli_accepts_with_files_the_image_has():
    from api.cli import build_parser

    job = manifests()["rayjob-example.yaml"][0]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "llmpress"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "compress"
    recipe = args.recipe.removeprefix("/opt/llmpress/")
    assert (REPO / recipe).is_file(), f"the RayJob's recipe {args.recipe} is not in the repository"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "WORKDIR /opt/llmpress" in dockerfile and re.search(r"^COPY service ", dockerfile, flags=re.M)
