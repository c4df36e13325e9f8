{{- define "copd-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "copd-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "copd-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "copd-operator.serviceAccountName" -}}
{{- default (include "copd-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "copd-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "copd-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- /* Namespaces that get a Role (namespaced mode) / a trainer ServiceAccount. */ -}}
{{- define "copd-operator.trainerNamespaces" -}}
{{- $ns := list -}}
{{- if not .Values.watch.allNamespaces -}}{{- $ns = concat $ns .Values.watch.namespaces -}}{{- end -}}
{{- $ns = concat $ns .Values.trainer.extraNamespaces | uniq -}}
{{- toJson $ns -}}
{{- end -}}

{{- define "copd-operator.monitoring" -}}
{{- if or (not .Values.requireMonitoringCRDs) (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}true{{- end -}}
{{- end -}}

{{- /*
RBAC rules, split by scope. Together they are exactly operator/deploy/rbac.yaml's ClusterRole
(tests/helm/test_chart.py checks it); "namespaces" is only needed for --all-namespaces.
*/ -}}
{{- define "copd-operator.clusterScopedRules" -}}
# kopf: discover and watch the CRDs
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
# an unknown spec.trainer.priorityClassName fails the run with a clear message
- apiGroups: [scheduling.k8s.io]
  resources: [priorityclasses]
  verbs: [get]
# queued runs (label kueue.x-k8s.io/queue-name): the priority of their Kueue Workloads
- apiGroups: [kueue.x-k8s.io]
  resources: [workloadpriorityclasses]
  verbs: [get]
{{- end -}}

{{- define "copd-operator.namespaceRules" -}}
# kopf --all-namespaces watches namespaces
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- end -}}

{{- define "copd-operator.namespacedRules" -}}
# the runs: read spec, write status; Branch children: full lifecycle (owned by the run)
- apiGroups: [copd.io]
  resources: [copdruns]
  verbs: [get, list, watch]
- apiGroups: [copd.io]
  resources: [copdruns/status]
  verbs: [get, update, patch]
- apiGroups: [copd.io]
  resources: [branches]
  verbs: [get, list, watch, create, patch]
- apiGroups: [copd.io]
  resources: [branches/status]
  verbs: [get, update, patch]
# trainer/diagnose/merge Jobs; the hub pod and Service; pods are read for termination messages.
# Every child kind is listed and watched (label copd.io/run, server-side) into the operator's index
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, delete]
# the run's claim: patch moves its owner reference when spec.storage.retainPolicy changes
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create, patch]
# the hub's NetworkPolicy (one per run, owned by it)
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# queued runs: one Kueue Workload per stage (owned by the run); the operator is its job integration:
# it releases an evicted Workload's quota once the stage's pods are gone and marks finished stages
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch, create, patch]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads/status]
  verbs: [get, patch]
- apiGroups: [kueue.x-k8s.io]
  resources: [localqueues]
  verbs: [get]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}
