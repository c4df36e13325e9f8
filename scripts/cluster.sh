#!/usr/bin/env bash
# A real, local Kubernetes control plane for tests, with no container engine.
#
#   scripts/cluster.sh up       build what is missing, start everything, wait healthy (idempotent)
#   scripts/cluster.sh down     stop what `up` started (PID files) and remove the state
#   scripts/cluster.sh status   show each component and whether it is healthy
#   scripts/cluster.sh restart kube-apiserver
#                               stop and start the apiserver only (fault drills; same state)
#   scripts/cluster.sh target add|rm operator|copd-run NAME [HOST:PORT]
#                               (un)register a metrics endpoint with the local Prometheus
#
# Components (binaries built from Go modules by hack/cluster/build.sh, versions
# in hack/cluster/versions.env): etcd, kube-apiserver (RBAC, TLS on 127.0.0.1
# only), kube-controller-manager, kube-scheduler, kwok (fake GPU nodes
# kwok-gpu-0..N-1) and a Python process node (hack/cluster/procnode/procnode.py,
# node proc-node-0) that runs pods as local processes. No kubelet, kube-proxy
# or CNI: Services get ClusterIPs but nothing routes them.
# Monitoring: prometheus (scrapes the operator and `copd run --metrics-port`
# endpoints registered with `target add`, evaluates the alert rules rendered
# from helm/copd-operator with hack/cluster/prometheus/values.yaml) and
# alertmanager (receives them; GET /api/v2/alerts). Both on 127.0.0.1 only.
# Queueing: the Kueue manager (kueue-system; CRDs and webhook configurations rendered from its
# module's config/components by hack/cluster/kueue/render.py; its webhooks serve on 127.0.0.1
# with a certificate of the local CA; batch/job integration, manageJobsWithoutQueueName false).
#
# Outputs: .cluster/kubeconfig (admin, group system:masters), .cluster/env (source
# it: PATH with kubectl/helm/promtool, KUBECONFIG, COPD_PROMETHEUS_URL,
# COPD_ALERTMANAGER_URL, COPD_PROMETHEUS_TARGETS), logs in .cluster/logs/.
#
# Environment overrides (defaults in brackets):
#   COPD_CLUSTER_DIR [<repo>/.cluster]   COPD_CLUSTER_CACHE [~/.cache/copd-operator]
#   COPD_ETCD_PORT [23790] (peer: +10)   COPD_APISERVER_PORT [26443]
#   COPD_CM_PORT [20257]  COPD_SCHED_PORT [20259]  COPD_KWOK_PORT [20247]
#   COPD_PROMETHEUS_PORT [29090]   COPD_ALERTMANAGER_PORT [29093]
#   COPD_KUEUE_PORT [apiserver port + 1] (Kueue's webhooks; its health probe: +1)
#   COPD_KWOK_NODES [4]   COPD_PROCNODE_NAME [proc-node-0]
#   COPD_CM_API_QPS [20]  COPD_CM_API_BURST [30]  (kube-controller-manager's client: its Job, TTL and
#                         GC controllers; bench/operator_scale.py needs more, README "Running many runs")
#   COPD_CM_JOB_SYNCS [5]  (kube-controller-manager --concurrent-job-syncs and
#                         --concurrent-ttl-after-finished-syncs: Jobs it syncs at once; the fleet bench needs more)
#   COPD_KWOK_POD_PARALLELISM [4]  (KWOK's podPlayStageParallelism: pod stages it plays at once, each a
#                         PATCH to the apiserver; 4 caps a 1,000-run fleet at a few pod updates per second)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/hack/cluster/build.sh"
ST="${COPD_CLUSTER_DIR:-$ROOT/.cluster}"
PKI="$ST/pki" LOGS="$ST/logs" PIDS="$ST/pids"
ETCD_PORT="${COPD_ETCD_PORT:-23790}"
ETCD_PEER_PORT=$((ETCD_PORT + 10))
API_PORT="${COPD_APISERVER_PORT:-26443}"
CM_PORT="${COPD_CM_PORT:-20257}"
SCHED_PORT="${COPD_SCHED_PORT:-20259}"
KWOK_PORT="${COPD_KWOK_PORT:-20247}"
PROM_PORT="${COPD_PROMETHEUS_PORT:-29090}"
AM_PORT="${COPD_ALERTMANAGER_PORT:-29093}"
KUEUE_PORT="${COPD_KUEUE_PORT:-$((API_PORT + 1))}"
KUEUE_HEALTH_PORT=$((KUEUE_PORT + 1))
KWOK_NODES="${COPD_KWOK_NODES:-4}"
CM_API_QPS="${COPD_CM_API_QPS:-20}" CM_API_BURST="${COPD_CM_API_BURST:-30}" CM_JOB_SYNCS="${COPD_CM_JOB_SYNCS:-5}"
PROCNODE="${COPD_PROCNODE_NAME:-proc-node-0}"
SERVICE_CIDR=10.96.0.0/16
API="https://127.0.0.1:$API_PORT"
PROM="$ST/prometheus" AM="$ST/alertmanager"
MON_SRC="$ROOT/hack/cluster/prometheus"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok procnode alertmanager prometheus kueue)
KUEUE="$ST/kueue"

log() { echo "[cluster $(date +%H:%M:%S)] $*" >&2; }
die() { echo "[cluster] ERROR: $*" >&2; exit 1; }

bindirs() {
  KUBE_BIN="$("$BUILD" --dir kube)" ETCD_BIN="$("$BUILD" --dir etcd)" KWOK_BIN="$("$BUILD" --dir kwok)"
  HELM_BIN="$("$BUILD" --dir helm)" PROMTOOL_BIN="$("$BUILD" --dir promtool)"
  PROMETHEUS_BIN="$("$BUILD" --dir prometheus)" ALERTMANAGER_BIN="$("$BUILD" --dir alertmanager)"
  KUEUE_BIN="$("$BUILD" --dir kueue)"
}

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }
# alive NAME: its PID file names a live process that is still that component (not a reused PID)
alive() {
  local p; p="$(pid_of "$1")"
  [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null && tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- "${1/procnode/procnode.py}"
}
port_busy() { ss -ltnH "sport = :$1" 2>/dev/null | grep -q .; }

# start NAME PORT CMD...: start CMD in its own session unless NAME already runs
start() {
  local name="$1" port="$2"; shift 2
  if alive "$name"; then return 0; fi
  if [[ "$port" != - ]] && port_busy "$port"; then
    die "port $port (for $name) is in use by a process this cluster ($ST) did not start:
$(ss -ltnpH "sport = :$port" 2>/dev/null)
stop it (another clone's cluster: its scripts/cluster.sh down) or set COPD_*_PORT (see scripts/cluster.sh header)"
  fi
  log "starting $name"
  setsid nohup "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name.pid"
}

# wait_for WHAT SECONDS CMD...: poll CMD until it succeeds
wait_for() {
  local what="$1" secs="$2" i; shift 2
  for ((i = 0; i < secs * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "timed out after ${secs}s waiting for $what (logs: $LOGS)"
}

curl_api() { curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$API$1"; }
healthz() { curl -fsSk "https://127.0.0.1:$1/healthz"; }
kctl() { "$KUBE_BIN/kubectl" --kubeconfig "$ST/kubeconfig" "$@"; }

# ---- PKI -------------------------------------------------------------------
# sign NAME CN ORG EXT: EC key + cert signed by the local CA
sign() {
  local name="$1" cn="$2" org="$3" ext="$4"
  [[ -f "$PKI/$name.crt" ]] && return 0
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$PKI/$name.key" -subj "/CN=$cn${org:+/O=$org}" -out "$PKI/$name.csr" 2>/dev/null
  printf '%b' "$ext" > "$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
}

make_pki() {
  mkdir -p "$PKI"
  if [[ ! -f "$PKI/ca.crt" ]]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -subj "/CN=copd-local-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  fi
  local client='keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n'
  sign apiserver kube-apiserver "" \
    'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n'
  sign admin admin system:masters "$client"
  sign controller-manager system:kube-controller-manager "" "$client"
  sign scheduler system:kube-scheduler "" "$client"
  sign kueue-webhook kueue-webhook "" \
    'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n'
  if [[ ! -f "$PKI/sa.key" ]]; then
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  fi
}

# kubeconfig FILE CERTNAME USER
kubeconfig() {
  local b64='base64 -w0'
  cat > "$1.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: copd-local
  cluster:
    server: $API
    certificate-authority-data: $($b64 < "$PKI/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $($b64 < "$PKI/$2.crt")
    client-key-data: $($b64 < "$PKI/$2.key")
contexts:
- name: copd-local
  context: {cluster: copd-local, user: $3}
current-context: copd-local
EOF
  mv "$1.tmp" "$1"
}

# KWOK's configuration. A configuration file replaces KWOK's built-in defaults instead of adding to
# them (v0.8.0: an option the file leaves out is zero, e.g. no pod CIDR, no lease workers), so every
# option KWOK defaults is written here with KWOK's own default value; only podPlayStageParallelism
# can differ (COPD_KWOK_POD_PARALLELISM). Flags on the command line still override the file.
kwok_config() {
  cat <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  cidr: 10.0.0.0/24
  enableDebuggingHandlers: true
  enableContentionProfiling: false
  enableProfilingHandler: true
  podPlayStageParallelism: ${COPD_KWOK_POD_PARALLELISM:-4}
  nodePlayStageParallelism: 4
  nodeLeaseParallelism: 4
  podsOnNodeSyncParallelism: 1
  enablePodsOnNodeSyncListPager: true
  enablePodsOnNodeSyncStreamWatch: false
EOF
}

# a running KWOK keeps its configuration: the file is written only when KWOK starts
start_kwok() {
  alive kwok && return 0
  kwok_config >"$ST/kwok.yaml"
  start kwok "$KWOK_PORT" "$KWOK_BIN/kwok" --kubeconfig "$ST/kubeconfig" --config "$ST/kwok.yaml" \
    --manage-all-nodes=false --manage-nodes-with-label-selector type=kwok \
    --enable-crds Stage --server-address "127.0.0.1:$KWOK_PORT" --node-lease-duration-seconds 40
}

kwok_nodes_yaml() {
  local i
  for ((i = 0; i < KWOK_NODES; i++)); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-gpu-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: kwok-gpu-$i
    node-role/gpu: "true"
    node.kubernetes.io/instance-type: fake-gpu-8x
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
    nvidia.com/gpu.count: "8"
    nvidia.com/gpu.memory: "81559"
spec:
  taints:
  - key: kwok.x-k8s.io/node
    value: fake
    effect: NoSchedule
status:
  allocatable: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
  capacity: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
  nodeInfo: {architecture: amd64, operatingSystem: linux, kubeletVersion: fake}
EOF
  done
}

write_env() {
  cat > "$ST/env.tmp" <<EOF
# source me: tools and credentials of the local control plane (scripts/cluster.sh)
export PATH="$KUBE_BIN:$HELM_BIN:$PROMTOOL_BIN:$KWOK_BIN:$ETCD_BIN:\$PATH"
export KUBECONFIG="$ST/kubeconfig"
export COPD_CLUSTER_DIR="$ST"
export COPD_PROCNODE_NAME="$PROCNODE"
export COPD_PROCNODE_WORKDIR="$ST/procnode"
export COPD_PROMETHEUS_URL="http://127.0.0.1:$PROM_PORT"
export COPD_ALERTMANAGER_URL="http://127.0.0.1:$AM_PORT"
export COPD_PROMETHEUS_TARGETS="$PROM/targets"
EOF
  mv "$ST/env.tmp" "$ST/env"
}

python_bin() {
  if [[ -x "$ROOT/.venv/bin/python" ]]; then echo "$ROOT/.venv/bin/python"; else command -v python3; fi
}

# ---- monitoring --------------------------------------------------------------
# monitoring_config: the alert rules rendered from the chart, the Prometheus and
# Alertmanager configuration. The scrape job of the operator is named after the
# job the rendered CoPDOperatorDown selects (the chart's metrics Service name),
# so the rule works unchanged here as it does with a ServiceMonitor.
monitoring_config() {
  mkdir -p "$PROM/rules" "$PROM/data" "$PROM/targets/operator" "$PROM/targets/copd-run" "$AM/data"
  local rule job
  rule="$("$HELM_BIN/helm" template copd "$ROOT/helm/copd-operator" --namespace copd-system \
    -f "$MON_SRC/values.yaml" --show-only templates/prometheusrule.yaml)" || die "helm template of the alert rules failed"
  # a PrometheusRule's spec ({groups: [...]}) is a Prometheus rules file
  awk 'f { sub(/^  /, ""); print } /^spec:$/ { f = 1 }' <<<"$rule" > "$PROM/rules/copd-operator.yaml.tmp"
  "$PROMTOOL_BIN/promtool" check rules "$PROM/rules/copd-operator.yaml.tmp" >/dev/null \
    || die "the rules rendered from helm/copd-operator do not load: $PROM/rules/copd-operator.yaml.tmp"
  mv "$PROM/rules/copd-operator.yaml.tmp" "$PROM/rules/copd-operator.yaml"
  job="$(grep -o 'up{job="[^"]*"}' "$PROM/rules/copd-operator.yaml" | head -1 | sed 's/^up{job="\(.*\)"}$/\1/')"
  [[ -n "$job" ]] || die "no up{job=...} selector in the rendered CoPDOperatorDown"
  sed -e "s/@ALERTMANAGER_PORT@/$AM_PORT/g" -e "s/@OPERATOR_JOB@/$job/g" "$MON_SRC/prometheus.yml" > "$PROM/prometheus.yml.tmp"
  "$PROMTOOL_BIN/promtool" check config --syntax-only "$PROM/prometheus.yml.tmp" >/dev/null \
    || die "invalid Prometheus configuration: $PROM/prometheus.yml.tmp"
  mv "$PROM/prometheus.yml.tmp" "$PROM/prometheus.yml"
  cp "$MON_SRC/alertmanager.yml" "$AM/alertmanager.yml"
}

# reload NAME PORT: make a running Prometheus/Alertmanager re-read its files
# ---- Kueue ------------------------------------------------------------------------
# kueue_config: the manager's serving certificate, configuration, CRDs and webhook configurations
kueue_config() {
  mkdir -p "$KUEUE/certs"
  cp "$PKI/kueue-webhook.crt" "$KUEUE/certs/tls.crt"
  cp "$PKI/kueue-webhook.key" "$KUEUE/certs/tls.key"
  "$(python_bin)" "$ROOT/hack/cluster/kueue/render.py" "$KUEUE_BIN/config/components" "$PKI/ca.crt" \
    "$KUEUE_PORT" "$KUEUE_HEALTH_PORT" "$KUEUE/certs" "$KUEUE" || die "rendering Kueue's manifests failed"
}

# the webhooks answer: a server-side dry run of a ResourceFlavor passes Kueue's mutating and validating webhooks
kueue_webhooks_ready() {
  kctl apply --server-side --dry-run=server -f - <<EOF
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {name: copd-webhook-probe}
EOF
}

start_kueue() {
  kctl apply --server-side --force-conflicts -f "$KUEUE/crds.yaml" >/dev/null
  wait_for "Kueue CRDs established" 60 kctl wait --for condition=Established --timeout 5s \
    crd/workloads.kueue.x-k8s.io crd/clusterqueues.kueue.x-k8s.io crd/localqueues.kueue.x-k8s.io
  kctl apply --server-side --force-conflicts -f "$KUEUE/webhooks.yaml" >/dev/null
  KUBECONFIG="$ST/kubeconfig" KUEUE_METRICS_CERT_DIR="$KUEUE/certs" start kueue "$KUEUE_PORT" "$KUEUE_BIN/kueue" --config "$KUEUE/config.yaml" \
    --feature-gates VisibilityOnDemand=false --zap-log-level info
}

reload() { curl -fsS -X POST "http://127.0.0.1:$2/-/reload" >/dev/null || die "$1 refused to reload (see $LOGS/$1.log)"; }

start_monitoring() {
  local was_am=0 was_prom=0
  alive alertmanager && was_am=1
  alive prometheus && was_prom=1
  start alertmanager "$AM_PORT" "$ALERTMANAGER_BIN/alertmanager" --config.file "$AM/alertmanager.yml" \
    --storage.path "$AM/data" --web.listen-address "127.0.0.1:$AM_PORT" --cluster.listen-address= \
    --log.level warn
  start prometheus "$PROM_PORT" "$PROMETHEUS_BIN/prometheus" --config.file "$PROM/prometheus.yml" \
    --storage.tsdb.path "$PROM/data" --storage.tsdb.retention.time 2d \
    --web.listen-address "127.0.0.1:$PROM_PORT" --web.external-url "http://127.0.0.1:$PROM_PORT/" \
    --web.enable-lifecycle --enable-feature created-timestamp-zero-ingestion --log.level warn
  wait_for alertmanager 60 curl -fsS "http://127.0.0.1:$AM_PORT/-/ready"
  wait_for prometheus 60 curl -fsS "http://127.0.0.1:$PROM_PORT/-/ready"
  # already running: pick up rules/configuration rendered from a changed chart or values
  [[ $was_am == 0 ]] || reload alertmanager "$AM_PORT"
  [[ $was_prom == 0 ]] || reload prometheus "$PROM_PORT"
}

# target add|rm operator|copd-run NAME [HOST:PORT]: a file_sd target of the local Prometheus
cmd_target() {
  local op="${1:-}" job="${2:-}" name="${3:-}" addr="${4:-}"
  [[ "$job" == operator || "$job" == copd-run ]] || die "usage: $0 target add|rm operator|copd-run NAME [HOST:PORT]"
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "target NAME: letters, digits, . _ - only"
  local f="$PROM/targets/$job/$name.json"
  case "$op" in
    add)
      [[ -n "$addr" ]] || die "usage: $0 target add $job $name HOST:PORT"
      mkdir -p "$PROM/targets/$job"
      printf '[{"targets": ["%s"]}]\n' "$addr" > "$f.tmp" && mv "$f.tmp" "$f"
      log "Prometheus scrapes $addr within seconds ($f)" ;;
    rm) rm -f "$f" ;;
    *) die "usage: $0 target add|rm operator|copd-run NAME [HOST:PORT]" ;;
  esac
}

# ---- the kube-apiserver (also `restart kube-apiserver`) -----------------------
start_controller_manager() {
  start kube-controller-manager "$CM_PORT" "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$ST/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$ST/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$ST/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$CM_PORT" --leader-elect=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --cert-dir "$ST/cm-certs" \
    --kube-api-qps "$CM_API_QPS" --kube-api-burst "$CM_API_BURST" \
    --concurrent-job-syncs "$CM_JOB_SYNCS" --concurrent-ttl-after-finished-syncs "$CM_JOB_SYNCS"
}

start_apiserver() {
  start kube-apiserver "$API_PORT" "$KUBE_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true --profiling=false \
    --cert-dir "$ST/apiserver-certs"
}

cmd_up() {
  local t0=$SECONDS
  "$BUILD" || die "building the control plane binaries failed (see output above)"
  bindirs
  mkdir -p "$ST" "$LOGS" "$PIDS" "$ST/etcd" "$ST/procnode"
  make_pki
  kubeconfig "$ST/kubeconfig" admin admin
  kubeconfig "$ST/controller-manager.kubeconfig" controller-manager system:kube-controller-manager
  kubeconfig "$ST/scheduler.kubeconfig" scheduler system:kube-scheduler
  write_env
  monitoring_config
  kueue_config

  start etcd "$ETCD_PORT" "$ETCD_BIN/etcd" --name copd --data-dir "$ST/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "copd=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
  wait_for etcd 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

  start_apiserver
  wait_for kube-apiserver 120 curl_api /readyz

  start_controller_manager
  start kube-scheduler "$SCHED_PORT" "$KUBE_BIN/kube-scheduler" \
    --kubeconfig "$ST/scheduler.kubeconfig" \
    --authentication-kubeconfig "$ST/scheduler.kubeconfig" --authorization-kubeconfig "$ST/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false --cert-dir "$ST/sched-certs"

  # KWOK: CRDs, Stage objects, fake GPU nodes, then the controller.
  kctl apply --server-side --force-conflicts -f "$KWOK_BIN/crds/" >/dev/null
  # a fresh CRD has no status.conditions yet and `kubectl wait` then errors at once instead of
  # waiting; discovery of the new kind can lag too: poll both
  wait_for "kwok CRDs established" 60 kctl wait --for condition=Established --timeout 5s crd/stages.kwok.x-k8s.io
  wait_for "kwok Stages applied" 60 kctl apply --server-side --force-conflicts -f "$ROOT/hack/cluster/kwok/stages.yaml"
  kwok_nodes_yaml | kctl apply --server-side --force-conflicts -f - >/dev/null
  # default StorageClass; hack/cluster/procnode/procnode.py provisions hostPath PVs for it
  kctl apply --server-side --force-conflicts -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: copd-local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: copd.io/procnode
reclaimPolicy: Delete
volumeBindingMode: Immediate
EOF
  start_kwok

  start_kueue

  start procnode - "$(python_bin)" "$ROOT/hack/cluster/procnode/procnode.py" \
    --kubeconfig "$ST/kubeconfig" --name "$PROCNODE" --workdir "$ST/procnode" \
    --api-host 127.0.0.1 --api-port "$API_PORT"

  start_monitoring

  wait_for kube-controller-manager 90 healthz "$CM_PORT"
  wait_for kube-scheduler 90 healthz "$SCHED_PORT"
  wait_for kwok 60 curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz"
  wait_for "kwok nodes Ready" 90 kctl wait --for condition=Ready --timeout 5s node -l type=kwok
  wait_for "node $PROCNODE Ready" 90 kctl wait --for condition=Ready --timeout 5s "node/$PROCNODE"
  wait_for "default service account" 60 kctl get serviceaccount default -n default
  wait_for kueue 120 curl -fsS "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz"
  wait_for "Kueue webhooks" 120 kueue_webhooks_ready
  local c
  for c in "${COMPONENTS[@]}"; do alive "$c" || die "$c exited (see $LOGS/$c.log)"; done
  log "up in $((SECONDS - t0))s: source $ST/env  (KUBECONFIG=$ST/kubeconfig)"
}

cmd_down() {
  local c p i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c="${COMPONENTS[$i]}"; p="$(pid_of "$c")"
    [[ -n "$p" ]] || continue
    if kill -0 "$p" 2>/dev/null; then
      log "stopping $c ($p)"
      kill -TERM "$p" 2>/dev/null || true
      for ((n = 0; n < 40 && $(kill -0 "$p" 2>/dev/null && echo 1 || echo 0); n++)); do sleep 0.25; done
      kill -KILL "$p" 2>/dev/null || true
    fi
    rm -f "$PIDS/$c.pid"
  done
  # keep the logs for post-mortems, drop everything else
  if [[ -d "$ST" ]]; then
    find "$ST" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  fi
  log "down"
}

# stop NAME: SIGTERM the component, SIGKILL after 10 s; waits until it is gone
stop() {
  local c="$1" p n
  p="$(pid_of "$c")"
  [[ -n "$p" ]] || return 0
  if kill -0 "$p" 2>/dev/null; then
    log "stopping $c ($p)"
    kill -TERM "$p" 2>/dev/null || true
    for ((n = 0; n < 40 && $(kill -0 "$p" 2>/dev/null && echo 1 || echo 0); n++)); do sleep 0.25; done
    kill -KILL "$p" 2>/dev/null || true
    for ((n = 0; n < 40 && $(kill -0 "$p" 2>/dev/null && echo 1 || echo 0); n++)); do sleep 0.25; done
  fi
  rm -f "$PIDS/$c.pid"
}

# restart kube-apiserver: stop it and start it again on the same port, state and certificates
# (a fault drill: clients see connection refused, then the same apiserver, watches must re-list)
cmd_restart() {
  case "${1:-}" in
    kube-apiserver)
      alive kube-apiserver || die "kube-apiserver is not running (scripts/cluster.sh up)"
      bindirs
      stop kube-apiserver
      start_apiserver
      wait_for kube-apiserver 120 curl_api /readyz ;;
    kube-controller-manager)  # e.g. with other COPD_CM_API_QPS/COPD_CM_API_BURST
      alive kube-controller-manager || die "kube-controller-manager is not running (scripts/cluster.sh up)"
      bindirs
      stop kube-controller-manager
      start_controller_manager
      wait_for kube-controller-manager 90 healthz "$CM_PORT" ;;
    kwok)  # e.g. with another COPD_KWOK_POD_PARALLELISM
      alive kwok || die "kwok is not running (scripts/cluster.sh up)"
      bindirs
      stop kwok
      start_kwok
      wait_for kwok 60 curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz" ;;
    *) die "usage: $0 restart kube-apiserver|kube-controller-manager|kwok" ;;
  esac
  log "$1 restarted"
}

cmd_status() {
  local c rc=0 health
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then health="running (pid $(pid_of "$c"))"; else health="NOT running"; rc=1; fi
    printf '%-24s %s\n' "$c" "$health"
  done
  if [[ -f "$ST/kubeconfig" ]] && curl_api /readyz >/dev/null 2>&1; then
    echo "apiserver                $API ready"
    bindirs
    kctl get nodes -o wide 2>/dev/null || true
  else
    echo "apiserver                not ready"; rc=1
  fi
  if curl -fsS "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null 2>&1; then
    echo "prometheus               http://127.0.0.1:$PROM_PORT ready"
  else
    echo "prometheus               not ready"; rc=1
  fi
  if curl -fsS "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null 2>&1; then
    echo "kueue                    webhooks https://127.0.0.1:$KUEUE_PORT ready"
  else
    echo "kueue                    not ready"; rc=1
  fi
  if curl -fsS "http://127.0.0.1:$AM_PORT/-/ready" >/dev/null 2>&1; then
    echo "alertmanager             http://127.0.0.1:$AM_PORT ready"
  else
    echo "alertmanager             not ready"; rc=1
  fi
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  target) shift; cmd_target "$@" ;;
  restart) shift; cmd_restart "$@" ;;
  *) echo "usage: $0 up|down|status|target|restart" >&2; exit 2 ;;
esac
