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

{{/* Container env shared by head and workers (pod-level: what Ray's own processes need). */}}
{{- define "troupe-training.env" -}}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.aws.region | quote }}
{{- end }}

{{/* The job's runtime env (RayJob runtimeEnvYAML): what the driver and every Ray Train worker of
the job see, on whichever node they run; KubeRay submits it with the entrypoint through Ray's Job API. */}}
{{- define "troupe-training.runtimeEnv" -}}
{{- $acc := include "troupe-training.accelerator" . | fromYaml -}}
{{- $env := dict "TROUPE_PIPELINE_RUN" (.Values.run.id | default .Release.Name) "TROUPE_ACCELERATOR" .Values.accelerator "MLFLOW_TRACKING_URI" .Values.mlflow.trackingUri "TROUPE_CHECKPOINT_URI" .Values.checkpoints.s3Uri "TROUPE_CHECKPOINT_EVERY" (toString .Values.checkpoints.everySteps) -}}
{{- range (concat $acc.env .Values.extraEnv) }}
{{- $_ := set $env .name (toString .value) }}
{{- end }}
{{- toYaml (dict "env_vars" $env) }}
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
volumeMounts:
  - {name: params, mountPath: {{ .Values.params.mountPath }}, readOnly: true}
  - {name: dshm, mountPath: /dev/shm}
{{- end }}
