"""The deployment manifests in csi/deploy/, checked against a hand-written schema of the fields that
matter (unknown keys are errors, so a misspelt field fails) and against the plugin itself: its
command line, its default driver name, its socket, and the images in images/."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from csi.config import DEFAULT_DRIVER_NAME
from csi.main import build_parser
from csi.server import socket_path
from csi.volume import repository_from

# PyYAML is a test dependency of these checks (pip install pyyaml); skipped, loudly, without it
yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: pip install pyyaml")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "csi" / "deploy"

# ---------------------------------------------------------------------------------------------
# A small schema language: dict = closed object ("_required" lists mandatory keys), [s] = list
# of s, Enum = one of, Map = str->str, ANY = not inspected, types = isinstance.


class Enum:
    def __init__(self, *values: object) -> None:
        self.values = values


class Map:
    pass


ANY = object()
S: Any = str
META = {"name": str, "namespace": str, "labels": Map(), "annotations": Map(), "_required": ["name"]}
ENV = {
    "name": str,
    "value": str,
    "valueFrom": {"fieldRef": {"fieldPath": str, "_required": ["fieldPath"]}},
    "_required": ["name"],
}
MOUNT = {
    "name": str,
    "mountPath": str,
    "mountPropagation": Enum("None", "HostToContainer", "Bidirectional"),
    "readOnly": bool,
    "subPath": str,
    "_required": ["name", "mountPath"],
}
CONTAINER = {
    "name": str,
    "image": str,
    "command": [S],
    "args": [S],
    "env": [ENV],
    "ports": [{"name": str, "containerPort": int, "_required": ["containerPort"]}],
    "securityContext": {
        "privileged": bool,
        "allowPrivilegeEscalation": bool,
        "readOnlyRootFilesystem": bool,
    },
    "volumeMounts": [MOUNT],
    "resources": ANY,
    "_required": ["name", "image"],
}
HOSTPATH_TYPES = Enum(
    "", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice"
)
VOLUME = {
    "name": str,
    "hostPath": {"path": str, "type": HOSTPATH_TYPES, "_required": ["path"]},
    "emptyDir": {"sizeLimit": str, "medium": str},
    "configMap": {"name": str, "_required": ["name"]},
    "persistentVolumeClaim": {"claimName": str, "readOnly": bool, "_required": ["claimName"]},
    "csi": {"driver": str, "readOnly": bool, "volumeAttributes": Map(), "_required": ["driver"]},
    "_required": ["name"],
}
POD_SPEC = {
    "containers": [CONTAINER],
    "volumes": [VOLUME],
    "tolerations": [{"operator": Enum("Exists", "Equal"), "key": str, "effect": str}],
    "priorityClassName": str,
    "serviceAccountName": str,
    "automountServiceAccountToken": bool,
    "terminationGracePeriodSeconds": int,
    "hostPID": bool,
    "hostNetwork": bool,
    "_required": ["containers"],
}
SELECTOR = {"matchLabels": Map(), "_required": ["matchLabels"]}
TEMPLATE = {"metadata": META | {"_required": []}, "spec": POD_SPEC, "_required": ["spec"]}
RULE = {"apiGroups": [S], "resources": [S], "verbs": [S], "_required": ["verbs"]}
SUBJECT = {"kind": str, "name": str, "namespace": str, "_required": ["kind", "name"]}
ROLEREF = {"kind": str, "name": str, "apiGroup": str, "_required": ["kind", "name", "apiGroup"]}
CSI_PV = {
    "driver": str,
    "volumeHandle": str,
    "readOnly": bool,
    "volumeAttributes": Map(),
    "_required": ["driver", "volumeHandle"],
}
ACCESS_MODES = [Enum("ReadOnlyMany", "ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")]


def top(kind: str, api: str, **fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": Enum(api),
        "kind": Enum(kind),
        "metadata": META,
        **fields,
        "_required": ["apiVersion", "kind", "metadata"],
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "Namespace": top("Namespace", "v1"),
    "ServiceAccount": top("ServiceAccount", "v1"),
    "CSIDriver": top(
        "CSIDriver",
        "storage.k8s.io/v1",
        spec={
            "attachRequired": bool,
            "podInfoOnMount": bool,
            "fsGroupPolicy": Enum("None", "File", "ReadWriteOnceWithFSType"),
            "requiresRepublish": bool,
            "storageCapacity": bool,
            "seLinuxMount": bool,
            "volumeLifecycleModes": [Enum("Persistent", "Ephemeral")],
            "_required": ["attachRequired", "volumeLifecycleModes"],
        },
    ),
    "DaemonSet": top(
        "DaemonSet",
        "apps/v1",
        spec={
            "selector": SELECTOR,
            "updateStrategy": {"type": Enum("RollingUpdate", "OnDelete")},
            "template": TEMPLATE,
            "_required": ["selector", "template"],
        },
    ),
    "Deployment": top(
        "Deployment",
        "apps/v1",
        spec={
            "replicas": int,
            "selector": SELECTOR,
            "template": TEMPLATE,
            "_required": ["selector", "template"],
        },
    ),
    "StorageClass": top(
        "StorageClass",
        "storage.k8s.io/v1",
        provisioner=str,
        parameters=Map(),
        reclaimPolicy=Enum("Delete", "Retain"),
        volumeBindingMode=Enum("Immediate", "WaitForFirstConsumer"),
        allowVolumeExpansion=bool,
        mountOptions=[S],
    ),
    "PersistentVolume": top(
        "PersistentVolume",
        "v1",
        spec={
            "capacity": {"storage": str, "_required": ["storage"]},
            "accessModes": ACCESS_MODES,
            "persistentVolumeReclaimPolicy": Enum("Retain", "Delete"),
            "storageClassName": str,
            "claimRef": {"namespace": str, "name": str, "_required": ["namespace", "name"]},
            "csi": CSI_PV,
            "mountOptions": [S],
            "_required": ["capacity", "accessModes", "csi"],
        },
    ),
    "PersistentVolumeClaim": top(
        "PersistentVolumeClaim",
        "v1",
        spec={
            "accessModes": ACCESS_MODES,
            "storageClassName": str,
            "volumeName": str,
            "resources": {"requests": {"storage": str}, "_required": ["requests"]},
            "_required": ["accessModes", "resources"],
        },
    ),
    "Pod": top("Pod", "v1", spec=POD_SPEC),
    "ClusterRole": top("ClusterRole", "rbac.authorization.k8s.io/v1", rules=[RULE]),
    "Role": top("Role", "rbac.authorization.k8s.io/v1", rules=[RULE]),
    "ClusterRoleBinding": top(
        "ClusterRoleBinding", "rbac.authorization.k8s.io/v1", subjects=[SUBJECT], roleRef=ROLEREF
    ),
    "RoleBinding": top(
        "RoleBinding", "rbac.authorization.k8s.io/v1", subjects=[SUBJECT], roleRef=ROLEREF
    ),
    "ConfigMap": top("ConfigMap", "v1", data=Map()),
    "Service": top(
        "Service",
        "v1",
        spec={
            "selector": Map(),
            "ports": [{"name": str, "port": int, "targetPort": (int, str), "_required": ["port"]}],
            "_required": ["selector", "ports"],
        },
    ),
}


def check(value: Any, schema: Any, where: str = "") -> list[str]:
    """Problems of value against schema (empty when it conforms)."""
    if schema is ANY:
        return []
    if isinstance(schema, Enum):
        return [] if value in schema.values else [f"{where}: {value!r} not in {schema.values}"]
    if isinstance(schema, Map):
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return [f"{where}: expected a map of strings, got {value!r}"]
        return []
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, item in enumerate(value) for p in check(item, schema[0], f"{where}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object"]
        problems = [f"{where}: missing {k}" for k in schema.get("_required", []) if k not in value]
        for key, item in value.items():
            if key not in schema or key == "_required":
                problems.append(f"{where}: unknown field {key!r}")
            else:
                problems += check(item, schema[key], f"{where}.{key}")
        return problems
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:
        return [f"{where}: expected {types}, got a bool"]
    return [] if isinstance(value, types) else [f"{where}: expected {types}, got {value!r}"]


def load_all() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


DOCS = load_all()
ALL = [(name, i, doc) for name, docs in DOCS.items() for i, doc in enumerate(docs)]


def find(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for _, _, d in ALL
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(kind: str, name: str) -> dict[str, Any]:
    found = find(kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["template"]["spec"]["containers"] if c["name"] == name)


def volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}


def mounts_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


# ---------------------------------------------------------------------------------------------


def test_expected_files() -> None:
    assert set(DOCS) >= {
        "csidriver.yaml",
        "node-daemonset.yaml",
        "controller.yaml",
        "storageclass.yaml",
        "pv-pvc-example.yaml",
        "pod-example.yaml",
        "ephemeral-example.yaml",
        "squid.yaml",
        "cvmfsd-daemonset.yaml",
    }


@pytest.mark.parametrize(("name", "index", "doc"), ALL, ids=[f"{n}#{i}" for n, i, _ in ALL])
def test_schema(name: str, index: int, doc: dict[str, Any]) -> None:
    assert doc.get("kind") in SCHEMAS, f"{name}: unexpected kind {doc.get('kind')}"
    assert check(doc, SCHEMAS[doc["kind"]], f"{name}#{index}") == []


def test_schema_catches_wrong_fields() -> None:
    """The checker is strict enough to catch the mistakes that matter."""
    ds = copy.deepcopy(one("DaemonSet", "cvmfs-csi-node"))
    plugin_mounts = container(ds["spec"], "cvmfs-csi")["volumeMounts"]
    plugin_mounts[1]["mountPropogation"] = plugin_mounts[1].pop("mountPropagation")
    assert any("mountPropogation" in p for p in check(ds, SCHEMAS["DaemonSet"]))
    ds = copy.deepcopy(one("DaemonSet", "cvmfs-csi-node"))
    container(ds["spec"], "cvmfs-csi")["volumeMounts"][1]["mountPropagation"] = "Bidirectonal"
    assert check(ds, SCHEMAS["DaemonSet"])
    drv = copy.deepcopy(one("CSIDriver", DEFAULT_DRIVER_NAME))
    drv["spec"]["attachRequired"] = "false"
    assert check(drv, SCHEMAS["CSIDriver"])
    drv["apiVersion"] = "storage.k8s.io/v1beta1"
    assert check(drv, SCHEMAS["CSIDriver"])


def test_csidriver() -> None:
    spec = one("CSIDriver", DEFAULT_DRIVER_NAME)["spec"]
    assert spec["attachRequired"] is False
    assert sorted(spec["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]
    assert spec["podInfoOnMount"] is True  # the plugin recognises inline volumes by it


def test_node_daemonset() -> None:
    ds = one("DaemonSet", "cvmfs-csi-node")
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    assert not pod.get("hostPID") and not pod.get("hostNetwork")
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    vols = volumes(spec)
    registrar = container(spec, "node-driver-registrar")
    plugin = container(spec, "cvmfs-csi")
    # privileged only where needed
    assert plugin["securityContext"]["privileged"] is True
    assert not registrar.get("securityContext", {}).get("privileged", False)
    assert "csi-node-driver-registrar" in registrar["image"]
    # the plugin's arguments are accepted by the plugin's own parser
    args = build_parser().parse_args(plugin["args"])
    assert args.mode == "node"
    assert args.driver_name == DEFAULT_DRIVER_NAME
    sock = socket_path(args.endpoint)
    # the socket: same directory in both containers, registered at the host path kubelet sees
    reg = flags(registrar["args"])
    assert reg["csi-address"] == sock
    pm, rm = mounts_of(plugin), mounts_of(registrar)
    sock_dir = str(Path(sock).parent)
    shared = [n for n, m in pm.items() if m["mountPath"] == sock_dir]
    assert len(shared) == 1 and rm[shared[0]]["mountPath"] == sock_dir
    host_dir = vols[shared[0]]["hostPath"]["path"]
    assert host_dir == f"{args.kubelet_dir}/plugins/{DEFAULT_DRIVER_NAME}"
    assert reg["kubelet-registration-path"] == f"{host_dir}/{Path(sock).name}"
    registration = [n for n, m in rm.items() if m["mountPath"] == "/registration"]
    assert vols[registration[0]]["hostPath"]["path"] == f"{args.kubelet_dir}/plugins_registry"
    # propagation: kubelet dir Bidirectional at the same path as on the host, root HostToContainer
    kubelet = next(m for m in pm.values() if m["mountPath"] == args.kubelet_dir)
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert vols[kubelet["name"]]["hostPath"]["path"] == args.kubelet_dir
    root = next(m for m in pm.values() if m["mountPath"] == args.cvmfs_root)
    assert root["mountPropagation"] == "HostToContainer"
    assert vols[root["name"]]["hostPath"]["path"] == "/cvmfs"
    # the node id comes from the node name
    env = {e["name"]: e for e in plugin["env"]}
    assert "$(NODE_ID)" in plugin["args"][plugin["args"].index("--node-id=$(NODE_ID)")]
    assert env["NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_controller_deployment() -> None:
    spec = one("Deployment", "cvmfs-csi-controller")["spec"]
    plugin = container(spec, "cvmfs-csi")
    provisioner = container(spec, "csi-provisioner")
    args = build_parser().parse_args(plugin["args"])
    assert args.mode == "controller"
    assert flags(provisioner["args"])["csi-address"] == socket_path(args.endpoint)
    assert not plugin.get("securityContext", {}).get("privileged", False)
    sa = spec["template"]["spec"]["serviceAccountName"]
    assert find("ServiceAccount", sa)
    bound = [b for b in find("ClusterRoleBinding") if b["subjects"][0]["name"] == sa]
    role = one("ClusterRole", bound[0]["roleRef"]["name"])
    pv_rule = next(r for r in role["rules"] if "persistentvolumes" in r["resources"])
    assert {"create", "delete"} <= set(pv_rule["verbs"])


def test_storage_classes() -> None:
    classes = find("StorageClass")
    assert classes
    for sc in classes:
        assert sc["provisioner"] == DEFAULT_DRIVER_NAME
        repository_from(sc.get("parameters", {}), "parameters")  # the plugin accepts them
    assert any("repository" in sc.get("parameters", {}) for sc in classes)
    assert any(not sc.get("parameters") for sc in classes)


def test_static_pv_and_claim() -> None:
    pvs = find("PersistentVolume")
    handles = Counter(pv["spec"]["csi"]["volumeHandle"] for pv in pvs)
    assert all(n == 1 for n in handles.values())  # one handle per PV (kubelet keys on it)
    for pv in pvs:
        spec = pv["spec"]
        assert spec["csi"]["driver"] == DEFAULT_DRIVER_NAME
        assert spec["accessModes"] == ["ReadOnlyMany"] and spec["csi"]["readOnly"] is True
        ref = spec["claimRef"]
        claim = one("PersistentVolumeClaim", ref["name"])
        assert claim["metadata"]["namespace"] == ref["namespace"]
        assert claim["spec"]["volumeName"] == pv["metadata"]["name"]
        assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
        assert claim["spec"]["storageClassName"] == spec["storageClassName"] == ""


def _cvmfs_mounts(pod: dict[str, Any]) -> list[dict[str, Any]]:
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    out = []
    for c in pod["spec"]["containers"]:
        for m in c.get("volumeMounts", []):
            v = vols[m["name"]]
            if "csi" in v or "persistentVolumeClaim" in v:
                out.append(m)
    return out


def test_pod_examples_use_host_to_container() -> None:
    pods = find("Pod")
    assert len(pods) >= 2
    for pod in pods:
        ms = _cvmfs_mounts(pod)
        assert ms
        for m in ms:
            assert m["mountPropagation"] == "HostToContainer"
            assert m["readOnly"] is True


def test_ephemeral_inline_example() -> None:
    inline = [v for pod in find("Pod") for v in pod["spec"]["volumes"] if "csi" in v]
    assert inline
    for v in inline:
        assert v["csi"]["driver"] == DEFAULT_DRIVER_NAME
        assert v["csi"]["readOnly"] is True
        repository_from(v["csi"].get("volumeAttributes", {}), "volume_context")


def test_squid_and_client_config() -> None:
    svc = one("Service", "cvmfs-squid")
    dep = one("Deployment", "cvmfs-squid")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    port = svc["spec"]["ports"][0]
    squid = dep["spec"]["template"]["spec"]["containers"][0]
    named = {p.get("name"): p["containerPort"] for p in squid["ports"]}
    assert named[port["targetPort"]] == port["port"] == 3128
    assert "frontier-squid" in squid["image"]
    data = one("ConfigMap", "cvmfs-config")["data"]
    ns = svc["metadata"]["namespace"]
    proxy = re.search(r'CVMFS_HTTP_PROXY="([^"]+)"', data["default.local"])
    assert proxy and proxy.group(1) == f"http://cvmfs-squid.{ns}.svc.cluster.local:{port['port']}"
    assert any("CVMFS_EXTERNAL_URL=" in text for text in data.values())


def test_cvmfsd_daemonset_alternative() -> None:
    ds = one("DaemonSet", "cvmfsd")
    spec = ds["spec"]
    c = container(spec, "cvmfsd")
    assert c["securityContext"]["privileged"] is True
    root = next(m for m in c["volumeMounts"] if m["mountPath"] == "/cvmfs")
    assert root["mountPropagation"] == "Bidirectional"
    assert volumes(spec)[root["name"]]["hostPath"]["path"] == "/cvmfs"
    cm = next(v for v in volumes(spec).values() if "configMap" in v)
    assert find("ConfigMap", cm["configMap"]["name"])
    text = (DEPLOY / "cvmfsd-daemonset.yaml").read_text()
    assert "Trade-offs" in text and "ENOTCONN" in text


def test_images_come_from_images_dir() -> None:
    ours = set()
    for _, _, doc in ALL:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec") or (spec if doc["kind"] == "Pod" else None)
        for c in (pod or {}).get("containers", []):
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), image
            if image.startswith("cvmfsd/"):
                name = image.split("/", 1)[1].split(":", 1)[0]
                assert (REPO_ROOT / "images" / name / "Dockerfile").exists(), image
                ours.add(name)
    assert ours == {"csi-plugin", "cvmfsd"}


def test_namespaced_objects_use_an_existing_namespace() -> None:
    namespaces = {d["metadata"]["name"] for d in find("Namespace")}
    examples = {"pv-pvc-example.yaml", "pod-example.yaml", "ephemeral-example.yaml"}
    for name, _, doc in ALL:
        ns = doc["metadata"].get("namespace")
        if ns and name not in examples:
            assert ns in namespaces, f"{name}: namespace {ns} is not defined"
