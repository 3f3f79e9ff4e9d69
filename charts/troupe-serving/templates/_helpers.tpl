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
{{- with .Values.aws.existingSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}
