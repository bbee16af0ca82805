{{/* Chart name. */}}
{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release-based). */}}
{{- define "loraplex.fullname" -}}
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

{{- define "loraplex.backend.fullname" -}}
{{- printf "%s-backend" (include "loraplex.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplex.gateway.fullname" -}}
{{- printf "%s-gateway" (include "loraplex.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplex.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "loraplex.labels" -}}
helm.sh/chart: {{ include "loraplex.chart" . }}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraplex
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "backend"). */}}
{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraplex.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loraplex.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/* Backend API key Secret name / key. */}}
{{- define "loraplex.backendAuth.secretName" -}}
{{- default (printf "%s-backend-auth" (include "loraplex.fullname" .)) .Values.backendAuth.existingSecret }}
{{- end }}

{{- define "loraplex.gatewayAuth.secretName" -}}
{{- default (printf "%s-gateway-auth" (include "loraplex.fullname" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{/* terminationGracePeriodSeconds of the backend: ceil(gracePeriod) + extra. */}}
{{- define "loraplex.backend.terminationGrace" -}}
{{- add (ceil (float64 .Values.backend.gracePeriod) | int64) (int64 .Values.backend.terminationGraceExtraSeconds) }}
{{- end }}

{{/* One scalar as a CLI string (integral floats print without exponent). */}}
{{- define "loraplex.argValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{/*
A flags map rendered as YAML list items; call with
(dict "args" MAP "reserved" LIST "what" "backend.args").
*/}}
{{- define "loraplex.flags" -}}
{{- $reserved := .reserved }}
{{- range $k, $v := .args }}
{{- $flag := trimPrefix "--" $k }}
{{- if has $flag $reserved }}
{{- fail (printf "%s: flag --%s is set by the chart (or must not be passed as an argument); use the dedicated value" $.what $flag) }}
{{- end }}
{{- if kindIs "invalid" $v }}
{{- else if kindIs "bool" $v }}
{{- if $v }}
- {{ printf "--%s" $flag | quote }}
{{- else }}
- {{ printf "--no-%s" $flag | quote }}
{{- end }}
{{- else if kindIs "slice" $v }}
{{- range $v }}
- {{ printf "--%s" $flag | quote }}
- {{ include "loraplex.argValue" . | quote }}
{{- end }}
{{- else if eq (toString $v) "" }}
{{- else }}
- {{ printf "--%s" $flag | quote }}
- {{ include "loraplex.argValue" $v | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The headless backend Service the gateway resolves (one A/AAAA record per ready pod) when
backends are several: the main Service itself when it is headless, else "<backend>-headless".
*/}}
{{- define "loraplex.backend.headlessName" -}}
{{- if .Values.backend.service.headless -}}
{{- include "loraplex.backend.fullname" . }}
{{- else -}}
{{- printf "%s-headless" (include "loraplex.backend.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* true when the gateway routes across backend pods itself (adapter affinity via --backend-dns). */}}
{{- define "loraplex.gateway.routesPods" -}}
{{- if or (gt (int .Values.backend.replicaCount) 1) .Values.backend.service.headless }}true{{ end }}
{{- end }}
