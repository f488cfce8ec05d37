"""Deploying a fleet (docs/fleet.md): Kubernetes manifests, the KEDA ScaledObject, the compose
profile, the fleet config and the IAM policy, checked without a cluster or docker.

Built-in kinds are validated against Kubernetes' own schemas (PyPI `kubernetes-validate`,
strict: unknown fields fail); KEDA's CRDs are not in those schemas, so their structure is
tested against what the Deployment and the config say.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from daemon.config import Config
from daemon.config.loader import load_config

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests claim; kubernetes-validate has it


def _docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBE.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs() if d["kind"] == kind]
    return doc


def _fleet_config(tmp_path: Path) -> Config:
    """The ConfigMap's scanwatch.yaml, its secret file put where the Deployment mounts it."""
    text = _kind("ConfigMap")["data"]["scanwatch.yaml"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "blazelock-api-key").write_text("key\n")
    path = tmp_path / "scanwatch.yaml"
    path.write_text(text.replace("/etc/scanwatch/secrets/", f"{secrets}/")
                    .replace("/var/lib/scanwatch", str(tmp_path / "state")))
    return load_config(path)


@pytest.mark.parametrize("doc", [d for d in _docs() if "keda.sh" not in d["apiVersion"]],
                         ids=lambda d: d["kind"])
def test_manifests_are_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {d["metadata"].get("namespace") for d in _docs() if d["kind"] != "Namespace"} == {"scanwatch"}


def test_the_deployment_is_hardened_and_mounts_what_the_config_uses(tmp_path: Path) -> None:
    spec = _kind("Deployment")["spec"]["template"]["spec"]
    pod, (container,) = spec["securityContext"], spec["containers"]
    assert pod["runAsNonRoot"] and pod["runAsUser"] == 10001 == pod["runAsGroup"]  # the image's user
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    hardened = container["securityContext"]
    assert hardened["readOnlyRootFilesystem"] and not hardened["allowPrivilegeEscalation"]
    assert hardened["capabilities"] == {"drop": ["ALL"]} and not hardened["privileged"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config = _fleet_config(tmp_path)
    assert container["args"][-1] in mounts and volumes[mounts[container["args"][-1]]["name"]]["configMap"]
    assert "emptyDir" in volumes[mounts["/var/lib/scanwatch"]["name"]]  # state_dir: each pod its own
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    secret = volumes[mounts["/etc/scanwatch/secrets"]["name"]]["secret"]
    assert secret["secretName"] == _kind("Secret")["metadata"]["name"] and secret["defaultMode"] == 0o440
    assert "blazelock-api-key" in _kind("Secret")["stringData"]
    assert not any("env" in c for c in spec["containers"])  # secrets as files only
    assert container["ports"][0]["containerPort"] == int(str(config.metrics.listen).rpartition(":")[2])  # type: ignore[union-attr]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["serviceAccountName"] == _kind("ServiceAccount")["metadata"]["name"]
    assert spec["terminationGracePeriodSeconds"] >= config.shutdown_timeout + 10


def test_the_namespace_enforces_the_restricted_pod_security_profile() -> None:
    labels = _kind("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_config_map_is_a_fleet_config(tmp_path: Path) -> None:
    (watch,) = _fleet_config(tmp_path).watches
    assert watch.fleet and watch.events is not None and watch.source.startswith("s3://")


def test_keda_scales_the_deployment_on_the_fleet_queue(tmp_path: Path) -> None:
    scaled = _kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == _kind("Deployment")["metadata"]["name"]
    assert spec["minReplicaCount"] >= 1  # someone holds the listing lease
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "aws-sqs-queue"
    (watch,) = _fleet_config(tmp_path).watches
    assert watch.events is not None and trigger["metadata"]["queueURL"] == watch.events.sqs_queue_url
    assert trigger["metadata"]["awsRegion"] == watch.events.sqs_queue_url.split(".")[1]
    assert int(trigger["metadata"]["queueLength"]) == 20  # the messages one daemon holds at most
    auth = _kind("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["podIdentity"]["provider"] == "aws"


def test_the_compose_fleet_profile_scales(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["scanwatch-fleet"]
    assert service["profiles"] == ["fleet"]
    assert "ports" not in service and "container_name" not in service  # both would stop --scale
    assert service["volumes"] == ["./config/fleet.yaml:/etc/scanwatch/scanwatch.yaml:ro"]
    monkeypatch.setenv("SCANWATCH_BUCKET", "uploads")
    monkeypatch.setenv("SCANWATCH_SQS_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/1/q")
    text = (ROOT / "config" / "fleet.yaml").read_text()
    (tmp_path / "fleet.yaml").write_text(text.replace("/var/lib/scanwatch", str(tmp_path / "state")))
    (watch,) = load_config(tmp_path / "fleet.yaml").watches
    assert watch.fleet and watch.source == "s3://uploads/incoming/"
    assert set(re.findall(r"\$\{(\w+)\}", text)) <= set(service["environment"])


def test_the_iam_policy_in_the_docs_grants_what_a_fleet_calls() -> None:
    doc = (ROOT / "docs" / "fleet.md").read_text().split("## IAM policy", 1)[1]
    policy = json.loads(doc.split("```json", 1)[1].split("```", 1)[0])
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert actions >= {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                       "s3:GetObjectTagging", "s3:PutObjectTagging", "sqs:ReceiveMessage",
                       "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:SendMessage"}


def test_the_schema_check_catches_a_misspelt_field() -> None:
    doc = _kind("Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFS"):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
