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
{{- $listen := $a.listen }}
{{- if not $listen }}
{{- $listen = list (printf "tcp://0.0.0.0:%d" (int64 .Values.containerPort)) }}
{{- end }}
{{- range $listen }}
- {{ printf "--listen=%s" . | quote }}
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
{{- /* --metrics-listen only when it differs from the analyser's default 0.0.0.0:9435. */}}
{{- if not .Values.metrics.enabled }}
- "--metrics-listen=none"
{{- else if $a.metricsListen }}
- {{ printf "--metrics-listen=%s" $a.metricsListen | quote }}
{{- else if ne (int64 .Values.metrics.port) 9435 }}
- {{ printf "--metrics-listen=0.0.0.0:%d" (int64 .Values.metrics.port) | quote }}
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
{{- end }}
{{- toYaml $probe }}
{{- end }}
