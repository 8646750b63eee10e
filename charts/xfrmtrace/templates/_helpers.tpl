{{/* The chart name, truncated to the 63 characters a label value allows. */}}
{{- define "xfrmtrace.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every object: the release name, prefixed with the chart name unless the
release name already contains it ("xfrmtrace" rather than "xfrmtrace-xfrmtrace").
*/}}
{{- define "xfrmtrace.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "xfrmtrace-0.1.0", for the helm.sh/chart label ("+" is not allowed in labels). */}}
{{- define "xfrmtrace.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "xfrmtrace.labels" -}}
helm.sh/chart: {{ include "xfrmtrace.chart" . }}
{{ include "xfrmtrace.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the DaemonSet's pods: never change them, a selector is immutable. */}}
{{- define "xfrmtrace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xfrmtrace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "xfrmtrace.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "xfrmtrace.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image, its tag defaulting to the chart's appVersion. */}}
{{- define "xfrmtrace.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Whether the tool setns()es into the namespaces under /run/netns (needs SYS_ADMIN). */}}
{{- define "xfrmtrace.followsNamespaces" -}}
{{- if and .Values.xfrmState.enabled .Values.xfrmState.allNamespaces }}true{{ end }}
{{- end }}

{{/* Whether the node's log directory is mounted (file or pcapng output). */}}
{{- define "xfrmtrace.logDir" -}}
{{- if or .Values.output.file.enabled .Values.output.pcap.enabled }}true{{ end }}
{{- end }}

{{/* The Service is needed by a ServiceMonitor, or asked for on its own. */}}
{{- define "xfrmtrace.service" -}}
{{- if and .Values.metrics.enabled (or .Values.metrics.service.enabled .Values.metrics.serviceMonitor.enabled) }}
{{- if eq .Values.metrics.exposure "localhost" }}
{{- fail "metrics.exposure=localhost cannot be scraped through a Service: disable metrics.service and metrics.serviceMonitor, or listen on the node" }}
{{- end }}true
{{- end }}
{{- end }}

{{/*
Where the tool's metrics endpoint listens, HOST:PORT: the node IP (hostNetwork: the pod IP
is the node's), or 127.0.0.1 (metrics.exposure=localhost; and kubeRbacProxy, where the proxy
listens on the node IP and the tool on its own port behind it).
*/}}
{{- define "xfrmtrace.metricsListen" -}}
{{- if eq .Values.metrics.exposure "node" }}$(POD_IP):{{ .Values.metrics.port | int64 }}
{{- else if eq .Values.metrics.exposure "localhost" }}127.0.0.1:{{ .Values.metrics.port | int64 }}
{{- else }}127.0.0.1:{{ include "xfrmtrace.rbacProxyUpstreamPort" . }}
{{- end }}
{{- end }}

{{/* "true" when kube-rbac-proxy fronts the metrics. */}}
{{- define "xfrmtrace.rbacProxy" -}}
{{- if and .Values.metrics.enabled (eq .Values.metrics.exposure "kubeRbacProxy") }}true{{ end }}
{{- end }}

{{- define "xfrmtrace.rbacProxyUpstreamPort" -}}
{{- $port := .Values.metrics.kubeRbacProxy.internalPort | int64 }}
{{- if eq $port (.Values.metrics.port | int64) }}
{{- fail "metrics.kubeRbacProxy.internalPort must differ from metrics.port: the proxy listens on metrics.port" }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
A string-or-number value as a command-line argument.  YAML reads `mark: 0xd00` or an inode
number as a number, which helm holds as a float and would print as 3.328e+03: whole numbers
are printed as integers, fractions (output.file.maxSizeMiB: 0.5) as they are, and strings
(`--set` passes 0.5 as one) unchanged.
*/}}
{{- define "xfrmtrace.arg" -}}
{{- if kindIs "string" . }}{{ . }}
{{- else if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/* The Secret holding the key fingerprint secret: the user's, or the one the chart makes. */}}
{{- define "xfrmtrace.fingerprintSecret" -}}
{{- default (printf "%s-key-fingerprint" (include "xfrmtrace.fullname" .)) .Values.keyFingerprint.existingSecret }}
{{- end }}
