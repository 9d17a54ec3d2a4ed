#!/usr/bin/env bash
# KVC installed from deploy/ into a kind cluster, as an admin installs it, then smoke-checked:
# the image and the manifests tested together, in real pods.
#
# Needs a running Docker daemon, kind and kubectl (and the repository's virtualenv for
# `kvc certs install`). It cannot run where Docker cannot, such as the machines the local
# control plane of e2e/cluster.py exists for.
#
# The pytest e2e suite does not use this cluster: it always starts its own control plane and
# runs KVC as local processes. Pointing it at an existing cluster (say a KVC_E2E_KUBECONFIG
# variable) would need e2e/conftest.py to skip starting a control plane and to use the
# deployed pods instead of its own processes; this script's checks are the kind test.
#
# Usage, from the repository root: make kind-e2e   (builds the image, then runs this)
# Environment:
#   IMG           image to install, already built (default kvc:dev)
#   KIND_CLUSTER  cluster name; created if missing (default kvc-e2e)
#   KVC           the kvc command (default .venv/bin/kvc)
#   KEEP_CLUSTER  1 keeps the cluster afterwards; it is always kept when a check fails
set -euo pipefail

IMG=${IMG:-kvc:dev}
KIND_CLUSTER=${KIND_CLUSTER:-kvc-e2e}
KVC=${KVC:-.venv/bin/kvc}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
SMOKE_NAMESPACE=kvc-smoke

say() { printf '==> %s\n' "$*"; }
fail() { printf 'kind.sh: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl python3; do
  command -v "$tool" >/dev/null || fail "$tool is required and not on PATH"
done
[[ -x $KVC ]] || fail "$KVC not found: run \`make venv\` or set KVC"
docker info >/dev/null 2>&1 || fail "no Docker daemon: kind needs one"
[[ -f deploy/default/kustomization.yaml ]] || fail "run from the repository root"

work=$(mktemp -d)
export KUBECONFIG="$work/kubeconfig"
created=0
finish() {
  local status=$?
  if [[ $status -eq 0 && $created -eq 1 && $KEEP_CLUSTER != 1 ]]; then
    say "deleting kind cluster $KIND_CLUSTER"
    kind delete cluster --name "$KIND_CLUSTER" >/dev/null
  elif [[ $status -ne 0 ]]; then
    printf 'kind.sh: failed; cluster %s kept. Inspect it with:\n  kind get kubeconfig --name %s > kubeconfig && KUBECONFIG=kubeconfig kubectl get pods -A\nDelete it with: kind delete cluster --name %s\n' \
      "$KIND_CLUSTER" "$KIND_CLUSTER" "$KIND_CLUSTER" >&2
  fi
  rm -rf "$work"
}
trap finish EXIT

if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
  say "using existing kind cluster $KIND_CLUSTER"
  kind get kubeconfig --name "$KIND_CLUSTER" >"$KUBECONFIG"
else
  say "creating kind cluster $KIND_CLUSTER"
  kind create cluster --name "$KIND_CLUSTER" --kubeconfig "$KUBECONFIG" --wait 120s
  created=1
fi

say "loading image $IMG into the cluster's nodes"
kind load docker-image "$IMG" --name "$KIND_CLUSTER"

# An overlay of deploy/default that installs $IMG, as a user's own overlay would. The image
# exists only on the nodes (loaded above), so it is never pulled.
if [[ ${IMG##*/} == *:* ]]; then image_name=${IMG%:*} image_tag=${IMG##*:}; else image_name=$IMG image_tag=latest; fi
overlay="$work/overlay"
mkdir "$overlay"
default_dir=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' deploy/default "$overlay")
cat >"$overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $default_dir
images:
- name: ghcr.io/kubeflow/kvc
  newName: $image_name
  newTag: "$image_tag"
patches:
- target: {kind: Deployment, labelSelector: app.kubernetes.io/part-of=kvc}
  patch: '[{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"}]'
- target: {kind: DaemonSet, labelSelector: app.kubernetes.io/part-of=kvc}
  patch: '[{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "IfNotPresent"}]'
EOF

say "installing deploy/default"
kubectl apply --server-side -k "$overlay"
kubectl wait --for=condition=Established --timeout=60s \
  crd/volumemanagers.kvc.kubeflow.org crd/volumenodes.kvc.kubeflow.org

say "installing the webhook's certificates (kvc certs install)"
"$KVC" certs install

say "waiting for the controller, the webhook and one agent per node"
kubectl -n kvc-system rollout status deploy/kvc-controller --timeout=180s
kubectl -n kvc-system rollout status deploy/kvc-webhook --timeout=180s
kubectl -n kvc-agent rollout status ds/kvc-agent --timeout=180s

say "check: every node's agent reports in its VolumeNode"
nodes=$(kubectl get nodes -o name | wc -l)
for _ in $(seq 60); do
  reporting=$(kubectl get volumenodes -o jsonpath='{range .items[?(@.status.heartbeatTime)]}{.metadata.name}{"\n"}{end}' | grep -c . || true)
  [[ $reporting -ge $nodes ]] && break
  sleep 2
done
[[ $reporting -ge $nodes ]] || fail "$reporting of $nodes agents report a heartbeat"

say "check: an NFS VolumeManager gets a bound claim and turns Running (controller, RBAC)"
kubectl create namespace "$SMOKE_NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$SMOKE_NAMESPACE" apply -f - <<'EOF'
apiVersion: kvc.kubeflow.org/v1
kind: VolumeManager
metadata:
  name: smoke
spec:
  volumeConfigs:
  - id: shared
    sourceType: NFS
    accessMode: ReadOnlyMany
    capacity: 1Gi
    options: {server: nfs.example.com, path: /exports/shared}
EOF
kubectl -n "$SMOKE_NAMESPACE" wait vmgr/smoke --for=jsonpath='{.status.state}'=Running --timeout=120s

say "check: the webhook wires an annotated pod through its Service and certificate"
pod() {
  cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: smoke-$1
  annotations: {kvc/volume: $1}
spec:
  containers: [{name: main, image: busybox:1.36}]
EOF
}
claim=$(pod shared | kubectl -n "$SMOKE_NAMESPACE" create --dry-run=server -f - \
  -o jsonpath='{.spec.volumes[*].persistentVolumeClaim.claimName}')
[[ -n $claim ]] || fail "the admitted pod has no claim volume: the webhook did not wire it"
if refusal=$(pod missing | kubectl -n "$SMOKE_NAMESPACE" create --dry-run=server -f - 2>&1); then
  fail "a pod asking for an unknown volume was admitted"
fi
grep -q missing <<<"$refusal" || fail "unexpected refusal: $refusal"

say "check: deleting the VolumeManager completes (the controller releases its finalizer)"
kubectl -n "$SMOKE_NAMESPACE" delete vmgr/smoke --timeout=120s
kubectl delete namespace "$SMOKE_NAMESPACE" --wait=false

say "kind e2e passed: image $IMG, deploy/default, cluster $KIND_CLUSTER"
