{{- define "troupe-mlflow.labels" -}}
app.kubernetes.io/name: troupe-mlflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: troupe
{{- end }}

{{- define "troupe-mlflow.selectorLabels" -}}
app.kubernetes.io/name: troupe-mlflow
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
