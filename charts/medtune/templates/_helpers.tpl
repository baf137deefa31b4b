{{/*
Names, labels and the shared Ray pod/cluster templates. RayCluster, RayJob and RayService
all build their cluster from "medtune.rayClusterSpec", so the three never drift apart.
*/}}

{{- define "medtune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kept short: KubeRay appends suffixes (-head-svc, -serve-svc, -xxxxx) to these names. */}}
{{- define "medtune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "medtune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "medtune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "medtune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: medtune
{{- end }}

{{- define "medtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "medtune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- /* The image of a pod: (dict "root" $ "variant" V); an empty variant is image.variant.
The gpu variant is the plain tag; cpu and vllm add their suffix (0.1.0-cpu, 0.1.0-vllm). */ -}}
{{- define "medtune.image" -}}
{{- $root := .root }}
{{- $variant := .variant | default $root.Values.image.variant }}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag }}
{{- if and (ne $variant "gpu") (not (hasSuffix (printf "-%s" $variant) $tag)) }}
{{- $tag = printf "%s-%s" $tag $variant }}
{{- end }}
{{- printf "%s:%s" $root.Values.image.repository $tag }}
{{- end }}

{{- define "medtune.recipeConfigMap" -}}
{{- printf "%s-recipe" (include "medtune.fullname" .) }}
{{- end }}

{{- define "medtune.rayClusterName" -}}
{{- include "medtune.fullname" . }}
{{- end }}

{{- define "medtune.rayServiceName" -}}
{{- printf "%s-serve" (include "medtune.fullname" .) }}
{{- end }}

{{/* The recipe as mounted: values.recipe plus the api_keys_file the chart mounts. */}}
{{- define "medtune.recipe" -}}
{{- $recipe := deepCopy .Values.recipe }}
{{- if .Values.serving.apiKeys.existingSecret }}
{{- $serve := default dict $recipe.serve }}
{{- $_ := set $serve "api_keys_file" (printf "%s/%s" (trimSuffix "/" .Values.serving.apiKeys.mountPath) .Values.serving.apiKeys.key) }}
{{- $_ := set $recipe "serve" $serve }}
{{- end }}
{{- toYaml $recipe }}
{{- end }}

{{/*
Install-time checks. The CRD check uses the API versions of the target cluster; it can be
skipped for offline rendering with kuberay.skipCrdCheck=true (or helm --api-versions).
*/}}
{{- define "medtune.validate" -}}
{{- $kinds := list }}
{{- if .Values.cluster.enabled }}{{ $kinds = append $kinds "RayCluster" }}{{ end }}
{{- if .Values.trainJob.enabled }}{{ $kinds = append $kinds "RayJob" }}{{ end }}
{{- if .Values.serving.enabled }}{{ $kinds = append $kinds "RayService" }}{{ end }}
{{- if not .Values.kuberay.skipCrdCheck }}
{{- range $kinds }}
{{- if not ($.Capabilities.APIVersions.Has (printf "ray.io/v1/%s" .)) }}
{{- fail (printf "\n\nmedtune: the cluster has no ray.io/v1 %s CRD: the KubeRay operator (>= 1.4) is not installed.\nInstall it first:\n  helm repo add kuberay https://ray-project.github.io/kuberay-helm/\n  helm install kuberay-operator kuberay/kuberay-operator --version 1.4.2 --namespace kuberay-system --create-namespace\nthen retry. To render without a cluster (helm template), set kuberay.skipCrdCheck=true or pass --api-versions ray.io/v1/%s.\n" . .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not .Values.recipe }}
{{- fail "medtune: values.recipe is empty: give the whole recipe (see ray_jobs/config.py) in a values file, e.g. -f charts/medtune/profiles/cpu-dev.yaml, or the example in values.yaml" }}
{{- end }}
{{- if and .Values.rayAuth.enabled (eq .Values.rayAuth.mode "secret") (not .Values.rayAuth.existingSecret) }}
{{- fail "medtune: rayAuth.mode=secret needs rayAuth.existingSecret (a Secret holding the Ray auth token); or set rayAuth.mode=operator (KubeRay >= 1.5.1)" }}
{{- end }}
{{- if and .Values.trainJob.enabled .Values.trainJob.existingCluster.enabled (not .Values.trainJob.existingCluster.name) (not .Values.cluster.enabled) }}
{{- fail "medtune: trainJob.existingCluster.enabled without a name targets this release's RayCluster: set cluster.enabled=true or trainJob.existingCluster.name" }}
{{- end }}
{{- if and .Values.serving.gcsFaultTolerance.enabled (not .Values.serving.gcsFaultTolerance.redisAddress) }}
{{- fail "medtune: serving.gcsFaultTolerance.enabled needs serving.gcsFaultTolerance.redisAddress (host:port of a Redis)" }}
{{- end }}
{{- range $g := concat .Values.workerGroups .Values.trainJob.workerGroups .Values.serving.workerGroups }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "medtune: worker group %q: minReplicas (%d) exceeds maxReplicas (%d)" $g.name (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* requests == limits: KubeRay derives Ray's num-cpus/num-gpus/memory from the limits. */}}
{{- define "medtune.groupResources" -}}
{{- $r := dict "cpu" (toString .cpu) "memory" (toString .memory) }}
{{- if .gpu }}{{ $_ := set $r "nvidia.com/gpu" (toString .gpu) }}{{ end }}
{{- if .ephemeralStorage }}{{ $_ := set $r "ephemeral-storage" (toString .ephemeralStorage) }}{{ end }}
requests:
  {{- toYaml $r | nindent 2 }}
limits:
  {{- toYaml $r | nindent 2 }}
{{- end }}

{{- define "medtune.authEnv" -}}
{{- if not .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: disabled
{{- else if eq .Values.rayAuth.mode "secret" }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.rayAuth.existingSecret }}
      key: {{ .Values.rayAuth.tokenKey }}
{{- end }}
{{- end }}

{{/* Environment of every Ray container: storage, hub, auth, caches. No secret values. */}}
{{- define "medtune.rayEnv" -}}
{{- include "medtune.authEnv" . }}
- name: MEDTUNE_RECIPE
  value: /etc/medtune/recipe.yaml
- name: HF_HOME
  value: /home/ray/.cache/huggingface
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: TRITON_CACHE_DIR
  value: /home/ray/.cache/triton
- name: XDG_CONFIG_HOME
  value: /tmp/.config
{{- if .Values.autoscaling.enabled }}
{{- /* The train stage's resource check would otherwise refuse GPUs the autoscaler has not
       added yet (worker groups start at 0 replicas). */}}
- name: MEDTUNE_CLUSTER_AUTOSCALES
  value: "1"
{{- end }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.hub.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.hub.tokenKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "medtune.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.scratch.cacheSizeLimit }}
{{- end }}

{{- define "medtune.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/ray/.cache
{{- end }}

{{/*
One Ray pod template (head or worker).
Args: root, group (resources, nodeSelector, tolerations, affinity, priorityClassName, env,
annotations), nodeType (head|worker), component, ports (bool), automount (bool).
*/}}
{{- define "medtune.rayPodTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
metadata:
  labels:
    {{- include "medtune.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    medtune.io/ray-node-type: {{ .nodeType }}
  annotations:
    checksum/recipe: {{ include "medtune.recipe" $root | sha256sum }}
    {{- with $g.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "medtune.serviceAccountName" $root }}
  automountServiceAccountToken: {{ .automount }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $g.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .nodeType }}
      image: {{ include "medtune.image" (dict "root" $root "variant" (ternary $root.Values.serving.imageVariant "" (eq .component "serve"))) }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      resources:
        {{- include "medtune.groupResources" $g.resources | trim | nindent 8 }}
      env:
        {{- include "medtune.rayEnv" $root | trim | nindent 8 }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if .ports }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        - name: serve
          containerPort: {{ $root.Values.serving.serve.port }}
        - name: metrics
          containerPort: 8080
      {{- end }}
      volumeMounts:
        {{- include "medtune.scratchMounts" $root | trim | nindent 8 }}
        - name: recipe
          mountPath: /etc/medtune
          readOnly: true
        {{- if $root.Values.serving.apiKeys.existingSecret }}
        - name: api-keys
          mountPath: {{ $root.Values.serving.apiKeys.mountPath }}
          readOnly: true
        {{- end }}
  volumes:
    {{- include "medtune.scratchVolumes" $root | trim | nindent 4 }}
    - name: recipe
      configMap:
        name: {{ include "medtune.recipeConfigMap" $root }}
    {{- if $root.Values.serving.apiKeys.existingSecret }}
    - name: api-keys
      secret:
        secretName: {{ $root.Values.serving.apiKeys.existingSecret }}
        items:
          - key: {{ $root.Values.serving.apiKeys.key }}
            path: {{ $root.Values.serving.apiKeys.key }}
    {{- end }}
{{- end }}

{{/*
The spec of a Ray cluster, shared by RayCluster.spec, RayJob.spec.rayClusterSpec and
RayService.spec.rayClusterConfig.
Args: root, component, workerGroups (list; empty -> .Values.workerGroups), gcsFaultTolerance (bool).
*/}}
{{- define "medtune.rayClusterSpec" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $groups := .workerGroups | default $root.Values.workerGroups }}
{{- $v := $root.Values }}
rayVersion: {{ $v.rayVersion | quote }}
{{- if and $v.rayAuth.enabled (eq $v.rayAuth.mode "operator") }}
authOptions:
  mode: token
{{- end }}
{{- if $v.autoscaling.enabled }}
enableInTreeAutoscaling: true
autoscalerOptions:
  version: v2
  upscalingMode: {{ $v.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ $v.autoscaling.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- include "medtune.groupResources" $v.autoscaling.resources | trim | nindent 4 }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
  {{- with (include "medtune.authEnv" $root | trim) }}
  env:
    {{- . | nindent 4 }}
  {{- end }}
  {{- /* The autoscaler sidecar writes its logs under /tmp/ray of the head pod. */}}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- if .gcsFaultTolerance }}
gcsFaultToleranceOptions:
  redisAddress: {{ $v.serving.gcsFaultTolerance.redisAddress | quote }}
  {{- with $v.serving.gcsFaultTolerance.existingSecret }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $v.serving.gcsFaultTolerance.passwordKey }}
  {{- end }}
{{- end }}
headGroupSpec:
  serviceType: {{ $v.head.serviceType }}
  rayStartParams:
    {{- $params := dict "dashboard-host" "0.0.0.0" }}
    {{- range $k, $val := $v.head.rayStartParams }}{{ $_ := set $params $k (toString $val) }}{{ end }}
    {{- /* Always: the head runs no tasks, so GPU/CPU work never lands on it. */}}
    {{- $_ := set $params "num-cpus" "0" }}
    {{- toYaml $params | nindent 4 }}
  template:
    {{- include "medtune.rayPodTemplate" (dict "root" $root "group" $v.head "nodeType" "head" "component" $component "ports" true "automount" $v.autoscaling.enabled) | trim | nindent 4 }}
workerGroupSpecs:
  {{- range $g := $groups }}
  - groupName: {{ $g.name }}
    replicas: {{ $g.replicas }}
    minReplicas: {{ $g.minReplicas }}
    maxReplicas: {{ $g.maxReplicas }}
    rayStartParams:
      {{- $params := dict }}
      {{- range $k, $val := $g.rayStartParams }}{{ $_ := set $params $k (toString $val) }}{{ end }}
      {{- if $params }}
      {{- toYaml $params | nindent 6 }}
      {{- else }} {}
      {{- end }}
    template:
      {{- include "medtune.rayPodTemplate" (dict "root" $root "group" $g "nodeType" "worker" "component" $component "ports" false "automount" false) | trim | nindent 6 }}
  {{- end }}
{{- end }}
