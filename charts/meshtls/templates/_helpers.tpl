{{/* The release's full name: "meshtls" for `helm install meshtls`, else "<release>-meshtls". */}}
{{- define "meshtls.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meshtls.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "meshtls.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "meshtls.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshtls.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "meshtls.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "meshtls.sidecarImage" -}}
{{- default (include "meshtls.image" .) .Values.sidecarImage -}}
{{- end -}}

{{/* The webhook Service; the operator is told its name (--webhook-service) and puts it in the configuration. */}}
{{- define "meshtls.webhookService" -}}
{{- printf "%s-webhook" (include "meshtls.fullname" .) -}}
{{- end -}}

{{/* Namespaces served (namespaced mode), one per line, without duplicates. */}}
{{- define "meshtls.workloadNamespaces" -}}
{{- if and (not .Values.clusterWide) (empty .Values.workloadNamespaces) -}}
{{- fail "workloadNamespaces is empty: list the namespaces meshtls serves, or set clusterWide=true" -}}
{{- end -}}
{{- range (.Values.workloadNamespaces | uniq) }}
{{ . }}
{{- end -}}
{{- end -}}

{{/*
Namespaces where the operator posts Events: the served ones, its own (kopf's events about cluster-scoped objects
go there when it runs in a pod), and "default" (meshtls's Events about a TrustDomain, which has no namespace).
*/}}
{{- define "meshtls.eventNamespaces" -}}
{{- range (concat .Values.workloadNamespaces (list .Release.Namespace "default") | uniq) }}
{{ . }}
{{- end -}}
{{- end -}}
