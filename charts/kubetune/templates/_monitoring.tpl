{{/* Monitoring objects that need the Prometheus Operator's CRDs (ServiceMonitor, PodMonitor,
     PrometheusRule) render only when the cluster serves monitoring.coreos.com/v1
     (`.Capabilities.APIVersions`): without the CRDs they are skipped and NOTES.txt says which
     were asked for and skipped, so an install never fails half-way on an unknown kind. With
     `helm template` pass `--api-versions monitoring.coreos.com/v1` (Argo CD passes the
     cluster's own list). */}}
{{- define "kubetune.hasPrometheusOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/* The monitoring values that are on but cannot render for lack of the CRDs. */}}
{{- define "kubetune.skippedMonitoring" -}}
{{- if not (include "kubetune.hasPrometheusOperator" .) -}}
{{- $skipped := list -}}
{{- if .Values.metrics.serviceMonitor.enabled -}}{{- $skipped = append $skipped "metrics.serviceMonitor.enabled" -}}{{- end -}}
{{- if .Values.metrics.servingMonitor.enabled -}}{{- $skipped = append $skipped "metrics.servingMonitor.enabled" -}}{{- end -}}
{{- if .Values.metrics.rules.enabled -}}{{- $skipped = append $skipped "metrics.rules.enabled" -}}{{- end -}}
{{- join ", " $skipped -}}
{{- end -}}
{{- end -}}

{{/* The `groups` of rules/alerts.yaml, the alert rules' one copy, with each placeholder replaced
     by its value from metrics.rules. Placeholders rather than `tpl`: the annotations are
     Prometheus templates ({{ $labels.job }}), which `tpl` would try to run. */}}
{{- define "kubetune.alertRules" -}}
{{- $rules := .Values.metrics.rules -}}
{{- $text := .Files.Get "rules/alerts.yaml" -}}
{{- $values := dict
      "JOB_STALLED_SECONDS" (mul (int $rules.jobStalledMinutes) 60)
      "JOB_STALLED_MINUTES" (int $rules.jobStalledMinutes)
      "SERVER_ERROR_RATIO" $rules.serverErrorRatio
      "TTFT_P95_SECONDS" $rules.timeToFirstTokenP95Seconds
      "REQUESTS_WAITING" (int $rules.requestsWaiting)
      "REQUESTS_WAITING_MINUTES" (int $rules.requestsWaitingMinutes) -}}
{{- range $name, $value := $values -}}
{{- $text = replace (printf "${%s}" $name) (toString $value) $text -}}
{{- end -}}
{{- if contains "${" $text -}}
{{- fail (printf "rules/alerts.yaml has a placeholder kubetune.alertRules does not fill: %s" (regexFind "\\$\\{[A-Z_]*\\}" $text)) -}}
{{- end -}}
{{- $parsed := fromYaml $text -}}
{{- if hasKey $parsed "Error" -}}
{{- fail (printf "rules/alerts.yaml is not YAML: %s" $parsed.Error) -}}
{{- end -}}
{{- toYaml (pick $parsed "groups") -}}
{{- end -}}

{{/* The namespaces the inference pods run in, for the PodMonitor's namespaceSelector:
     metrics.servingMonitor.namespaces, else watch.namespaces; empty means every namespace. */}}
{{- define "kubetune.servingNamespaces" -}}
{{- toJson (.Values.metrics.servingMonitor.namespaces | default .Values.watch.namespaces) -}}
{{- end -}}
