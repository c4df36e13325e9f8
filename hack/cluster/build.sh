#!/usr/bin/env bash
# Build the binaries of the local test control plane from Go modules.
#
#   hack/cluster/build.sh [COMPONENT...]   build what is missing (default: all)
#   hack/cluster/build.sh --dir COMPONENT  print the cache directory of COMPONENT
#
# Components: kube (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl), etcd, kwok (kwok + its CRDs), helm, promtool, prometheus (the
# server, without its web UI assets), alertmanager (a placeholder web UI),
# kueue (the manager, plus its config/components manifests).
#
# Versions come from hack/cluster/versions.env only. Each component is built
# once into $COPD_CLUSTER_CACHE/bin/<component>-<version>/ (default
# ~/.cache/copd-operator) and reused while that directory exists, so a version
# bump rebuilds exactly the bumped component. Wrapper modules are generated
# under $COPD_CLUSTER_CACHE/src/: k8s.io/kubernetes and etcd cannot be
# `go install`ed directly because their go.mod files replace modules with
# local directories; the wrappers replace each k8s.io staging module with its
# published v0.MINOR.PATCH and pin the etcd server module instead.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"

CACHE="${COPD_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/copd-operator}"
ALL=(etcd kube kwok helm promtool prometheus alertmanager kueue)

version_of() {
  case "$1" in
    kube) echo "$KUBE_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    kwok) echo "$KWOK_VERSION" ;;
    helm) echo "$HELM_VERSION" ;;
    promtool|prometheus) echo "$PROMETHEUS_VERSION" ;;
    alertmanager) echo "$ALERTMANAGER_VERSION" ;;
    kueue) echo "$KUEUE_VERSION" ;;
    *) echo "unknown component: $1" >&2; return 1 ;;
  esac
}
bindir() { echo "$CACHE/bin/$1-$(version_of "$1")"; }

if [[ "${1:-}" == "--dir" ]]; then bindir "$2"; exit 0; fi

# Fit a 2-core machine: at most 2 compile jobs, 2 OS threads per compiler.
export GOMAXPROCS="${GOMAXPROCS:-2}"
export GOFLAGS="-trimpath -buildvcs=false -p=${COPD_BUILD_JOBS:-2}"
export CGO_ENABLED=0
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
LDBASE="-s -w"
BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

log() { echo "[build $(date +%H:%M:%S)] $*" >&2; }

# new_module DIR MODULE: an empty wrapper module in DIR
new_module() {
  rm -rf "$1"; mkdir -p "$1"
  printf 'module %s\n\ngo 1.26.0\n' "$2" > "$1/go.mod"
}
# gomod_get DIR ARGS...: `go get ARGS` in DIR, its chatter kept in DIR/get.log
gomod_get() {
  local dir="$1"; shift
  (cd "$dir" && go get "$@" >>"$dir/get.log" 2>&1) || { cat "$dir/get.log" >&2; return 1; }
}
moddir() { (cd "$1" && go list -m -f '{{.Dir}}' "$2"); }

build_kube() {
  local v="$KUBE_VERSION" src="$1" out="$2" minor
  minor="${v#v1.}"                       # 37.2
  local staging="v0.${minor}"            # v0.37.2
  new_module "$src" copd.local/cluster/kube
  # Turn k8s.io/kubernetes' local staging replaces into published versions.
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo 'replace ('
    awk '/=> \.\/staging\/src\//{print "\t" $1 " => " $1 " '"$staging"'"}' "$gomod" \
      | grep -v -e k8s.io/sample-cli-plugin -e k8s.io/sample-controller
    echo ')'
  } >> "$src/go.mod"
  local pkgs=(cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubectl)
  local with_version=("${pkgs[@]/#/k8s.io/kubernetes/}")
  gomod_get "$src" -tool "${with_version[@]/%/@$v}"
  local major="${v#v}"; major="${major%%.*}"
  local mnr="${minor%%.*}"
  local ld="$LDBASE -X k8s.io/component-base/version.gitVersion=$v \
 -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$mnr \
 -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/component-base/version.buildDate=$BUILD_DATE \
 -X k8s.io/component-base/version.gitCommit=module-$v \
 -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=$major \
 -X k8s.io/client-go/pkg/version.gitMinor=$mnr -X k8s.io/client-go/pkg/version.gitTreeState=clean"
  local p
  for p in "${pkgs[@]}"; do
    local t0=$SECONDS
    (cd "$src" && go build -ldflags "$ld" -o "$out/" "k8s.io/kubernetes/$p")
    log "  $(basename "$p") built in $((SECONDS - t0))s"
    echo "kube/$(basename "$p") $((SECONDS - t0))s" >> "$CACHE/build-times.log"
  done
}

build_etcd() {
  local v="$ETCD_VERSION" src="$1" out="$2"
  new_module "$src" copd.local/cluster/etcd
  cp "$HERE/etcd/main.go" "$src/main.go"
  gomod_get "$src" "go.etcd.io/etcd/server/v3@$v"
  (cd "$src" && go mod tidy 2>>"$src/get.log") || { cat "$src/get.log" >&2; return 1; }
  (cd "$src" && go build -ldflags "$LDBASE -X go.etcd.io/etcd/api/v3/version.GitSHA=module-$v" -o "$out/etcd" .)
}

build_kwok() {
  local v="$KWOK_VERSION" src="$1" out="$2"
  new_module "$src" copd.local/cluster/kwok
  gomod_get "$src" -tool "sigs.k8s.io/kwok/cmd/kwok@$v"
  (cd "$src" && go build -ldflags "$LDBASE -X sigs.k8s.io/kwok/pkg/consts.Version=${v#v}" \
     -o "$out/kwok" sigs.k8s.io/kwok/cmd/kwok)
  mkdir -p "$out/crds"
  cp "$(moddir "$src" sigs.k8s.io/kwok)"/kustomize/crd/bases/*.yaml "$out/crds/"
  chmod u+w "$out"/crds/*.yaml
}

build_helm() {
  local v="$HELM_VERSION" src="$1" out="$2"
  new_module "$src" copd.local/cluster/helm
  gomod_get "$src" -tool "helm.sh/helm/v3/cmd/helm@$v"
  (cd "$src" && go build -ldflags "$LDBASE -X helm.sh/helm/v3/internal/version.version=$v \
     -X helm.sh/helm/v3/internal/version.gitTreeState=clean" -o "$out/helm" helm.sh/helm/v3/cmd/helm)
}

# prom_ldflags VERSION REVISION: stamp github.com/prometheus/common/version (what --version prints)
prom_ldflags() {
  echo "$LDBASE -X github.com/prometheus/common/version.Version=$1 \
 -X github.com/prometheus/common/version.Revision=$2 -X github.com/prometheus/common/version.Branch=HEAD \
 -X github.com/prometheus/common/version.BuildUser=copd-operator -X github.com/prometheus/common/version.BuildDate=$BUILD_DATE"
}

# build_prom_cmd COMPONENT CMD SRC OUT: one command of the Prometheus module through a wrapper module
build_prom_cmd() {
  local v="$PROMETHEUS_VERSION" c="$1" cmd="$2" src="$3" out="$4" pv
  new_module "$src" "copd.local/cluster/$c"
  gomod_get "$src" -tool "github.com/prometheus/prometheus/cmd/$cmd@$v"
  pv="$(cat "$(moddir "$src" github.com/prometheus/prometheus)/VERSION")"
  (cd "$src" && go build -ldflags "$(prom_ldflags "$pv" "module-$v")" \
     -o "$out/$cmd" "github.com/prometheus/prometheus/cmd/$cmd")
}

build_promtool() { build_prom_cmd promtool promtool "$@"; }

# The server. Its web UI (React) is embedded only with the `builtinassets` build tag, which
# needs a node build of web/ui; without the tag the binary serves the HTTP API (all the
# tests and scripts/observe-demo.sh use) and answers the UI pages with an error.
build_prometheus() { build_prom_cmd prometheus prometheus "$@"; }

# Alertmanager embeds its web UI (`//go:embed app/dist` in ui/web.go) and app/dist is built by
# npm, so it is not in the module zip and the package cannot be built from the module cache
# as is. Build from a writable copy of the module with a placeholder app/dist/index.html
# (the API under /api/v2 is complete; the UI pages say they are not built).
build_alertmanager() {
  local v="$ALERTMANAGER_VERSION" src="$1" out="$2" mod
  mod="$(go mod download -json "github.com/prometheus/alertmanager@$v" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  [[ -d "$mod" ]] || { echo "alertmanager $v: module download failed" >&2; return 1; }
  rm -rf "$src"; cp -r "$mod" "$src"; chmod -R u+w "$src"
  mkdir -p "$src/ui/app/dist"
  printf '<!doctype html><title>Alertmanager</title><p>The web UI is not built here; use the API under /api/v2.</p>\n' \
    > "$src/ui/app/dist/index.html"
  (cd "$src" && GOWORK=off go build -ldflags "$(prom_ldflags "${v#v}" "module-$v")" \
     -o "$out/alertmanager" ./cmd/alertmanager)
}

# Kueue's module has no local replaces, so a wrapper module builds it. With internal
# certificate management off, the manager reads its metrics server certificate from the fixed
# path /etc/kueue/metrics/certs, even with metrics off; the wrapper's main package is a copy of
# cmd/kueue/main.go (its only file; it imports no internal package) with that one line changed
# so that KUEUE_METRICS_CERT_DIR may name another directory (scripts/cluster.sh points it into
# the cluster's state). Everything else comes from the module as published. Its CRDs and webhook
# configurations (config/components, kustomize sources) are copied next to the binary;
# hack/cluster/kueue/render.py renders them for the local control plane.
build_kueue() {
  local v="$KUEUE_VERSION" src="$1" out="$2" mod
  new_module "$src" copd.local/cluster/kueue
  gomod_get "$src" "sigs.k8s.io/kueue@$v"
  mod="$(moddir "$src" sigs.k8s.io/kueue)"
  local fixed='metricsCertPath := "/etc/kueue/metrics/certs"'
  grep -qF "$fixed" "$mod/cmd/kueue/main.go" \
    || { echo "kueue $v: the metrics certificate path line moved; update build_kueue" >&2; return 1; }
  sed "s|$fixed|$fixed; if d := os.Getenv(\"KUEUE_METRICS_CERT_DIR\"); d != \"\" { metricsCertPath = d }|" \
    "$mod/cmd/kueue/main.go" > "$src/main.go"
  (cd "$src" && go mod tidy >>"$src/get.log" 2>&1) || { cat "$src/get.log" >&2; return 1; }
  (cd "$src" && go build -ldflags "$LDBASE -X sigs.k8s.io/kueue/pkg/version.GitVersion=$v \
     -X sigs.k8s.io/kueue/pkg/version.GitCommit=module-$v" -o "$out/kueue" .)
  mkdir -p "$out/config"
  cp -r "$mod/config/components" "$out/config/"
  chmod -R u+w "$out/config"
}

comps=("$@"); [[ ${#comps[@]} -gt 0 ]] || comps=("${ALL[@]}")
mkdir -p "$CACHE/bin" "$CACHE/src"
# One build at a time (CI, pytest, scripts/setup.sh and a shell may all call it).
exec 9>"$CACHE/build.sh.lock"
flock 9

for c in "${comps[@]}"; do
  dir="$(bindir "$c")"
  if [[ -f "$dir/.complete" ]]; then continue; fi
  log "building $c $(version_of "$c") -> $dir"
  t0=$SECONDS
  tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
  "build_$c" "$CACHE/src/$c-$(version_of "$c")" "$tmp"
  touch "$tmp/.complete"
  rm -rf "$dir"; mv "$tmp" "$dir"
  log "built $c in $((SECONDS - t0))s"
  echo "$c $(version_of "$c") $((SECONDS - t0))s $(date -u +%FT%TZ)" >> "$CACHE/build-times.log"
done
