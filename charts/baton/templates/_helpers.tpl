{{/* Names are cut to 63 characters (the DNS label limit), without a trailing dash. */}}
{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "baton.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "baton.labels" -}}
helm.sh/chart: {{ include "baton.chart" . }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: baton
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "baton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "baton.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- /* Never the namespace's "default" ServiceAccount: every pod there that names none would get the operator's
      cluster-wide rights. */ -}}
{{- required "serviceAccount.name: with serviceAccount.create=false, name the existing ServiceAccount the operator runs as (the chart binds its roles to it)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "baton.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The names of a list of imagePullSecrets ({name: ...}), comma-separated (BATON_IMAGE_PULL_SECRETS). */}}
{{- define "baton.pullSecretNames" -}}
{{- $names := list -}}
{{- range . -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{/* Cluster-wide unless namespaces are listed. */}}
{{- define "baton.clusterWide" -}}
{{- if not .Values.watch.namespaces -}}true{{- end -}}
{{- end -}}

{{- define "baton.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{- define "baton.peeringName" -}}
{{- default (include "baton.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/*
What the operator does in every namespace it serves, derived from the code (operator/baton/operator/;
tests/unit/test_chart.py re-derives it and fails when the code and these rules drift apart):
- disaggregatedmodels: read and watch (Kube.get, kopf's watch); patch the main resource only for
  kopf's finalizer housekeeping (Baton never writes a spec; tests/cluster/test_gitops.py checks the
  audit log); patch status (Kube.patch_status).
- the kinds it renders: read (Kube.get on a cache miss), watch (kopf's child watches), patch and
  create (Kube.apply is a server-side apply PATCH, and the API server also checks `create` when an
  apply creates the object). Never update (PUT). Delete only what a finished rollout
  retires (the old generation's StatefulSets and engine ConfigMaps). Children are otherwise removed
  by the garbage collector through their ownerReferences.
- pods: get/list/watch (kopf's label-filtered watch, the rollout's pod addresses); endpointslices:
  not read by the operator itself, but the scheduler Role it creates grants get/list/watch on pods
  and endpointslices, and Kubernetes lets it create and bind that Role only if it holds the same
  permissions itself (RBAC escalation prevention), so it holds exactly those.
- disaggregatedmodels/finalizers: update, never called: children's ownerReferences set
  blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift)
  allows only to those who may update the owner's finalizers.
- events: create (Baton's own Events and kopf's warnings; both post core/v1 Events), patch (a repeat of
  one of Baton's Events within 10 minutes counts on it rather than posting another), list (a StatefulSet
  that cannot create its pods says why only in its FailedCreate Events).
*/}}
{{- define "baton.operatorRules" -}}
- apiGroups: [serving.baton.dev]
  resources: [disaggregatedmodels]
  verbs: [get, list, watch, patch]
- apiGroups: [serving.baton.dev]
  resources: [disaggregatedmodels/status]
  verbs: [patch]
- apiGroups: [serving.baton.dev]
  resources: [disaggregatedmodels/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [statefulsets/scale]
  verbs: [patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch]
{{- if .Values.operator.disruptionBudgets }}
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
{{- end }}
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch, list]
{{- end -}}

{{/*
Read-only and cluster-wide whatever the mode: a rollout checks that the GPUs it needs are free, which
takes every node and every pod in the cluster (pods of other namespaces hold GPUs too).
*/}}
{{- define "baton.capacityRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [list]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
{{- end -}}

{{/* "<fullname>-<suffix>" within 63 characters: the full name is cut to 55 first. Call with (list . "suffix"). */}}
{{- define "baton.suffixed" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "baton.fullname" $root | trunc 55 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{/*
A Prometheus duration (30s, 1m30s, 500ms, 1h) in whole seconds, rounded up.
*/}}
{{- define "baton.seconds" -}}
{{- $ms := 0 -}}
{{- range $part := regexFindAll "[0-9]+(ms|s|m|h)" . -1 -}}
{{- $digits := regexFind "^[0-9]+" $part -}}
{{- $n := atoi $digits -}}
{{- $unit := trimPrefix $digits $part -}}
{{- $ms = add $ms (mul $n (get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit)) -}}
{{- end -}}
{{- div (add $ms 999) 1000 -}}
{{- end -}}
