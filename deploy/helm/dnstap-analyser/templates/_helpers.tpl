{{/*
Chart name, truncated to the 63 characters a label value may hold.
*/}}
{{- define "dnstap-analyser.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. A release named "dnstap-analyser" (the documented one) gives
"dnstap-analyser".
*/}}
{{- define "dnstap-analyser.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value: name-version.
*/}}
{{- define "dnstap-analyser.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the analyser's pods. Never change them on upgrade: Deployment selectors are
immutable.
*/}}
{{- define "dnstap-analyser.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dnstap-analyser.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "dnstap-analyser.labels" -}}
helm.sh/chart: {{ include "dnstap-analyser.chart" . }}
{{ include "dnstap-analyser.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: analyser
app.kubernetes.io/part-of: dnstap-analyser
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount the pod runs as.
*/}}
{{- define "dnstap-analyser.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dnstap-analyser.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference: repository:tag, or repository@digest when a digest is set.
*/}}
{{- define "dnstap-analyser.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Container args: one "--flag=value" per analyser.* value that is not null. Integers go through
int64 so that large values (maxSessions: 2000000) are not printed in float notation (2e+06).
*/}}
{{- define "dnstap-analyser.args" -}}
{{- $a := .Values.analyser }}
{{- $tls := .Values.tls }}
{{- $listen := $a.listen }}
{{- if not $listen }}
{{- $listen = list (printf "%s://0.0.0.0:%d" (ternary "tls" "tcp" $tls.enabled) (int64 .Values.containerPort)) }}
{{- end }}
{{- range $listen }}
- {{ printf "--listen=%s" . | quote }}
{{- end }}
{{- /* TLS files: an explicit analyser.tls* value wins; else the mounted Secret's files with tls.enabled. */}}
{{- $cert := $a.tlsCert }}
{{- $key := $a.tlsKey }}
{{- $clientCa := $a.tlsClientCa }}
{{- if $tls.enabled }}
{{- $cert = $cert | default (printf "%s/tls.crt" $tls.mountPath) }}
{{- $key = $key | default (printf "%s/tls.key" $tls.mountPath) }}
{{- if $tls.clientCA }}
{{- $clientCa = $clientCa | default (printf "%s/ca.crt" $tls.mountPath) }}
{{- end }}
{{- end }}
{{- with $cert }}
- {{ printf "--tls-cert=%s" . | quote }}
{{- end }}
{{- with $key }}
- {{ printf "--tls-key=%s" . | quote }}
{{- end }}
{{- with $clientCa }}
- {{ printf "--tls-client-ca=%s" . | quote }}
{{- end }}
{{- if $a.tlsPinIdentity }}
- "--tls-pin-identity"
{{- end }}
{{- if not (kindIs "invalid" $a.readers) }}
- {{ printf "--readers=%d" (int64 $a.readers) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.shards) }}
- {{ printf "--shards=%d" (int64 $a.shards) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.queueCapacity) }}
- {{ printf "--queue-capacity=%d" (int64 $a.queueCapacity) | quote }}
{{- end }}
{{- if $a.pin }}
- "--pin"
{{- end }}
{{- if not (kindIs "invalid" $a.sessionTimeout) }}
- {{ printf "--session-timeout=%d" (int64 $a.sessionTimeout) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.orphanGrace) }}
- {{ printf "--orphan-grace=%d" (int64 $a.orphanGrace) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxSessions) }}
- {{ printf "--max-sessions=%d" (int64 $a.maxSessions) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxConnections) }}
- {{ printf "--max-connections=%d" (int64 $a.maxConnections) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxFrameSize) }}
- {{ printf "--max-frame-size=%d" (int64 $a.maxFrameSize) | quote }}
{{- end }}
{{- if $a.log }}
- {{ printf "--log=%s" (join "," $a.log) | quote }}
{{- end }}
{{- if $a.format }}
- {{ printf "--format=%s" $a.format | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.handshakeTimeout) }}
- {{ printf "--handshake-timeout=%d" (int64 $a.handshakeTimeout) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.idleTimeout) }}
- {{ printf "--idle-timeout=%d" (int64 $a.idleTimeout) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.frameBufferBudget) }}
- {{ printf "--frame-buffer-budget=%d" (int64 $a.frameBufferBudget) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxHandshaking) }}
- {{ printf "--max-handshaking=%d" (int64 $a.maxHandshaking) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.handshakesPerAddress) }}
- {{ printf "--handshakes-per-address=%d" (int64 $a.handshakesPerAddress) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.connectionsPerAddress) }}
- {{ printf "--connections-per-address=%d" (int64 $a.connectionsPerAddress) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.shutdownTimeout) }}
- {{ printf "--shutdown-timeout=%d" (int64 (include "dnstap-analyser.seconds" $a.shutdownTimeout)) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.sampleSucceeded) }}
- {{ printf "--sample-succeeded=%v" $a.sampleSucceeded | quote }}
{{- end }}
{{- if $a.messages }}
- {{ printf "--messages=%s" $a.messages | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxIdentityLabels) }}
- {{ printf "--max-identity-labels=%d" (int64 $a.maxIdentityLabels) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxUpstreamLabels) }}
- {{ printf "--max-upstream-labels=%d" (int64 $a.maxUpstreamLabels) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxSeriesPerFamily) }}
- {{ printf "--max-series-per-family=%d" (int64 $a.maxSeriesPerFamily) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxSeries) }}
- {{ printf "--max-series=%d" (int64 $a.maxSeries) | quote }}
{{- end }}
{{- if kindIs "string" $a.stallTimeout }}
- {{ printf "--stall-timeout=%s" $a.stallTimeout | quote }}
{{- else if not (kindIs "invalid" $a.stallTimeout) }}
- {{ printf "--stall-timeout=%d" (int64 $a.stallTimeout) | quote }}
{{- end }}
{{- if $a.logLookups }}
- {{ printf "--log-lookups=%s" $a.logLookups | quote }}
{{- end }}
{{- if $a.clusterDomain }}
- {{ printf "--cluster-domain=%s" $a.clusterDomain | quote }}
{{- end }}
{{- if $a.searchSuffix }}
- {{ printf "--search-suffix=%s" (join "," $a.searchSuffix) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxLookups) }}
- {{ printf "--max-lookups=%d" (int64 $a.maxLookups) | quote }}
{{- end }}
{{- /* --stats-interval: a duration ("60s") as given, or whole seconds. */}}
{{- if kindIs "string" $a.statsInterval }}
- {{ printf "--stats-interval=%s" $a.statsInterval | quote }}
{{- else if not (kindIs "invalid" $a.statsInterval) }}
- {{ printf "--stats-interval=%d" (int64 $a.statsInterval) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxIdentities) }}
- {{ printf "--max-identities=%d" (int64 $a.maxIdentities) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.identitiesPerConnection) }}
- {{ printf "--identities-per-connection=%d" (int64 $a.identitiesPerConnection) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.identityIdleTimeout) }}
- {{ printf "--identity-idle-timeout=%d" (int64 $a.identityIdleTimeout) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.maxTimeAhead) }}
- {{ printf "--max-time-ahead=%d" (int64 $a.maxTimeAhead) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.cacheWindow) }}
- {{ printf "--cache-window=%d" (int64 $a.cacheWindow) | quote }}
{{- end }}
{{- if not (kindIs "invalid" $a.upstreamFailingWindow) }}
- {{ printf "--upstream-failing-window=%d" (int64 $a.upstreamFailingWindow) | quote }}
{{- end }}
{{- /* --metrics-listen only when it differs from the analyser's default 0.0.0.0:9435. */}}
{{- if not .Values.metrics.enabled }}
- "--metrics-listen=none"
{{- else if $a.metricsListen }}
- {{ printf "--metrics-listen=%s" $a.metricsListen | quote }}
{{- else if ne (int64 .Values.metrics.port) 9435 }}
- {{ printf "--metrics-listen=0.0.0.0:%d" (int64 .Values.metrics.port) | quote }}
{{- end }}
{{- $web := .Values.metrics.webConfig }}
{{- $webConfig := $a.metricsWebConfig }}
{{- if and .Values.metrics.enabled $web.secretName }}
{{- $webConfig = $webConfig | default (printf "%s/%s" $web.mountPath $web.key) }}
{{- end }}
{{- with $webConfig }}
- {{ printf "--metrics-web-config=%s" . | quote }}
{{- end }}
{{- if or $a.noTop (not .Values.metrics.top) }}
- "--no-top"
{{- end }}
{{- range $a.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
A probe from values: as given, except that with metrics.enabled=false an httpGet probe (it would
target the metrics port, which is then closed) becomes a TCP connection to the dnstap port with the
same timings. Called with (dict "probe" <probe values> "root" $).
*/}}
{{- define "dnstap-analyser.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if and (not .root.Values.metrics.enabled) (hasKey $probe "httpGet") }}
{{- $_ := unset $probe "httpGet" }}
{{- $_ := set $probe "tcpSocket" (dict "port" "dnstap") }}
{{- else if and .root.Values.metrics.webConfig.tls (hasKey $probe "httpGet") }}
{{- /* The kubelet's HTTPS probe does not verify the certificate; the probes need no credentials. */}}
{{- $_ := set $probe.httpGet "scheme" "HTTPS" }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
Name of the Secret with the TLS certificate: tls.existingSecret, else the cert-manager
Certificate's secretName, else <fullname>-tls.
*/}}
{{- define "dnstap-analyser.tlsSecretName" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else }}
{{- .Values.tls.certManager.secretName | default (printf "%s-tls" (include "dnstap-analyser.fullname" .)) }}
{{- end }}
{{- end }}

{{/*
Combinations of values the schema cannot express. Renders nothing, or fails with the reason.
*/}}
{{- define "dnstap-analyser.validate" -}}
{{- $tls := .Values.tls }}
{{- $cm := $tls.certManager }}
{{- if and $tls.enabled (not $tls.existingSecret) (not $cm.enabled) }}
{{- fail "tls.enabled needs a certificate: set tls.existingSecret, or tls.certManager.enabled with tls.certManager.issuerRef.name" }}
{{- end }}
{{- if and $tls.existingSecret $cm.enabled }}
{{- fail "tls.existingSecret and tls.certManager.enabled exclude each other: the Certificate writes its own Secret (tls.certManager.secretName)" }}
{{- end }}
{{- if and $cm.enabled (not $cm.issuerRef.name) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (an Issuer or ClusterIssuer of cert-manager)" }}
{{- end }}
{{- if and $tls.enabled .Values.analyser.listen }}
{{- $tlsListen := false }}
{{- range .Values.analyser.listen }}
{{- if hasPrefix "tls://" . }}{{ $tlsListen = true }}{{ end }}
{{- end }}
{{- if not $tlsListen }}
{{- fail "tls.enabled, but analyser.listen has no tls:// address: leave analyser.listen empty or list a tls:// address" }}
{{- end }}
{{- end }}
{{- $web := .Values.metrics.webConfig }}
{{- if and $web.tls (not $web.secretName) (not .Values.analyser.metricsWebConfig) }}
{{- fail "metrics.webConfig.tls needs a web config with tls_server_config: set metrics.webConfig.secretName (or analyser.metricsWebConfig)" }}
{{- end }}
{{- if and (or $web.secretName $web.tlsSecretName) (not .Values.metrics.enabled) }}
{{- fail "metrics.webConfig secures the metrics port: it needs metrics.enabled" }}
{{- end }}
{{- $grace := .Values.terminationGracePeriodSeconds }}
{{- $needed := add (include "dnstap-analyser.drainSeconds" .) 5 }}
{{- if and (not (kindIs "invalid" $grace)) (lt (int64 $grace) (int64 $needed)) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + analyser.sessionTimeout + 5 = %d: the pod needs that long to drain and flush its open sessions" (int64 $grace) (int64 $needed)) }}
{{- end }}
{{- $exit := add (int64 .Values.preStopSleepSeconds) (include "dnstap-analyser.shutdownSeconds" .) 5 }}
{{- if and (not (kindIs "invalid" $grace)) (lt (int64 $grace) (int64 $exit)) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + analyser.shutdownTimeout + 5 = %d: the analyser must reach its shutdown deadline before the kubelet's SIGKILL" (int64 $grace) (int64 $exit)) }}
{{- end }}
{{- end }}

{{/*
Seconds a stopping pod needs before the flush can start and for the flush itself: the preStop sleep
plus one session timeout (an analyser that keeps up flushes the sessions of one timeout in less).
*/}}
{{- define "dnstap-analyser.drainSeconds" -}}
{{- $timeout := .Values.analyser.sessionTimeout }}
{{- if kindIs "invalid" $timeout }}{{ $timeout = 10 }}{{ end }}
{{- add (int64 .Values.preStopSleepSeconds) (include "dnstap-analyser.seconds" $timeout) }}
{{- end }}

{{/*
Whole seconds (rounded up) of a duration value: a number of seconds, or a string such as "10",
"500ms", "15s", "2m", "1h".
*/}}
{{- define "dnstap-analyser.seconds" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}
{{- $scale := 1.0 }}
{{- if hasSuffix "ms" $v }}{{ $v = trimSuffix "ms" $v }}{{ $scale = 0.001 }}
{{- else if hasSuffix "h" $v }}{{ $v = trimSuffix "h" $v }}{{ $scale = 3600.0 }}
{{- else if hasSuffix "m" $v }}{{ $v = trimSuffix "m" $v }}{{ $scale = 60.0 }}
{{- else }}{{ $v = trimSuffix "s" $v }}
{{- end }}
{{- mulf (float64 $v) $scale | ceil | int64 }}
{{- else }}
{{- $v | float64 | ceil | int64 }}
{{- end }}
{{- end }}

{{/*
--shutdown-timeout in seconds: analyser.shutdownTimeout, or the binary's default (20 s).
*/}}
{{- define "dnstap-analyser.shutdownSeconds" -}}
{{- $a := .Values.analyser }}
{{- if kindIs "invalid" $a.shutdownTimeout }}20{{ else }}{{ include "dnstap-analyser.seconds" $a.shutdownTimeout }}{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the value, or the drain time plus 15 s for the writer and the exit,
and at least the preStop sleep plus the analyser's --shutdown-timeout plus 5 s: at that deadline
the analyser prints the summary with the sessions it could not write and exits, before the
kubelet's SIGKILL.
*/}}
{{- define "dnstap-analyser.terminationGracePeriodSeconds" -}}
{{- $grace := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $grace }}
{{- $drain := add (include "dnstap-analyser.drainSeconds" .) 15 }}
{{- $exit := add (int64 .Values.preStopSleepSeconds) (include "dnstap-analyser.shutdownSeconds" .) 5 }}
{{- max (int64 $drain) (int64 $exit) }}
{{- else }}
{{- int64 $grace }}
{{- end }}
{{- end }}
