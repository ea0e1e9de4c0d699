{{- define "llm-mesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llm-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llm-mesh.labels" -}}
{{ include "llm-mesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "llm-mesh.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if and .Values.shards.gpu.enabled (not .Values.image.tag) }}{{ $tag = printf "%s-cuda" $tag }}{{ end -}}
{{ printf "%s:%s" .Values.image.repository $tag }}
{{- end -}}

{{- define "llm-mesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ .Values.serviceAccount.name | default (include "llm-mesh.fullname" .) }}
{{- else -}}{{ .Values.serviceAccount.name | default "default" }}{{- end -}}
{{- end -}}

{{/* Every cache replica's stable address (StatefulSet pod DNS), comma-separated. */}}
{{- define "llm-mesh.cacheAddrs" -}}
{{- $name := include "llm-mesh.fullname" . -}}
{{- $addrs := list -}}
{{- range $i := until (int .Values.cache.replicas) -}}
{{- $addrs = append $addrs (printf "%s-cache-%d.%s-cache.%s.svc:%d" $name $i $name $.Release.Namespace (int $.Values.cache.port)) -}}
{{- end -}}
{{ join "," $addrs }}
{{- end -}}

{{- define "llm-mesh.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: LLMMESH_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- if .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.tracing.otlpEndpoint | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.tracing.samplerRatio | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),service.namespace={{ .Release.Name }}"
{{- else }}
- name: OTEL_TRACES_EXPORTER
  value: none
{{- end }}
{{- end -}}

{{/* Flags of a service that serves mutual TLS to the mesh (clientAuth) or TLS to clients (the gateway). */}}
{{- define "llm-mesh.tlsArgs" -}}
{{- if .root.Values.tls.enabled }}
- --tls-cert=/etc/llm-mesh/tls/tls.crt
- --tls-key=/etc/llm-mesh/tls/tls.key
- --tls-ca=/etc/llm-mesh/tls/ca.crt
{{- if and .clientAuth (not .root.Values.internalAuth.insecure) }}
- --tls-client-auth
{{- end }}
{{- end }}
{{- end -}}

{{/* The internal credential of a mesh service: with TLS its client certificate (tlsArgs), else the
release's internal token, from a Secret into the environment (never the command line). */}}
{{- define "llm-mesh.internalTokenSecret" -}}
{{- .Values.internalAuth.existingSecret | default (printf "%s-internal-token" (include "llm-mesh.fullname" .)) -}}
{{- end -}}

{{- define "llm-mesh.internalAuthEnv" -}}
{{- if .Values.internalAuth.insecure }}
- name: LLMMESH_INSECURE_INTERNAL
  value: "1"
{{- else if not .Values.tls.enabled }}
- name: LLMMESH_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "llm-mesh.internalTokenSecret" . }}
      key: token
{{- end }}
{{- end -}}

{{- define "llm-mesh.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/llm-mesh/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "llm-mesh.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
{{- end }}
{{- end -}}

{{- define "llm-mesh.podAnnotations" -}}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A native gRPC probe on grpc.health.v1 (the whole server's status). */}}
{{- define "llm-mesh.grpcProbes" -}}
readinessProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:  # the process runs; readiness also needs what it depends on (a gateway: a serving shard)
  grpc: {port: {{ .port }}, service: llmmesh.liveness}
  periodSeconds: 10
  failureThreshold: 6
startupProbe:
  grpc: {port: {{ .port }}, service: llmmesh.liveness}
  periodSeconds: 5
  failureThreshold: {{ .startupFailures | default 24 }}
{{- end -}}

{{/* The pod-level scheduling knobs of one component. */}}
{{- define "llm-mesh.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
