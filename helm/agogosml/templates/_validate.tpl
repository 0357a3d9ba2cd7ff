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
{{- if and (ne .Values.writer.service.type "ClusterIP") (not .Values.auth.writerToken.existingSecret) }}
{{- fail (printf "writer.service.type is %s, which lets clients outside the cluster write records, but auth.writerToken names no Secret: set auth.writerToken to a Secret key with a token, or use ClusterIP" .Values.writer.service.type) }}
{{- end }}
{{- if and (ne $app.service.type "ClusterIP") (not .Values.auth.appToken.existingSecret) }}
{{- fail (printf "app.service.type is %s, which lets clients outside the cluster send messages to the model app, but auth.appToken names no Secret: set auth.appToken to a Secret key with a token, or use ClusterIP" $app.service.type) }}
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
{{- if and $kafka.caCertificate.existingSecret (not (has $kafka.securityProtocol (list "SSL" "SASL_SSL"))) }}
{{- fail (printf "kafka.caCertificate names a Secret but kafka.securityProtocol is %s, which uses no TLS: use SSL or SASL_SSL, or clear kafka.caCertificate" $kafka.securityProtocol) }}
{{- end }}
{{- end }}
{{- if and .Values.keda.enabled (not $kafka.bootstrapServers) }}
{{- fail "kafka.bootstrapServers is empty but keda.enabled is true: the KEDA Kafka trigger needs the broker's host:port list" }}
{{- end }}
{{- $keda := .Values.keda }}
{{- if and $keda.enabled (gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- fail (printf "keda.minReplicaCount (%d) is greater than keda.maxReplicaCount (%d): lower the minimum or raise the maximum" (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- end }}
{{- range $index, $variable := .Values.app.extraEnv }}
{{- if and (has (upper $variable.name) (list "KAFKA_SASL_PASSWORD" "KAFKA_EVENTHUBS_CONNECTION_STRING" "EVENTHUB_CONNECTION_STRING" "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING" "READER_APP_TOKEN" "APP_TOKEN" "APP_WRITER_TOKEN" "WRITER_TOKEN")) (hasKey $variable "value") }}
{{- fail (printf "app.extraEnv[%d].value is set for %s, which carries a secret: use valueFrom.secretKeyRef, or the auth and kafka values that name a Secret" $index $variable.name) }}
{{- end }}
{{- end }}
{{- $eventhubs := .Values.eventhubs }}
{{- range $name, $ref := dict "kafka.sasl.password" $kafka.sasl.password "kafka.eventHubsConnectionString" $kafka.eventHubsConnectionString "kafka.caCertificate" $kafka.caCertificate "auth.appToken" .Values.auth.appToken "auth.writerToken" .Values.auth.writerToken "eventhubs.connectionString" $eventhubs.connectionString "eventhubs.checkpointStore.connectionString" $eventhubs.checkpointStore.connectionString "kafka.extraConfig" $kafka.extraConfig }}
{{- if and $ref.existingSecret (not $ref.key) }}
{{- fail (printf "%s.key is empty: name the key of Secret %s that holds the value" $name $ref.existingSecret) }}
{{- end }}
{{- end }}
{{- include "agogosml.validateExtraEnv" . }}
{{- include "agogosml.validateDisruptionBudgets" . }}
{{- include "agogosml.validateGracePeriods" . }}
{{- include "agogosml.validateExtraConfig" . }}
{{- include "agogosml.validateBrokerPorts" . }}
{{- include "agogosml.validateExposedServices" . }}
{{- end }}

{{/*
Checks that a Service of type NodePort or LoadBalancer can reach its pods.
The NetworkPolicy of the app admits only the reader, and the writer's only the
app, so clients outside the release need rules of their own. The peers of
networkPolicy.metricsFrom do not count: they are meant for a Prometheus in the
cluster, not for the clients of a Service.
*/}}
{{- define "agogosml.validateExposedServices" -}}
{{- $np := .Values.networkPolicy }}
{{- if $np.enabled }}
{{- range $component := list "app" "writer" }}
{{- $type := (index $.Values $component).service.type }}
{{- if and (ne $type "ClusterIP") (not (index $np.extraIngress $component)) }}
{{- fail (printf "%s.service.type is %s, but the %s's NetworkPolicy admits no clients outside the release, so its clients would reach no pod: add rules for its clients to networkPolicy.extraIngress.%s, or use ClusterIP" $component $type $component $component) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks that the NetworkPolicies let the reader and the writer reach the port of
every bootstrap server. A port missing from networkPolicy.kafkaPorts would only
show as connection timeouts. The brokers may advertise further ports, which
the chart cannot know. Without kafka.bootstrapServers the services connect to
port 9093 of the namespace in kafka.eventHubsConnectionString.
*/}}
{{- define "agogosml.validateBrokerPorts" -}}
{{- $np := .Values.networkPolicy }}
{{- if and $np.enabled (ne .Values.transport "eventhubs") }}
{{- $allowed := list }}
{{- range $np.kafkaPorts }}
{{- $allowed = append $allowed (include "agogosml.scalar" .) }}
{{- end }}
{{- $servers := .Values.kafka.bootstrapServers }}
{{- if $servers }}
{{- range $address := splitList "," $servers }}
{{- $port := regexFind ":[0-9]+$" (trim $address) | trimPrefix ":" }}
{{- if and $port (not (has $port $allowed)) }}
{{- fail (printf "networkPolicy.kafkaPorts (%s) leaves out port %s of the broker address %s in kafka.bootstrapServers, so the NetworkPolicies would block the reader and the writer from the broker: add %s to networkPolicy.kafkaPorts" (join ", " $allowed) $port (trim $address) $port) }}
{{- end }}
{{- end }}
{{- else if and (include "agogosml.usesEventHubs" .) (not (has "9093" $allowed)) }}
{{- fail (printf "networkPolicy.kafkaPorts (%s) leaves out 9093, the port of the Event Hubs Kafka endpoint that kafka.eventHubsConnectionString names, so the NetworkPolicies would block the reader and the writer from it: add 9093 to networkPolicy.kafkaPorts" (join ", " $allowed)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
KAFKA_EXTRA_CONFIG in the settings maps is a plain value, stored in the release,
so the properties that carry secrets go in kafka.extraConfig, a Secret.
*/}}
{{- define "agogosml.validateExtraConfig" -}}
{{- range $component := list "reader" "writer" }}
{{- $config := index (index $.Values $component).settings "KAFKA_EXTRA_CONFIG" }}
{{- if $config }}
{{- if $.Values.kafka.extraConfig.existingSecret }}
{{- fail (printf "%s.settings.KAFKA_EXTRA_CONFIG and kafka.extraConfig are both set: put all the properties in the Secret of kafka.extraConfig" $component) }}
{{- end }}
{{- range $property := list "password" "secret" "ssl.key.pem" "sasl.oauthbearer.config" "ssl_key" }}
{{- if contains $property (toString $config) }}
{{- fail (printf "%s.settings.KAFKA_EXTRA_CONFIG contains %q, which carries a secret, and the release would store it in plain text: put KAFKA_EXTRA_CONFIG in a Secret and name it in kafka.extraConfig" $component $property) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Each pod's terminationGracePeriodSeconds leaves its service the preStop wait,
the shutdown time of its settings and 10 s more, for the final commit or flush
and the exit: Kubernetes kills a pod when the grace period ends, counting from
the start of the preStop hook.
*/}}
{{- define "agogosml.validateGracePeriods" -}}
{{- range $component, $variable := dict "reader" "READER_SHUTDOWN_TIMEOUT_MS" "writer" "WRITER_SHUTDOWN_TIMEOUT_MS" "app" "APP_SHUTDOWN_TIMEOUT_MS" }}
{{- $values := index $.Values $component }}
{{- $shutdownMs := 30000 }}
{{- if hasKey $values.settings $variable }}
{{- $shutdownMs = int (trim (include "agogosml.scalar" (index $values.settings $variable))) }}
{{- end }}
{{- $preStop := include "agogosml.preStopSeconds" (dict "root" $ "component" $component) | int }}
{{- $needed := add $preStop (div (add $shutdownMs 999) 1000) 10 }}
{{- if lt (int $values.terminationGracePeriodSeconds) (int $needed) }}
{{- $wait := "" }}
{{- if gt $preStop 0 }}
{{- $wait = printf "%s.preStopSleepSeconds=%d s, then " $component $preStop }}
{{- end }}
{{- fail (printf "%s.terminationGracePeriodSeconds is %d, but a stopping pod takes %s%s=%d ms and 10 s more: Kubernetes would kill the pods before they finish, so raise terminationGracePeriodSeconds to at least %d, or lower %s" $component (int $values.terminationGracePeriodSeconds) $wait $variable $shutdownMs (int $needed) $variable) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks that no app.extraEnv entry sets a variable that the chart sets in the
app container. Kubernetes uses the last entry of a name, so the extraEnv entry
would silently replace the chart's value: an APP_PORT that differs from the
container port, for example, would make every probe fail. Also rejects the
variables that app.settings takes, which would bypass its checks there.
*/}}
{{- define "agogosml.validateExtraEnv" -}}
{{- $app := .Values.app }}
{{- $source := dict "APP_HOST" "to 0.0.0.0" "APP_PORT" "from app.port" "APP_WRITER_URL" "to the writer Service's URL" "AGOGOSML_SLOT" "to the slot's name" }}
{{- if .Values.auth.appToken.existingSecret }}
{{- $_ := set $source "APP_TOKEN" "from auth.appToken" }}
{{- end }}
{{- if .Values.auth.writerToken.existingSecret }}
{{- $_ := set $source "APP_WRITER_TOKEN" "from auth.writerToken" }}
{{- end }}
{{- range $name, $value := $app.settings }}
{{- $_ := set $source $name (printf "from app.settings.%s" $name) }}
{{- end }}
{{- range $index, $variable := $app.extraEnv }}
{{- /* ModelApp reads its APP_ variables in any case, but AGOGOSML_SLOT by case. */}}
{{- $name := $variable.name }}
{{- if hasPrefix "APP_" (upper $name) }}
{{- $name = upper $name }}
{{- end }}
{{- if hasKey $source $name }}
{{- $where := get $source $name }}
{{- $fix := ternary (printf ", and set the value in %s" (trimPrefix "from " $where)) "" (hasPrefix "from " $where) }}
{{- fail (printf "app.extraEnv[%d] sets %s, which the chart sets %s: remove the entry from app.extraEnv%s" $index $variable.name $where $fix) }}
{{- end }}
{{- /* The variables of app.settings in values.schema.json. */}}
{{- if has $name (list "APP_LOG_LEVEL" "APP_MAX_BODY_BYTES" "APP_SHUTDOWN_TIMEOUT_MS" "APP_WRITER_MAX_BODY_BYTES" "APP_WRITER_MAX_REQUESTS" "APP_WRITER_TIMEOUT_MS") }}
{{- fail (printf "app.extraEnv[%d] sets %s, a variable of app.settings, where the schema checks its value and the chart checks app.terminationGracePeriodSeconds against APP_SHUTDOWN_TIMEOUT_MS: move it to app.settings.%s" $index $variable.name $name) }}
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
Checks that each enabled PodDisruptionBudget lets a node drain evict at least
one pod while all of the component's pods are healthy. A component that runs
no pods blocks no drain, so its budget is not checked.
*/}}
{{- define "agogosml.validateDisruptionBudgets" -}}
{{- range $component := list "reader" "writer" "app" }}
{{- $budget := (index $.Values $component).podDisruptionBudget }}
{{- $field := printf "%s.podDisruptionBudget" $component }}
{{- $replicas := include "agogosml.budgetReplicas" (dict "root" $ "component" $component) | fromJson }}
{{- $count := int $replicas.count }}
{{- if and $budget.enabled (gt $count 0) }}
{{- if hasKey $budget "minAvailable" }}
{{- $minimum := $budget.minAvailable }}
{{- $pods := 0 }}
{{- $rounded := "" }}
{{- if kindIs "string" $minimum }}
{{- /* Kubernetes rounds a percentage of pods up. */}}
{{- $pods = div (add (mul (trimSuffix "%" $minimum | int) $count) 99) 100 }}
{{- $rounded = printf " (%d %s, rounded up)" $pods (ternary "pod" "pods" (eq (int $pods) 1)) }}
{{- else }}
{{- $pods = int $minimum }}
{{- end }}
{{- if ge (int $pods) $count }}
{{- fail (printf "%s.minAvailable is %s%s and %s, so the budget allows no eviction and node drains block: set minAvailable to fewer pods, run more replicas, or remove minAvailable to use maxUnavailable" $field (include "agogosml.scalar" $minimum) $rounded $replicas.source) }}
{{- end }}
{{- else if has (include "agogosml.scalar" $budget.maxUnavailable) (list "0" "0%") }}
{{- fail (printf "%s.maxUnavailable is %s, so the budget allows no eviction and node drains block: set it to 1 or more, or to a percentage above 0%%" $field (include "agogosml.scalar" $budget.maxUnavailable)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Smallest number of pods that a component runs while it runs any, as JSON
{"count": N, "source": "the values that set it"}. Call with (dict "root" $
"component" "reader"). The app's budget covers the active slot only.
*/}}
{{- define "agogosml.budgetReplicas" -}}
{{- $values := .root.Values }}
{{- if eq .component "app" }}
{{- $slot := $values.app.activeSlot }}
{{- $count := int (index $values.app.slots $slot).replicas }}
{{- dict "count" $count "source" (printf "app.slots.%s.replicas is %d" $slot $count) | toJson }}
{{- else if and (eq .component "reader") $values.keda.enabled }}
{{- $minimum := int $values.keda.minReplicaCount }}
{{- $count := max 1 $minimum }}
{{- dict "count" $count "source" (printf "KEDA may run the reader with %d %s (keda.minReplicaCount is %d)" $count (ternary "pod" "pods" (eq (int $count) 1)) $minimum) | toJson }}
{{- else }}
{{- $count := int (index $values .component).replicas }}
{{- dict "count" $count "source" (printf "%s.replicas is %d" .component $count) | toJson }}
{{- end }}
{{- end }}
