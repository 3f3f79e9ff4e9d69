{{/* Labels shared by every object of the chart. */}}
{{- define "troupe-serving.labels" -}}
app.kubernetes.io/name: troupe-serving
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: troupe
{{- end }}

{{- define "troupe-serving.selectorLabels" -}}
app.kubernetes.io/name: troupe-serving
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The selected accelerator profile; fails naming the setting when unknown. */}}
{{- define "troupe-serving.accelerator" -}}
{{- $acc := index .Values.accelerators .Values.accelerator -}}
{{- if not $acc -}}
{{- fail (printf "accelerator=%q is not a key of accelerators (cpu | nvidia | ascend): set accelerator" .Values.accelerator) -}}
{{- end -}}
{{- toYaml $acc -}}
{{- end }}

{{- define "troupe-serving.validate" -}}
{{- if and (not .Values.aws.roleArn) (not .Values.aws.existingSecret) -}}
{{- fail "no AWS credentials: set aws.roleArn (IRSA) or aws.existingSecret (Secret name)" -}}
{{- end -}}
{{- if and .Values.apiKeys.required (not .Values.apiKeys.existingSecret) -}}
{{- fail "apiKeys.existingSecret is empty while apiKeys.required is true: create a Secret with the SHA-256 hashes of the accepted API keys (kubectl create secret generic troupe-serving-api-keys --from-file=api_keys_sha256=hashes.txt) and set apiKeys.existingSecret" -}}
{{- end -}}
{{- $w := .Values.app.canaryWeightPercent | float64 -}}
{{- if or (lt $w 0.0) (gt $w 100.0) -}}
{{- fail (printf "app.canaryWeightPercent=%v is outside 0-100 (percent of conversations)" .Values.app.canaryWeightPercent) -}}
{{- end -}}
{{- end }}

{{/* Serve application name of the environment (serving.contract.app_name). */}}
{{- define "troupe-serving.appName" -}}
troupe-{{ .Values.environment }}
{{- end }}

{{/* File the app reads the accepted API key hashes from ("" without a Secret). */}}
{{- define "troupe-serving.apiKeysFile" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{ trimSuffix "/" .Values.apiKeys.mountPath }}/{{ .Values.apiKeys.secretKey }}
{{- end -}}
{{- end }}

{{/* Container fields shared by all Ray containers (image is set per group). */}}
{{- define "troupe-serving.containerCommon" -}}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
env:
  - name: TROUPE_ENV
    value: {{ .Values.environment | quote }}
  - name: MLFLOW_TRACKING_URI
    value: {{ .Values.app.mlflowTrackingUri | quote }}
  - name: AWS_DEFAULT_REGION
    value: {{ .Values.aws.region | quote }}
  {{- with .Values.app.feedback.existingSecret }}
  - name: TROUPE_FEEDBACK_DB_URL
    valueFrom:
      secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.app.feedback.secretKey | quote }}}
  {{- end }}
{{- if or .Values.aws.existingSecret .Values.mlflow.existingSecret }}
envFrom:
  {{- with .Values.aws.existingSecret }}
  - secretRef:
      name: {{ . }}
  {{- end }}
  {{- with .Values.mlflow.existingSecret }}
  - secretRef:
      name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}
