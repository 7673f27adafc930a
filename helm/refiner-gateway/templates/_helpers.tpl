{{/*
Names and labels.
*/}}
{{- define "refiner-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "refiner-gateway.fullname" -}}
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

{{- define "refiner-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "refiner-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "refiner-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "refiner-gateway.labels" -}}
helm.sh/chart: {{ include "refiner-gateway.chart" . }}
{{ include "refiner-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "refiner-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "refiner-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "refiner-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret holding the keys: the existing one, or the chart's. */}}
{{- define "refiner-gateway.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- include "refiner-gateway.fullname" . }}
{{- end }}
{{- end }}

{{/* Where the spool lives inside the container. */}}
{{- define "refiner-gateway.dataDir" -}}
/var/lib/refiner-gateway
{{- end }}

{{/*
The gateway's settings file. `.Values.config` is written as TOML by hand rather than with
toToml, which prints every number as a float (30 → 30.0) and the gateway refuses floats
where it expects whole numbers. `listen` and `data_dir` are set by the chart.
*/}}
{{- define "refiner-gateway.toml.value" -}}
{{- $kind := kindOf . -}}
{{- if eq $kind "string" -}}
{{ toJson . }}
{{- else if eq $kind "bool" -}}
{{ . }}
{{- else if or (eq $kind "float64") (eq $kind "int") (eq $kind "int64") -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if eq $kind "slice" -}}
[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "refiner-gateway.toml.value" $e }}{{ end }}]
{{- else -}}
{{ fail (printf "config: cannot write %v (%s) as a TOML value" . $kind) }}
{{- end -}}
{{- end }}

{{- define "refiner-gateway.toml" -}}
{{- $config := mergeOverwrite (deepCopy (.Values.config | default dict)) (dict "listen" (printf "0.0.0.0:%d" (int .Values.containerPort)) "data_dir" (include "refiner-gateway.dataDir" .)) -}}
# Rendered by the refiner-gateway chart from .Values.config; see docs/configuration.md.
{{- range $key := keys $config | sortAlpha }}
{{- $value := get $config $key }}
{{- if not (kindIs "map" $value) }}
{{ $key }} = {{ include "refiner-gateway.toml.value" $value }}
{{- end }}
{{- end }}
{{- range $section := keys $config | sortAlpha }}
{{- $table := get $config $section }}
{{- if kindIs "map" $table }}
{{ printf "\n[%s]" $section }}
{{- range $key := keys $table | sortAlpha }}
{{ $key }} = {{ include "refiner-gateway.toml.value" (get $table $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod template shared by the StatefulSet (embedded spool) and the Deployment (NATS). */}}
{{- define "refiner-gateway.podTemplate" -}}
metadata:
  labels:
    {{- include "refiner-gateway.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "refiner-gateway.toml" . | sha256sum }}
    {{- if and (not .Values.existingSecret) .Values.secret.create }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "refiner-gateway.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  containers:
    - name: gateway
      image: {{ include "refiner-gateway.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - serve
        - --config
        - /etc/refiner-gateway/gateway.toml
      ports:
        - name: http
          containerPort: {{ .Values.containerPort }}
          protocol: TCP
      env:
        - name: GATEWAY_WRITE_KEYS
          valueFrom:
            secretKeyRef:
              name: {{ include "refiner-gateway.secretName" . }}
              key: {{ .Values.secretKeys.writeKeys }}
              optional: true
        - name: GATEWAY_WEBHOOK_SECRET
          valueFrom:
            secretKeyRef:
              name: {{ include "refiner-gateway.secretName" . }}
              key: {{ .Values.secretKeys.webhookSecret }}
              optional: true
        - name: GATEWAY_WEBHOOK_FORMAT
          value: {{ .Values.webhookFormat | quote }}
        - name: REFINER_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "refiner-gateway.secretName" . }}
              key: {{ .Values.secretKeys.refinerApiKey }}
              optional: true
        - name: GATEWAY_ADMIN_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "refiner-gateway.secretName" . }}
              key: {{ .Values.secretKeys.adminToken }}
              optional: true
        - name: GATEWAY_METRICS_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "refiner-gateway.secretName" . }}
              key: {{ .Values.secretKeys.metricsToken }}
              optional: true
        {{- if eq .Values.spool.backend "nats" }}
        - name: GATEWAY_SPOOL
          value: nats
        - name: GATEWAY_NATS_URL
          value: {{ .Values.spool.nats.url | quote }}
        - name: GATEWAY_NATS_REPLICAS
          value: {{ .Values.spool.nats.replicas | quote }}
        - name: GATEWAY_NATS_PARTITIONS
          value: {{ .Values.spool.nats.partitions | quote }}
        - name: GATEWAY_NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- if .Values.spool.nats.tokenSecret }}
        - name: GATEWAY_NATS_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ .Values.spool.nats.tokenSecret }}
              key: {{ .Values.spool.nats.tokenKey }}
        {{- end }}
        {{- if .Values.spool.nats.credentialsSecret }}
        - name: GATEWAY_NATS_CREDS
          value: /etc/refiner-gateway/nats/creds
        {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.startupProbe }}
      startupProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/refiner-gateway
          readOnly: true
        - name: data
          mountPath: {{ include "refiner-gateway.dataDir" . }}
        - name: tmp
          mountPath: /tmp
        {{- if and (eq .Values.spool.backend "nats") .Values.spool.nats.credentialsSecret }}
        - name: nats-creds
          mountPath: /etc/refiner-gateway/nats
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      {{- if .Values.existingConfigSecret }}
      secret:
        secretName: {{ .Values.existingConfigSecret }}
        items:
          - key: gateway.toml
            path: gateway.toml
      {{- else }}
      configMap:
        name: {{ include "refiner-gateway.fullname" . }}
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- if eq .Values.spool.backend "nats" }}
    - name: data
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- if .Values.spool.nats.credentialsSecret }}
    - name: nats-creds
      secret:
        secretName: {{ .Values.spool.nats.credentialsSecret }}
        items:
          - key: {{ .Values.spool.nats.credentialsKey }}
            path: creds
    {{- end }}
    {{- else if .Values.persistence.existingClaim }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim }}
    {{- else if not .Values.persistence.enabled }}
    - name: data
      emptyDir: {}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
