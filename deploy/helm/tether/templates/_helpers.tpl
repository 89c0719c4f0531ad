{{/* The release's full name, at most 63 characters. */}}
{{- define "tether.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The agent Service's name (read by --publish-address auto). */}}
{{- define "tether.agentService" -}}
{{- printf "%s-agent" (include "tether.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tether.serviceAccount" -}}
{{- default (include "tether.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "tether.stateSecret" -}}
{{- default (printf "%s-state" (include "tether.fullname" .)) .Values.state.existingSecret -}}
{{- end -}}

{{- define "tether.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tether.selectorLabels" -}}
app.kubernetes.io/name: tether-proxy
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tether.labels" -}}
{{ include "tether.selectorLabels" . }}
app.kubernetes.io/part-of: tether
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}
