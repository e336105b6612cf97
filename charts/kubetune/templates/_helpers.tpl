{{/* Names, labels and image references shared by the templates. */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* `<release>-<chart>`, or the release name alone when it already holds the chart name. */}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.operatorName" -}}
{{- printf "%s-operator" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.operatorServiceAccount" -}}
{{- default (include "kubetune.operatorName" .) .Values.operator.serviceAccount.name -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.labels" -}}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. The schema already refuses
     `latest`; this guards values that bypass it (e.g. --skip-schema-validation). */}}
{{- define "kubetune.image" -}}
{{- $image := .image -}}
{{- $repository := $image.repository -}}
{{- $tag := $image.tag -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- if or (not $tag) (eq (toString $tag) "latest") -}}
{{- fail (printf "%s.image.tag must be a pinned version (got %q): KubeTune never pulls latest" .what (toString $tag)) -}}
{{- end -}}
{{- printf "%s:%s" $repository (toString $tag) -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.image" (dict "image" .Values.operator.image "what" "operator") -}}
{{- end -}}

{{- define "kubetune.trainerImage" -}}
{{- include "kubetune.image" (dict "image" .Values.trainer.image "what" "trainer") -}}
{{- end -}}

{{/* The serving image is the trainer image unless serving.image.repository is set. */}}
{{- define "kubetune.servingImage" -}}
{{- if .Values.serving.image.repository -}}
{{- include "kubetune.image" (dict "image" .Values.serving.image "what" "serving") -}}
{{- else -}}
{{- include "kubetune.trainerImage" . -}}
{{- end -}}
{{- end -}}
