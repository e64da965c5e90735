{{/* Labels every object carries. */}}
{{- define "meshlane.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The agent pods' selector (never changes across upgrades). */}}
{{- define "meshlane.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{/*
The agent's image: repository (required: nothing is published), then the
digest if set, else the tag (the chart's appVersion when empty).
*/}}
{{- define "meshlane.image" -}}
{{- $repo := required "image.repository is required: no meshlane image is published. Build deploy/Dockerfile, push it to a registry your nodes can pull from, and install with --set image.repository=REGISTRY/meshlane (deploy/README.md)" .Values.image.repository -}}
{{- if .Values.image.digest -}}
{{ $repo }}@{{ .Values.image.digest }}
{{- else -}}
{{ $repo }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/*
The container port /metrics is served on: its own (metrics.port) unless
metrics.bindAddress is empty, then the probes' port.
*/}}
{{- define "meshlane.metricsPortName" -}}
{{- if .Values.metrics.bindAddress }}metrics{{ else }}http{{ end -}}
{{- end }}

{{- define "meshlane.metricsPort" -}}
{{- if .Values.metrics.bindAddress }}{{ .Values.metrics.port | int64 }}{{ else }}{{ .Values.http.port | int64 }}{{ end -}}
{{- end }}

{{/*
Whether something off the node can scrape /metrics: not when it listens on
loopback only.
*/}}
{{- define "meshlane.metricsScrapable" -}}
{{- if not (hasPrefix "127." (toString .Values.metrics.bindAddress)) }}true{{ end -}}
{{- end }}

{{/*
The container's securityContext.appArmorProfile (Kubernetes 1.30+), unless
appArmor.annotation asks for the annotation form instead: API servers before
1.30 refuse the field (kubectl's strict field validation).
*/}}
{{- define "meshlane.appArmorProfile" -}}
{{- if not .Values.appArmor.annotation -}}
appArmorProfile:
  type: {{ .Values.appArmor.profile }}
  {{- if eq .Values.appArmor.profile "Localhost" }}
  localhostProfile: {{ required "appArmor.localhostProfile is required with appArmor.profile Localhost" .Values.appArmor.localhostProfile }}
  {{- end }}
{{- end }}
{{- end }}
