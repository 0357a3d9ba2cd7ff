{{/*
Chart name, at most 63 characters as DNS labels allow.
*/}}
{{- define "agogosml.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name: the release name, with the chart name added
unless the release name already contains it. Shortened to leave room for the
longest suffix ("-app-preview", 12 characters) within 63 characters.
*/}}
{{- define "agogosml.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 51 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 51 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 51 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "agogosml.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource. Call with (dict "root" $ "component" "reader").
*/}}
{{- define "agogosml.labels" -}}
helm.sh/chart: {{ include "agogosml.chart" .root }}
{{ include "agogosml.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: agogosml
{{- end }}

{{/*
Labels that select one component's pods. Call with (dict "root" $
"component" "app"), and add "slot" to select one app slot.
*/}}
{{- define "agogosml.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agogosml.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .slot }}
agogosml.io/slot: {{ .slot }}
{{- end }}
{{- end }}

{{- define "agogosml.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agogosml.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository with the digest if set, else with the tag, else
with the chart's appVersion. Call with (dict "root" $ "image" $image).
*/}}
{{- define "agogosml.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
The app slot that is not the active one.
*/}}
{{- define "agogosml.otherSlot" -}}
{{- if eq .Values.app.activeSlot "blue" }}green{{ else }}blue{{ end }}
{{- end }}

{{/*
Replica count of one app slot. Call with (dict "root" $ "slot" "green").
The active slot and the preview slot run their own count. The idle slot runs
its count when app.idleSlot is warm and none with scaleToZero.
*/}}
{{- define "agogosml.slotReplicas" -}}
{{- $app := .root.Values.app }}
{{- $replicas := (index $app.slots .slot).replicas }}
{{- if or (eq .slot $app.activeSlot) (eq .slot $app.previewSlot) (eq $app.idleSlot "warm") }}
{{- $replicas }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{- define "agogosml.appServiceName" -}}
{{- printf "%s-app" (include "agogosml.fullname" .) }}
{{- end }}

{{- define "agogosml.writerServiceName" -}}
{{- printf "%s-writer" (include "agogosml.fullname" .) }}
{{- end }}

{{/*
Non-empty when Kafka is reached with an Azure Event Hubs connection string.
*/}}
{{- define "agogosml.usesEventHubs" -}}
{{- if .Values.kafka.eventHubsConnectionString.existingSecret }}true{{ end }}
{{- end }}

{{/*
Checks of value combinations that values.schema.json cannot express.
*/}}
{{- define "agogosml.validate" -}}
{{- $app := .Values.app }}
{{- if and $app.previewSlot (eq $app.previewSlot $app.activeSlot) }}
{{- fail (printf "app.previewSlot (%s) must differ from app.activeSlot (%s): the preview slot is the one not serving traffic" $app.previewSlot $app.activeSlot) }}
{{- end }}
{{- if and $app.previousSlot (eq $app.previousSlot $app.activeSlot) }}
{{- fail (printf "app.previousSlot (%s) must differ from app.activeSlot (%s): set it to the slot to roll back to, or to \"\"" $app.previousSlot $app.activeSlot) }}
{{- end }}
{{- $kafka := .Values.kafka }}
{{- $sasl := has $kafka.securityProtocol (list "SASL_SSL" "SASL_PLAINTEXT") }}
{{- if eq .Values.transport "eventhubs" }}
{{- include "agogosml.validateEventHubs" . }}
{{- else if not (include "agogosml.usesEventHubs" .) }}
{{- if not $kafka.bootstrapServers }}
{{- fail "kafka.bootstrapServers is empty: set it to the broker's host:port list, or set kafka.eventHubsConnectionString" }}
{{- end }}
{{- if and $sasl (not $kafka.sasl.mechanism) }}
{{- fail (printf "kafka.sasl.mechanism is empty but kafka.securityProtocol is %s: set it to PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512" $kafka.securityProtocol) }}
{{- end }}
{{- if and (not $sasl) $kafka.sasl.mechanism }}
{{- fail (printf "kafka.sasl.mechanism is %s but kafka.securityProtocol is %s: use SASL_SSL" $kafka.sasl.mechanism $kafka.securityProtocol) }}
{{- end }}
{{- if and $kafka.sasl.mechanism (not $kafka.sasl.password.existingSecret) }}
{{- fail "kafka.sasl.password.existingSecret is empty: SASL needs a Secret key with the password" }}
{{- end }}
{{- end }}
{{- if and .Values.keda.enabled (not $kafka.bootstrapServers) }}
{{- fail "kafka.bootstrapServers is empty but keda.enabled is true: the KEDA Kafka trigger needs the broker's host:port list" }}
{{- end }}
{{- range $index, $variable := .Values.app.extraEnv }}
{{- if and (has $variable.name (list "KAFKA_SASL_PASSWORD" "KAFKA_EVENTHUBS_CONNECTION_STRING" "EVENTHUB_CONNECTION_STRING" "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING" "READER_APP_TOKEN" "APP_TOKEN" "APP_WRITER_TOKEN" "WRITER_TOKEN")) (hasKey $variable "value") }}
{{- fail (printf "app.extraEnv[%d].value is set for %s, which carries a secret: use valueFrom.secretKeyRef, or the auth and kafka values that name a Secret" $index $variable.name) }}
{{- end }}
{{- end }}
{{- $eventhubs := .Values.eventhubs }}
{{- range $name, $ref := dict "kafka.sasl.password" $kafka.sasl.password "kafka.eventHubsConnectionString" $kafka.eventHubsConnectionString "kafka.caCertificate" $kafka.caCertificate "auth.appToken" .Values.auth.appToken "auth.writerToken" .Values.auth.writerToken "eventhubs.connectionString" $eventhubs.connectionString "eventhubs.checkpointStore.connectionString" $eventhubs.checkpointStore.connectionString }}
{{- if and $ref.existingSecret (not $ref.key) }}
{{- fail (printf "%s.key is empty: name the key of Secret %s that holds the value" $name $ref.existingSecret) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks of the eventhubs values, when transport is eventhubs.
*/}}
{{- define "agogosml.validateEventHubs" -}}
{{- $eventhubs := .Values.eventhubs }}
{{- $store := $eventhubs.checkpointStore }}
{{- if eq (empty $eventhubs.connectionString.existingSecret) (empty $eventhubs.fullyQualifiedNamespace) }}
{{- fail "set one of eventhubs.connectionString (a Secret key) and eventhubs.fullyQualifiedNamespace (for Azure AD), not both or neither" }}
{{- end }}
{{- if eq (empty $store.connectionString.existingSecret) (empty $store.accountUrl) }}
{{- fail "set one of eventhubs.checkpointStore.connectionString (a Secret key) and eventhubs.checkpointStore.accountUrl (for Azure AD), not both or neither" }}
{{- end }}
{{- if ne (len .Values.reader.topics) 1 }}
{{- fail (printf "reader.topics has %d entries but transport eventhubs reads one event hub: run one release per hub" (len .Values.reader.topics)) }}
{{- end }}
{{- if .Values.keda.enabled }}
{{- fail "keda.enabled is true but the chart's KEDA trigger measures Kafka consumer lag: turn it off with transport eventhubs, or use transport kafka with kafka.eventHubsConnectionString" }}
{{- end }}
{{- end }}

{{/*
Event Hubs environment variables of the reader and the writer. Call with
(dict "root" $ "reader" true) for the reader's checkpoint settings.
*/}}
{{- define "agogosml.eventHubsEnv" -}}
{{- $eventhubs := .root.Values.eventhubs }}
{{- $store := $eventhubs.checkpointStore }}
{{- if $eventhubs.connectionString.existingSecret }}
{{- include "agogosml.secretEnv" (dict "name" "EVENTHUB_CONNECTION_STRING" "ref" $eventhubs.connectionString) }}
{{- else }}
- name: EVENTHUB_FULLY_QUALIFIED_NAMESPACE
  value: {{ $eventhubs.fullyQualifiedNamespace | quote }}
{{- end }}
{{- if .reader }}
- name: EVENTHUB_CONSUMER_GROUP
  value: {{ $eventhubs.consumerGroup | quote }}
- name: EVENTHUB_STARTING_POSITION
  value: {{ $eventhubs.startingPosition | quote }}
- name: EVENTHUB_CHECKPOINT_STORE_CONTAINER
  value: {{ $store.container | quote }}
{{- if $store.connectionString.existingSecret }}
{{- include "agogosml.secretEnv" (dict "name" "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING" "ref" $store.connectionString) }}
{{- else }}
- name: EVENTHUB_CHECKPOINT_STORE_ACCOUNT_URL
  value: {{ $store.accountUrl | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Broker environment variables of the reader or the writer: Kafka or Event
Hubs, as .Values.transport says. Call with (dict "root" $ "reader" true) for
the reader.
*/}}
{{- define "agogosml.brokerEnv" -}}
{{- if eq .root.Values.transport "eventhubs" }}
{{- include "agogosml.eventHubsEnv" . }}
{{- else }}
{{- if .reader }}
- name: KAFKA_GROUP_ID
  value: {{ .root.Values.reader.groupId | quote }}
- name: KAFKA_AUTO_OFFSET_RESET
  value: {{ .root.Values.reader.autoOffsetReset | quote }}
{{- end }}
{{- include "agogosml.kafkaEnv" .root }}
{{- end }}
{{- end }}

{{/*
Pod labels of the reader and the writer for Azure AD workload identity.
*/}}
{{- define "agogosml.workloadIdentityLabels" -}}
{{- if and (eq .Values.transport "eventhubs") .Values.eventhubs.workloadIdentity.enabled }}
azure.workload.identity/use: "true"
{{- end }}
{{- end }}

{{/*
Kafka environment variables of the reader and the writer.
*/}}
{{- define "agogosml.kafkaEnv" -}}
{{- $kafka := .Values.kafka }}
{{- if $kafka.bootstrapServers }}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ $kafka.bootstrapServers | quote }}
{{- end }}
{{- if include "agogosml.usesEventHubs" . }}
- name: KAFKA_EVENTHUBS_CONNECTION_STRING
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.eventHubsConnectionString.existingSecret }}
      key: {{ $kafka.eventHubsConnectionString.key }}
{{- /* Event Hubs takes the literal user name "$ConnectionString". The
reader and writer derive it themselves; the KEDA TriggerAuthentication reads
it from this variable. */}}
- name: KAFKA_SASL_USERNAME
  value: "$ConnectionString"
{{- else }}
- name: KAFKA_SECURITY_PROTOCOL
  value: {{ $kafka.securityProtocol | quote }}
{{- if $kafka.sasl.mechanism }}
- name: KAFKA_SASL_MECHANISM
  value: {{ $kafka.sasl.mechanism | quote }}
- name: KAFKA_SASL_USERNAME
  value: {{ $kafka.sasl.username | quote }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.sasl.password.existingSecret }}
      key: {{ $kafka.sasl.password.key }}
{{- end }}
{{- end }}
{{- if $kafka.caCertificate.existingSecret }}
- name: KAFKA_SSL_CA_LOCATION
  value: /etc/agogosml/kafka-ca/ca.crt
{{- end }}
{{- end }}

{{/*
Environment variables from a settings map, in name order.
*/}}
{{- define "agogosml.settingsEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ include "agogosml.scalar" $value | quote }}
{{- end }}
{{- end }}

{{/*
A value as text. YAML numbers reach templates as float64, which toString writes
in exponent form from 1e6 on (4194304 becomes "4.194304e+06"), so whole numbers
are written as integers.
*/}}
{{- define "agogosml.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end }}

{{/*
Environment variable from a Secret key, if the Secret is named. Call with
(dict "name" "APP_TOKEN" "ref" .Values.auth.appToken).
*/}}
{{- define "agogosml.secretEnv" -}}
{{- if .ref.existingSecret }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.existingSecret }}
      key: {{ .ref.key }}
{{- end }}
{{- end }}

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
Liveness probe on /healthz and readiness probe on /readyz of the "http" port.
*/}}
{{- define "agogosml.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  {{- toYaml .Values.probes.readiness | nindent 2 }}
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
Volumes of the reader and writer pods: a writable /tmp, and the Kafka CA file
when set.
*/}}
{{- define "agogosml.kafkaVolumes" -}}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
{{- if .Values.kafka.caCertificate.existingSecret }}
  - name: kafka-ca
    secret:
      secretName: {{ .Values.kafka.caCertificate.existingSecret }}
      items:
        - key: {{ .Values.kafka.caCertificate.key }}
          path: ca.crt
{{- end }}
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
