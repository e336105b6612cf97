{{/* Refusals of values that each pass values.schema.json but contradict another value:
     without them the chart renders objects the API server refuses, or objects that install
     and silently do the wrong thing. deployment.yaml includes this, so every render runs it.
     Each message names the values involved and what to set instead. */}}
{{- define "kubetune.validate" -}}
{{- include "kubetune.validateWorkloadAccounts" . -}}
{{- include "kubetune.validateServiceMonitor" . -}}
{{- include "kubetune.validateServingMonitor" . -}}
{{- end -}}

{{/* Namespaced mode renders the trainer and serving ServiceAccounts in every watched
     namespace (serviceaccounts.yaml); cluster-wide they are neither rendered nor named. */}}
{{- define "kubetune.validateWorkloadAccounts" -}}
{{- if .Values.watch.namespaces -}}
{{- $trainer := .Values.trainer.serviceAccount -}}
{{- $serving := .Values.serving.serviceAccount -}}
{{- range $workload, $sa := dict "trainer" $trainer "serving" $serving -}}
{{- if and $sa.create (not $sa.name) -}}
{{- fail (printf "%s.serviceAccount.create is true but %s.serviceAccount.name is empty: name the ServiceAccount to create, or set %s.serviceAccount.create=false to run %s pods as each namespace's default ServiceAccount" $workload $workload $workload $workload) -}}
{{- end -}}
{{- end -}}
{{- if and $trainer.create $serving.create (eq $trainer.name $serving.name) -}}
{{- fail (printf "trainer.serviceAccount.name and serving.serviceAccount.name are both %q and both have create: true, so the chart would render that ServiceAccount twice in each namespace: to share one, set serving.serviceAccount.create=false; otherwise give them different names" $trainer.name) -}}
{{- end -}}
{{- /* The operator's ServiceAccount holds its RBAC: pods in the release namespace that run
       under its name would get the operator's rights (and, created, it would render twice). */ -}}
{{- if has .Release.Namespace .Values.watch.namespaces -}}
{{- $operator := include "kubetune.operatorServiceAccount" . -}}
{{- range $workload, $sa := dict "trainer" $trainer "serving" $serving -}}
{{- if eq $sa.name $operator -}}
{{- fail (printf "%s.serviceAccount.name is %q, the operator's ServiceAccount (operator.serviceAccount.name, or <fullname>-operator when empty), and the release namespace %s is watched: %s pods there would run with the operator's rights. Give them a ServiceAccount of their own" $workload $sa.name $.Release.Namespace $workload) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A ServiceMonitor scrapes the operator pod's progress port, which the chart's NetworkPolicy
     opens only to trainer pods and networkPolicy.metricsFrom. */}}
{{- define "kubetune.validateServiceMonitor" -}}
{{- $monitor := .Values.metrics.serviceMonitor -}}
{{- if $monitor.enabled -}}
{{- if and .Values.networkPolicy.enabled (empty .Values.networkPolicy.metricsFrom) -}}
{{- fail "metrics.serviceMonitor.enabled is true but networkPolicy.metricsFrom is empty while networkPolicy.enabled is true: the NetworkPolicy would drop every scrape. List your Prometheus pods in networkPolicy.metricsFrom (e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]), or set networkPolicy.enabled=false" -}}
{{- end -}}
{{- $timeout := include "kubetune.durationMilliseconds" $monitor.scrapeTimeout | int64 -}}
{{- $interval := include "kubetune.durationMilliseconds" $monitor.interval | int64 -}}
{{- if gt $timeout $interval -}}
{{- fail (printf "metrics.serviceMonitor.scrapeTimeout (%q) is longer than metrics.serviceMonitor.interval (%q): Prometheus refuses such a scrape configuration" (toString $monitor.scrapeTimeout) (toString $monitor.interval)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The PodMonitor scrapes the inference pods' port, which serving.networkPolicy opens only to
     serving.networkPolicy.from and networkPolicy.metricsFrom. */}}
{{- define "kubetune.validateServingMonitor" -}}
{{- $monitor := .Values.metrics.servingMonitor -}}
{{- if $monitor.enabled -}}
{{- if and .Values.serving.networkPolicy.enabled (empty .Values.networkPolicy.metricsFrom) -}}
{{- fail "metrics.servingMonitor.enabled is true but networkPolicy.metricsFrom is empty while serving.networkPolicy.enabled is true: the inference pods' NetworkPolicy would drop every scrape. List your Prometheus pods in networkPolicy.metricsFrom, or set serving.networkPolicy.enabled=false" -}}
{{- end -}}
{{- $timeout := include "kubetune.durationMilliseconds" $monitor.scrapeTimeout | int64 -}}
{{- $interval := include "kubetune.durationMilliseconds" $monitor.interval | int64 -}}
{{- if gt $timeout $interval -}}
{{- fail (printf "metrics.servingMonitor.scrapeTimeout (%q) is longer than metrics.servingMonitor.interval (%q): Prometheus refuses such a scrape configuration" (toString $monitor.scrapeTimeout) (toString $monitor.interval)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A duration the schema allows (`<digits>ms|s|m|h`) in milliseconds. */}}
{{- define "kubetune.durationMilliseconds" -}}
{{- $text := toString . -}}
{{- $number := regexFind "^[0-9]+" $text -}}
{{- $unit := trimPrefix $number $text -}}
{{- $scale := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit -}}
{{- if not $scale -}}
{{- fail (printf "%q is not a duration like 10s, 500ms, 1m or 1h" $text) -}}
{{- end -}}
{{- mul (int64 $number) $scale -}}
{{- end -}}
