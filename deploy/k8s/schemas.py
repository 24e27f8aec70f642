"""JSON Schemas of the kinds deploy/k8s uses: the fields each kind requires, and the shapes of those
spectutor relies on. Not the full OpenAPI schemas (those need a cluster or the CRD files): written
by hand from the Kubernetes API reference, KubeRay's ray.io/v1 RayService CRD and Strimzi's
kafka.strimzi.io/v1 CRDs. tests/unit/test_deploy_k8s.py validates every manifest against them;
a manifest of a kind with no schema here fails that test.

    SCHEMAS[(apiVersion, kind)] -> JSON Schema (draft 2020-12)
"""
from __future__ import annotations

from typing import Any


def _obj(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}  # DNS subdomain
_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}  # DNS label
_PORT_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 15}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = _obj(["name"], {"name": _NAME, "namespace": _LABEL, "labels": _STRINGS, "annotations": _STRINGS})
_PORT_REF = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, _PORT_NAME]}
_QUANTITY = {"oneOf": [{"type": "string", "pattern": r"^[0-9.]+(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"},
                       {"type": "integer", "minimum": 0}]}
_RESOURCES = {"type": "object", "properties": {"requests": {"type": "object", "additionalProperties": _QUANTITY},
                                               "limits": {"type": "object", "additionalProperties": _QUANTITY}}}
_PROBE = {
    "type": "object",
    "properties": {
        "httpGet": _obj(["port"], {"path": {"type": "string", "pattern": "^/"}, "port": _PORT_REF}),
        "tcpSocket": _obj(["port"], {"port": _PORT_REF}),
        "exec": _obj(["command"], {"command": {"type": "array", "minItems": 1, "items": {"type": "string"}}}),
        **{k: {"type": "integer", "minimum": 0} for k in ("initialDelaySeconds", "periodSeconds", "timeoutSeconds",
                                                          "failureThreshold")},
    },
    "oneOf": [{"required": ["httpGet"]}, {"required": ["tcpSocket"]}, {"required": ["exec"]}],
}
_ENV_VAR = _obj(["name"], {
    "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
    "value": {"type": "string"},
    "valueFrom": {"type": "object", "minProperties": 1, "properties": {
        "secretKeyRef": _obj(["name", "key"], {}), "configMapKeyRef": _obj(["name", "key"], {})}},
})
_CONTAINER = _obj(["name", "image"], {
    "name": _LABEL,
    "image": {"type": "string", "minLength": 1},
    "command": {"type": "array", "items": {"type": "string"}},
    "args": {"type": "array", "items": {"type": "string"}},
    "env": {"type": "array", "items": _ENV_VAR},
    "envFrom": {"type": "array", "items": {"type": "object", "minProperties": 1, "properties": {
        "configMapRef": _obj(["name"], {}), "secretRef": _obj(["name"], {})}}},
    "ports": {"type": "array", "items": _obj(["containerPort"], {
        "name": _PORT_NAME, "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535}})},
    "resources": _RESOURCES,
    "readinessProbe": _PROBE, "livenessProbe": _PROBE, "startupProbe": _PROBE,
    "volumeMounts": {"type": "array", "items": _obj(["name", "mountPath"], {})},
})
_POD_SPEC = _obj(["containers"], {
    "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
    "initContainers": {"type": "array", "items": _CONTAINER},
    "volumes": {"type": "array", "items": _obj(["name"], {"name": _LABEL})},
    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
})
_POD_TEMPLATE = _obj(["spec"], {"metadata": {"type": "object"}, "spec": _POD_SPEC})
_LABELLED_TEMPLATE = _obj(["metadata", "spec"], {"metadata": _obj(["labels"], {"labels": _STRINGS}), "spec": _POD_SPEC})
_SELECTOR = _obj(["matchLabels"], {"matchLabels": {**_STRINGS, "minProperties": 1}})
_PVC_SPEC = _obj(["accessModes", "resources"], {
    "accessModes": {"type": "array", "minItems": 1,
                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
    "resources": _obj(["requests"], {"requests": _obj(["storage"], {"storage": _QUANTITY})}),
})
_STRIMZI_METADATA = _obj(["name", "labels"], {**_METADATA["properties"], "labels": _obj(["strimzi.io/cluster"], {})})
_KAFKA_CONFIG = {"type": "object", "additionalProperties": {"type": ["string", "integer", "boolean", "number"]}}
_RAY_START_PARAMS = _STRINGS  # KubeRay passes them to `ray start` as strings


def _kind(api: str, kind: str, spec: dict[str, Any] | None = None, required: tuple[str, ...] = ("spec",),
          **more: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {"apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": _METADATA}
    if spec is not None:
        props["spec"] = spec
    props.update(more)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"{api} {kind}",
            "type": "object", "required": ["apiVersion", "kind", "metadata", *required], "properties": props}


SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("v1", "ConfigMap"): _kind("v1", "ConfigMap", required=("data",), data=_STRINGS),
    ("v1", "Secret"): _kind("v1", "Secret", required=(), data=_STRINGS, stringData=_STRINGS, type={"type": "string"}),
    ("v1", "Service"): _kind("v1", "Service", _obj(["ports"], {
        "selector": {**_STRINGS, "minProperties": 1},
        "ports": {"type": "array", "minItems": 1, "items": _obj(["port"], {
            "name": _PORT_NAME, "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "targetPort": _PORT_REF})},
    })),
    ("v1", "PersistentVolumeClaim"): _kind("v1", "PersistentVolumeClaim", _PVC_SPEC),
    ("apps/v1", "Deployment"): _kind("apps/v1", "Deployment", _obj(["selector", "template"], {
        "replicas": {"type": "integer", "minimum": 0}, "selector": _SELECTOR, "template": _LABELLED_TEMPLATE,
        "strategy": {"type": "object", "properties": {"type": {"enum": ["Recreate", "RollingUpdate"]}}},
    })),
    ("apps/v1", "StatefulSet"): _kind("apps/v1", "StatefulSet", _obj(["selector", "template", "serviceName"], {
        "replicas": {"type": "integer", "minimum": 0}, "selector": _SELECTOR, "template": _LABELLED_TEMPLATE,
        "serviceName": _NAME,
        "volumeClaimTemplates": {"type": "array", "items": _obj(["metadata", "spec"], {
            "metadata": _obj(["name"], {"name": _LABEL}), "spec": _PVC_SPEC})},
    })),
    ("ray.io/v1", "RayService"): _kind("ray.io/v1", "RayService", _obj(["serveConfigV2", "rayClusterConfig"], {
        "serveConfigV2": {"type": "string", "minLength": 1},
        "upgradeStrategy": _obj(["type"], {"type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]}}),
        "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
        "rayClusterConfig": _obj(["headGroupSpec"], {
            "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
            "enableInTreeAutoscaling": {"type": "boolean"},
            "gcsFaultToleranceOptions": _obj(["redisAddress"], {"redisAddress": {"type": "string", "minLength": 1}}),
            "headGroupSpec": _obj(["template"], {"rayStartParams": _RAY_START_PARAMS, "template": _POD_TEMPLATE}),
            "workerGroupSpecs": {"type": "array", "items": _obj(["groupName", "template"], {
                "groupName": _LABEL,
                **{k: {"type": "integer", "minimum": 0} for k in ("replicas", "minReplicas", "maxReplicas")},
                "rayStartParams": _RAY_START_PARAMS, "template": _POD_TEMPLATE})},
        }),
    })),
    ("kafka.strimzi.io/v1", "Kafka"): _kind("kafka.strimzi.io/v1", "Kafka", _obj(["kafka"], {
        "kafka": _obj(["listeners"], {
            "version": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
            "metadataVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+-IV[0-9]+$"},
            "listeners": {"type": "array", "minItems": 1, "items": _obj(["name", "port", "type", "tls"], {
                "name": {"type": "string", "pattern": r"^[a-z0-9]{1,11}$"},
                "port": {"type": "integer", "minimum": 9092},
                "type": {"enum": ["internal", "route", "loadbalancer", "nodeport", "ingress", "cluster-ip"]},
                "tls": {"type": "boolean"}})},
            "config": _KAFKA_CONFIG,
        }),
        "entityOperator": {"type": "object", "properties": {"topicOperator": {"type": "object"},
                                                            "userOperator": {"type": "object"}}},
    })),
    ("kafka.strimzi.io/v1", "KafkaNodePool"): _kind("kafka.strimzi.io/v1", "KafkaNodePool", _obj(
        ["replicas", "roles", "storage"], {
            "replicas": {"type": "integer", "minimum": 0},
            "roles": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": ["controller", "broker"]}},
            "storage": _obj(["type"], {
                "type": {"enum": ["jbod", "persistent-claim", "ephemeral"]},
                "volumes": {"type": "array", "items": _obj(["id", "type"], {
                    "id": {"type": "integer", "minimum": 0}, "type": {"enum": ["persistent-claim", "ephemeral"]},
                    "size": _QUANTITY, "kraftMetadata": {"enum": ["shared"]}})}}),
            "resources": _RESOURCES,
        }), metadata=_STRIMZI_METADATA),
    ("kafka.strimzi.io/v1", "KafkaTopic"): _kind("kafka.strimzi.io/v1", "KafkaTopic", _obj(["partitions", "replicas"], {
        "topicName": {"type": "string", "pattern": r"^[a-zA-Z0-9._-]{1,249}$"},
        "partitions": {"type": "integer", "minimum": 1},
        "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
        "config": _KAFKA_CONFIG,
    }), metadata=_STRIMZI_METADATA),
}
