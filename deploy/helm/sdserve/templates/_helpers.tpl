{{- define "sdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: api, worker, redis. */}}
{{- define "sdserve.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sdserve.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* checkov findings this chart accepts by design, each with its reason (annotations on the workload). */}}
{{- define "sdserve.checkovSkips" -}}
checkov.io/skip1: CKV_K8S_43=Pinned by tag so that upgrades can change it; set image.digest to pin by digest
checkov.io/skip2: CKV_K8S_35=boto3 reads AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment; prefer IRSA or workload identity, which need no secret
{{- end -}}

{{- define "sdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "sdserve.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "sdserve.redisHost" -}}
{{- if .Values.redis.enabled -}}{{ include "sdserve.fullname" . }}-redis{{- else -}}{{ required "redis.host is required when redis.enabled is false" .Values.redis.host }}{{- end -}}
{{- end -}}

{{/* The queue URL; the password comes from the pod's SDSERVE_REDIS_PASSWORD through Kubernetes' $(VAR) expansion. */}}
{{- define "sdserve.queueURL" -}}
{{ ternary "rediss" "redis" .Values.redis.tls }}://{{ if .Values.redis.passwordSecret.name }}:$(SDSERVE_REDIS_PASSWORD)@{{ end }}{{ include "sdserve.redisHost" . }}:{{ .Values.redis.port }}/{{ .Values.redis.database }}
{{- end -}}

{{/* KEDA's stream: the same prefix the pods get as SDSERVE_QUEUE_PREFIX, and the stream's name in sdserve. */}}
{{- define "sdserve.demandStream" -}}
{{ .Values.queuePrefix }}demand
{{- end -}}

{{- define "sdserve.s3Secret" -}}
{{- if .Values.storage.existingSecret -}}{{ .Values.storage.existingSecret }}{{- else if .Values.storage.accessKeyId -}}{{ include "sdserve.fullname" . }}-s3{{- end -}}
{{- end -}}

{{/* What the api and the worker share: the queue, the store, their credentials, the limits. */}}
{{- define "sdserve.env" -}}
{{- if .Values.redis.passwordSecret.name }}
- name: SDSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.redis.passwordSecret.name }}, key: {{ .Values.redis.passwordSecret.key }}}
{{- end }}
- name: SDSERVE_QUEUE
  value: {{ include "sdserve.queueURL" . | quote }}
- name: SDSERVE_QUEUE_PREFIX
  value: {{ .Values.queuePrefix | quote }}
- name: SDSERVE_STORAGE
  value: {{ required "storage.url is required" .Values.storage.url | quote }}
- name: SDSERVE_IMAGE_URL_TTL_S
  value: {{ .Values.storage.urlTtlSeconds | quote }}
- name: SDSERVE_JOB_TIMEOUT_S
  value: {{ .Values.jobTimeoutSeconds | quote }}
{{- with include "sdserve.s3Secret" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
{{- end -}}

{{- define "sdserve.volumes" -}}
- name: data
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "sdserve.volumeMounts" -}}
- name: data
  mountPath: /data
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Where clients reach the API: api.publicUrl, else the ingress's host. Absolute links (OpenAI's url) start with it,
never with a request's Host header. */}}
{{- define "sdserve.publicUrl" -}}
{{- if .Values.api.publicUrl -}}{{ .Values.api.publicUrl }}
{{- else if .Values.api.ingress.enabled -}}{{ if .Values.api.ingress.tlsSecret }}https{{ else }}http{{ end }}://{{ .Values.api.ingress.host }}
{{- end -}}
{{- end -}}

{{/* Host headers the API answers (others get 400): api.allowedHosts, else the Service's in-cluster names,
the ingress host and loopback (kubectl port-forward). Probes are answered whatever their Host. */}}
{{- define "sdserve.allowedHosts" -}}
{{- if .Values.api.allowedHosts -}}{{ join "," .Values.api.allowedHosts }}
{{- else -}}
{{- $svc := printf "%s-api" (include "sdserve.fullname" .) -}}
{{ $svc }},{{ $svc }}.{{ .Release.Namespace }},{{ $svc }}.{{ .Release.Namespace }}.svc,{{ $svc }}.{{ .Release.Namespace }}.svc.cluster.local,localhost,127.0.0.1{{ if .Values.api.ingress.enabled }},{{ .Values.api.ingress.host }}{{ end }}
{{- end -}}
{{- end -}}
