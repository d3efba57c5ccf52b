#!/usr/bin/env bash
# Build the local control plane's binaries from Go modules, once per machine.
#
# Output: $BATON_TESTBED_CACHE (default ~/.cache/baton-testbed)/<key>/bin with etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kwok, kwokctl and helm. The key covers every pinned
# version, so a fresh clone on the same machine (CI) reuses the binaries and a version bump rebuilds.
# Versions are pinned here and nowhere else; `baton devcluster` asks this script for the bin directory.
set -euo pipefail

K8S=1.37.2
STG=v0.37.2
ETCD=v3.6.16
KWOK=v0.8.0
HELM=v3.21.4  # not v3.22.0: served by the module proxy, but not approved for use here
PROMETHEUS_OPERATOR=v0.94.1  # only its ServiceMonitor and PrometheusRule CRDs, to check the chart against
MINOR=${K8S#1.}; MINOR=${MINOR%%.*}
KEY="k8s-$K8S-etcd-$ETCD-kwok-$KWOK-helm-$HELM"
CACHE=${BATON_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/baton-testbed}
BIN=$CACHE/$KEY/bin
BINARIES="etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok kwokctl helm"
CRDS=$CACHE/prometheus-operator-$PROMETHEUS_OPERATOR/crds
MONITORING_CRDS="monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml"

if [ "${1:-}" = "--print-bin" ]; then echo "$BIN"; exit 0; fi
if [ "${1:-}" = "--print-crds" ]; then echo "$CRDS"; exit 0; fi

# One build at a time (`make demo` and `make test` started together on a fresh machine would otherwise
# remove each other's wrapper modules mid-build); the second waits, then finds what the first built.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9

# A command that downloads from the Go module proxy, tried up to three times: Go's module client neither
# retries a failed fetch nor times out a stalled one, and one bad response would fail the whole build.
fetch() {
  local attempt
  for attempt in 1 2 3; do
    timeout 1800 "$@" && return 0
    [ "$attempt" = 3 ] || { echo "[testbed] '$*' failed (attempt $attempt of 3); retrying in 15s" >&2; sleep 15; }
  done
  return 1
}

# The Prometheus Operator's own CRDs (from its Go module, a few MB): the chart's optional
# ServiceMonitor and PrometheusRule are checked against them by the real API server.
have_crds() { for f in $MONITORING_CRDS; do [ -s "$CRDS/$f" ] || return 1; done; }
if ! have_crds; then
  command -v go >/dev/null || { echo "error: Go >= 1.26 is needed to fetch the Prometheus Operator CRDs" >&2; exit 1; }
  SRC=$(GOFLAGS=-mod=mod fetch go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR" \
        | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  mkdir -p "$CRDS"
  for f in $MONITORING_CRDS; do cp "$SRC/example/prometheus-operator-crd/$f" "$CRDS/$f"; done
  echo "Prometheus Operator $PROMETHEUS_OPERATOR CRDs in $CRDS"
fi

have_all() { for b in $BINARIES; do [ -x "$BIN/$b" ] || return 1; done; }
if have_all; then echo "testbed binaries already built in $BIN"; exit 0; fi

command -v go >/dev/null || { echo "error: Go >= 1.26 is needed to build the local control plane" >&2; exit 1; }
mkdir -p "$BIN"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
start=$(date +%s)
step() { echo "[testbed $(( $(date +%s) - start ))s] $*"; }

step "building Kubernetes v$K8S, etcd $ETCD, KWOK $KWOK and Helm $HELM into $BIN"
step "a cold build takes roughly 12-25 minutes on 2 cores and ~8 GB of Go caches; later runs reuse it"

if [ ! -x "$BIN/kube-apiserver" ] || [ ! -x "$BIN/kubectl" ] || [ ! -x "$BIN/kube-scheduler" ] || [ ! -x "$BIN/kube-controller-manager" ]; then
  W=$CACHE/wrap-k8s-$K8S; rm -rf "$W"; mkdir -p "$W"; cd "$W"
  go mod init baton.invalid/k8sbins >/dev/null 2>&1
  step "resolving k8s.io/kubernetes@v$K8S and pinning its staging modules to $STG"
  GOMOD=$(fetch go mod download -json "k8s.io/kubernetes@v$K8S" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$GOMOD"); do
    go mod edit -replace="$m=$m@$STG"
  done
  CMDS="kube-apiserver kube-controller-manager kube-scheduler kubectl"
  step "downloading modules (about 1-2 GB the first time)"
  fetch go get $(for c in $CMDS; do echo "k8s.io/kubernetes/cmd/$c@v$K8S"; done)
  LDF="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    LDF="$LDF -X $p.gitVersion=v$K8S -X $p.gitMajor=1 -X $p.gitMinor=$MINOR -X $p.gitTreeState=clean -X $p.buildDate=2026-01-01T00:00:00Z"
  done
  for c in $CMDS; do
    step "compiling $c"
    go build -trimpath -ldflags "$LDF" -o "$BIN/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$BIN/$c.tmp" "$BIN/$c"
  done
fi

if [ ! -x "$BIN/etcd" ]; then
  E=$CACHE/wrap-etcd-$ETCD; rm -rf "$E"; mkdir -p "$E"; cd "$E"
  go mod init baton.invalid/etcdbin >/dev/null 2>&1
  step "building etcd $ETCD"
  fetch go get "go.etcd.io/etcd/server/v3@$ETCD"
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$BIN/etcd.tmp" "$BIN/etcd"
fi

if [ ! -x "$BIN/kwok" ] || [ ! -x "$BIN/kwokctl" ]; then
  step "building kwok and kwokctl $KWOK"
  GOBIN="$BIN" fetch go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK"
fi

if [ ! -x "$BIN/helm" ]; then
  step "building helm $HELM"
  GOBIN="$BIN" fetch go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$MINOR" \
    "helm.sh/helm/v3/cmd/helm@$HELM"
fi

have_all || { echo "error: build finished but some binaries are missing in $BIN" >&2; exit 1; }
step "done: $(du -sh "$BIN" | cut -f1) of binaries in $BIN"
