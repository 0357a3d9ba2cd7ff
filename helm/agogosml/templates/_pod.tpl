{{/*
Pod and container security settings of the Kubernetes "restricted" Pod
Security Standard, with a read-only root file system.
*/}}
{{- define "agogosml.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "agogosml.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Startup and liveness probes on /healthz and readiness probe on /readyz of the
"http" port. Call with (dict "root" $ "component" "app"): the component's
probes values override single fields of the shared probes.
*/}}
{{- define "agogosml.probes" -}}
{{- $overrides := (index .root.Values .component).probes | default dict }}
{{- $probes := mustMergeOverwrite (deepCopy .root.Values.probes) (deepCopy $overrides) }}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml $probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml $probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  {{- toYaml $probes.readiness | nindent 2 }}
{{- end }}

{{/*
Scheduling and metadata fields shared by every pod template spec.
*/}}
{{- define "agogosml.podSpecCommon" -}}
serviceAccountName: {{ include "agogosml.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- include "agogosml.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
topologySpreadConstraints of one component's pods, or of one app slot's
pods. Call with the dict of agogosml.selectorLabels.
*/}}
{{- define "agogosml.topologySpreadConstraints" -}}
{{- $overrides := (index .root.Values .component).topologySpread | default dict }}
{{- $spread := mustMergeOverwrite (deepCopy .root.Values.topologySpread) (deepCopy $overrides) }}
{{- if $spread.enabled }}
topologySpreadConstraints:
{{- range $key := $spread.topologyKeys }}
  - topologyKey: {{ $key }}
    maxSkew: {{ $spread.maxSkew }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "agogosml.selectorLabels" $ | nindent 8 }}
    {{- /* Counts only the pods of the Deployment's current ReplicaSet, so the
    old pods of a rolling update do not skew where the new ones go. Beta and
    on by default from Kubernetes 1.27; older API servers drop the field. */}}
    {{- if semverCompare ">=1.27-0" $.root.Capabilities.KubeVersion.Version }}
    matchLabelKeys:
      - pod-template-hash
    {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Volumes of the reader and writer pods: a writable /tmp, and the Kafka CA file
when set. Call with (dict "root" $ "component" "reader").
*/}}
{{- define "agogosml.kafkaVolumes" -}}
{{- $caCertificate := .root.Values.kafka.caCertificate }}
volumes:
  {{- include "agogosml.tmpVolume" . | nindent 2 }}
{{- if $caCertificate.existingSecret }}
  - name: kafka-ca
    secret:
      secretName: {{ $caCertificate.existingSecret }}
      items:
        - key: {{ $caCertificate.key }}
          path: ca.crt
{{- end }}
{{- end }}

{{/*
The emptyDir volume that every container mounts at /tmp. Call with (dict
"root" $ "component" "app").
*/}}
{{- define "agogosml.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ include "agogosml.scalar" (index .root.Values .component).tmpSizeLimit | quote }}
{{- end }}

{{/*
Volume mounts of the reader and the writer containers.
*/}}
{{- define "agogosml.kafkaVolumeMounts" -}}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- if .Values.kafka.caCertificate.existingSecret }}
  - name: kafka-ca
    mountPath: /etc/agogosml/kafka-ca
    readOnly: true
{{- end }}
{{- end }}

{{/*
The preStop hook of a component that receives requests through a Service: the
pod keeps serving for preStopSleepSeconds before it gets SIGTERM, while
Kubernetes removes it from the Service's endpoints, so requests sent in that
time still find it. The hook's sleep action came in Kubernetes 1.30; an older
cluster gets no hook, as it gets no unhealthyPodEvictionPolicy before 1.27.
*/}}
{{- define "agogosml.preStop" -}}
{{- $seconds := include "agogosml.preStopSeconds" . | int }}
{{- if gt $seconds 0 }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ $seconds }}
{{- end }}
{{- end }}

{{/*
The preStop wait of a component in seconds: 0 without one, or before
Kubernetes 1.30.
*/}}
{{- define "agogosml.preStopSeconds" -}}
{{- $values := index .root.Values .component }}
{{- if semverCompare ">=1.30.0-0" .root.Capabilities.KubeVersion.Version }}
{{- int ($values.preStopSleepSeconds | default 0) }}
{{- else }}0{{ end }}
{{- end }}
