#!/usr/bin/env bash
# Build the cluster binaries the e2e tests run from their Go modules into a versioned cache
# outside the repo. Rebuilds only what is missing:
# - the control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl;
# - kwok (fake GPU nodes) and helm;
# - the real node (hack/realnode.py): kubelet, kube-proxy and CoreDNS (cluster DNS, as a process).
#
# Prints the bin directory on the last line of stdout.
set -euo pipefail

K8S_VERSION=1.36.4
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.21.4
COREDNS_VERSION=v1.15.0

CACHE_ROOT=${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}
BIN=$CACHE_ROOT/controlplane-k8s$K8S_VERSION-kwok$KWOK_VERSION-helm$HELM_VERSION/bin
WORK=$CACHE_ROOT/controlplane-build-$K8S_VERSION

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-trimpath
mkdir -p "$BIN" "$WORK"
log() { echo "[build-control-plane] $*" >&2; }

have_all() {
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm \
           kubelet kube-proxy coredns; do
    [ -x "$BIN/$b" ] || return 1
  done
}
if have_all; then echo "$BIN"; exit 0; fi
command -v go >/dev/null || { echo "go is not installed: cannot build the control plane" >&2; exit 3; }

K8S_GOMOD=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)

build_kubernetes() {
  local dir=$WORK/k8s
  mkdir -p "$dir" && cd "$dir"
  rm -f go.mod go.sum
  go mod init local/k8sbuild >/dev/null 2>&1
  # k8s.io/kubernetes replaces its staging modules with ./staging paths; a consumer
  # must replace each with its published tag (v1.Y.Z <-> v0.Y.Z).
  for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/src/.*#\1#p' "$K8S_GOMOD"); do
    go mod edit -replace="$m=$m@v0.${K8S_VERSION#1.}"
  done
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  local godebug
  godebug=$(sed -n 's/^godebug \(.*\)$/\1/p' "$K8S_GOMOD")
  [ -n "$godebug" ] && go mod edit -godebug="$godebug"
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	_ "k8s.io/kubernetes/cmd/kube-scheduler/app"
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kube-proxy/app"
	_ "k8s.io/kubernetes/cmd/kubelet/app"
)
GO
  go mod tidy
  local ldflags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$MINOR"
    ldflags="$ldflags -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  go build -tags selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$BIN/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
}

build_etcd() {
  # etcd's own modules carry relative replaces, so `go install` refuses them: wrap.
  local version dir=$WORK/etcd
  version=$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2}' "$K8S_GOMOD")
  mkdir -p "$dir" && cd "$dir"
  rm -f go.mod go.sum
  go mod init local/etcdbuild >/dev/null 2>&1
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3/etcdmain"
GO
  go get "go.etcd.io/etcd/server/v3@$version"
  go mod tidy
  go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
}

build_kwok() {
  GOBIN=$BIN go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

build_helm() {
  GOBIN=$BIN go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_coredns() {
  GOBIN=$BIN go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
}

# The builds run side by side: each spends its first minute or more downloading modules, which
# overlaps the others' compiling (on two cores one after another left the CPUs idle meanwhile).
# Go's caches take concurrent builds. Each build's output goes to its own log, shown if it fails.
pids=() names=()
start() {
  local name=$1 log=$WORK/$1.log
  log "building $name"
  ( "build_$name" ) >"$log" 2>&1 &
  pids+=($!) names+=("$name")
}
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
  [ -x "$BIN/$b" ] || { start kubernetes; break; }
done
[ -x "$BIN/etcd" ] || start etcd
[ -x "$BIN/kwok" ] || start kwok
[ -x "$BIN/helm" ] || start helm
[ -x "$BIN/coredns" ] || start coredns
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    log "built ${names[$i]}"
  else
    log "building ${names[$i]} failed:"; tail -n 40 "$WORK/${names[$i]}.log" >&2; failed=1
  fi
done
[ "$failed" = 0 ] || exit 1
have_all
echo "$BIN"
