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
{{ include "agogosml.podLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- end }}

{{/*
Labels of the pods, in pod templates. They leave out the chart version and
appVersion, because a change of a pod template rolls the Deployment: every
chart upgrade would restart the active app slot, with no change to its image
or settings. Call with the same dict as agogosml.labels.
*/}}
{{- define "agogosml.podLabels" -}}
{{ include "agogosml.selectorLabels" . }}
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
its count when app.idleSlot is warm and it has an image tag or digest of its
own, and none otherwise. Without one it would run the chart's appVersion,
which is not a version of the model app: on a first install with warm, the
other slot would pull an image that may not exist, and --atomic would undo the
install.
*/}}
{{- define "agogosml.slotReplicas" -}}
{{- $app := .root.Values.app }}
{{- $slot := index $app.slots .slot }}
{{- $hasImage := or $slot.image.tag $slot.image.digest }}
{{- if or (eq .slot $app.activeSlot) (eq .slot $app.previewSlot) }}
{{- $slot.replicas }}
{{- else if and (eq $app.idleSlot "warm") $hasImage }}
{{- $slot.replicas }}
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
{{- if $kafka.extraConfig.existingSecret }}
- name: KAFKA_EXTRA_CONFIG
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.extraConfig.existingSecret }}
      key: {{ $kafka.extraConfig.key }}
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
