{{/* Labels shared by every object of the chart (troupe.kube.rayjob builds the same ones). */}}
{{- define "troupe-training.labels" -}}
app.kubernetes.io/name: troupe-training
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: troupe
{{- end }}

{{/* The selected accelerator profile; fails with the setting to change when unknown. */}}
{{- define "troupe-training.accelerator" -}}
{{- $acc := index .Values.accelerators .Values.accelerator -}}
{{- if not $acc -}}
{{- fail (printf "accelerator=%q is not a key of accelerators (cpu | nvidia | ascend): set accelerator" .Values.accelerator) -}}
{{- end -}}
{{- toYaml $acc -}}
{{- end }}

{{/* Checks that name the setting to change. */}}
{{- define "troupe-training.validate" -}}
{{- if not (has .Values.step (list "sft" "dpo")) -}}
{{- fail (printf "step=%q: set step to sft or dpo" .Values.step) -}}
{{- end -}}
{{- if not .Values.checkpoints.s3Uri -}}
{{- fail "checkpoints.s3Uri is empty: set it to s3://<checkpoints bucket>/<prefix>" -}}
{{- end -}}
{{- if and (not .Values.aws.roleArn) (not .Values.aws.existingSecret) -}}
{{- fail "no AWS credentials: set aws.roleArn (IRSA) or aws.existingSecret (Secret name)" -}}
{{- end -}}
{{- end }}

{{- define "troupe-training.paramsConfigMap" -}}
{{- .Values.params.existingConfigMap | default (printf "%s-params" .Release.Name) -}}
{{- end }}

{{/* Container env shared by head and workers. */}}
{{- define "troupe-training.env" -}}
{{- $acc := include "troupe-training.accelerator" . | fromYaml -}}
- name: TROUPE_ACCELERATOR
  value: {{ .Values.accelerator | quote }}
- name: MLFLOW_TRACKING_URI
  value: {{ .Values.mlflow.trackingUri | quote }}
- name: TROUPE_CHECKPOINT_URI
  value: {{ .Values.checkpoints.s3Uri | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.aws.region | quote }}
{{- range (concat $acc.env .Values.extraEnv) }}
- name: {{ .name }}
  value: {{ .value | quote }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by head and workers. */}}
{{- define "troupe-training.podCommon" -}}
serviceAccountName: {{ .Values.serviceAccount.name }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
volumes:
  - name: params
    configMap:
      name: {{ include "troupe-training.paramsConfigMap" . }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ .Values.worker.shmSize }}
{{- end }}

{{/* Container fields shared by head and workers. */}}
{{- define "troupe-training.containerCommon" -}}
image: {{ printf "%s:%s-%s" .Values.image.repository .Values.image.version (include "troupe-training.accelerator" . | fromYaml).imageSuffix }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
env:
  {{- include "troupe-training.env" . | nindent 2 }}
{{- with .Values.aws.existingSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
volumeMounts:
  - {name: params, mountPath: /etc/troupe, readOnly: true}
  - {name: dshm, mountPath: /dev/shm}
{{- end }}
