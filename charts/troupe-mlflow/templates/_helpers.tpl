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

{{- define "troupe-mlflow.image" -}}
{{ .Values.image.repository }}{{ if .Values.image.digest }}@{{ .Values.image.digest }}{{ else }}:{{ .Values.image.tag }}{{ end }}
{{- end }}

{{/*
Host headers MLflow accepts (--allowed-hosts): the Service's names with and without the port,
localhost (kubectl port-forward) and server.extraAllowedHosts. MLflow 3.5+ answers 403 to any other
Host header; without this flag it accepts only localhost and private IPs, so in-cluster clients that
use the Service name would be refused.
*/}}
{{- define "troupe-mlflow.allowedHosts" -}}
{{- $svc := .Release.Name -}}
{{- $ns := .Release.Namespace -}}
{{- $hosts := list -}}
{{- range (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) "localhost" "127.0.0.1") }}
{{- $hosts = append (append $hosts .) (printf "%s:%v" . $.Values.service.port) -}}
{{- end }}
{{- concat $hosts .Values.server.extraAllowedHosts | join "," -}}
{{- end }}

{{/*
Environment that locates the backend store (and the auth store); the server and the migration Job
share it, so both always use the same database.
*/}}
{{- define "troupe-mlflow.dbEnv" -}}
{{- $b := .Values.backendStore -}}
{{- if eq $b.source "secretsManager" }}
{{- $sm := $b.secretsManager }}
{{- if and (not $sm.configMap) (or (not $sm.secretId) (not $sm.endpoint)) }}
{{- fail "backendStore.secretsManager: set secretId (terraform output mlflow_db_secret_arn) and endpoint (mlflow_db_endpoint), or configMap (a ConfigMap with keys secret-id and endpoint)" }}
{{- end }}
- name: TROUPE_MLFLOW_DB_SECRET_ID
{{- if $sm.secretId }}
  value: {{ $sm.secretId | quote }}
{{- else }}
  valueFrom:
    configMapKeyRef: {name: {{ $sm.configMap }}, key: secret-id}
{{- end }}
- name: TROUPE_MLFLOW_DB_ENDPOINT
{{- if $sm.endpoint }}
  value: {{ $sm.endpoint | quote }}
{{- else }}
  valueFrom:
    configMapKeyRef: {name: {{ $sm.configMap }}, key: endpoint}
{{- end }}
- name: TROUPE_MLFLOW_DB_NAME
  value: {{ $sm.database | quote }}
- name: TROUPE_MLFLOW_DB_URI_TEMPLATE
  value: {{ required "backendStore.secretsManager.uriTemplate is empty" $sm.uriTemplate | quote }}
{{- else if eq $b.source "existingSecret" }}
- name: MLFLOW_BACKEND_STORE_URI
  valueFrom:
    secretKeyRef:
      name: {{ required "backendStore.existingSecret is empty: set it to the Secret holding the PostgreSQL URI (or use backendStore.source=secretsManager)" $b.existingSecret }}
      key: {{ $b.uriKey }}
{{- else }}
{{- fail (printf "backendStore.source is %q: set backendStore.source to secretsManager or existingSecret" $b.source) }}
{{- end }}
{{- if .Values.auth.enabled }}
{{- with .Values.auth.database }}
- name: TROUPE_MLFLOW_AUTH_DB_NAME
  value: {{ . | quote }}
{{- end }}
{{- with .Values.auth.databaseUriKey }}
- name: TROUPE_MLFLOW_AUTH_DB_URI
  valueFrom:
    secretKeyRef: {name: {{ $.Values.auth.existingSecret }}, key: {{ . }}}
{{- end }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.aws.region | quote }}
- name: HOME
  value: /tmp
{{- end }}

{{- define "troupe-mlflow.checkCredentials" -}}
{{- if and (not .Values.aws.roleArn) (not .Values.artifacts.existingSecret) }}
{{- fail "no AWS credentials (S3 artifacts, Secrets Manager): set aws.roleArn (IRSA) or artifacts.existingSecret (Secret name)" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
{{- fail "auth.enabled is true but auth.existingSecret is empty: set it to the Secret with the admin user, password and Flask secret key" }}
{{- end }}
{{- end }}
