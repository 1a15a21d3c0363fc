{{/*
The alert rules (the `spec` of the PrometheusRule), rendered from monitoring.prometheusRule.
files/alerts.yaml is this rendering with the default values, for a Prometheus without the operator;
tests/deploy.rs checks that both stay equal and regenerates the file with
DNSTAP_BLESS_MONITORING_MANIFESTS=1. Runbooks: docs/operations.md "Alerts".
*/}}
{{- define "dnstap-analyser.alertRules" -}}
{{- $p := .Values.monitoring.prometheusRule }}
{{- $r := $p.rules }}
{{- /* $g: the groupBy labels alone ("cluster"); $gc: the same as a prefix ("cluster, "). */}}
{{- $g := join ", " $p.groupBy }}
{{- $gc := ternary "" (printf "%s, " $g) (empty $g) -}}
# Alerting rules of dnstap-analyser, rendered from the Helm chart's values
# (monitoring.prometheusRule); docs/operations.md "Alerts" has every alert's runbook.
#
# Alerts that aggregate over CoreDNS pods or analyser replicas keep the labels of
# monitoring.prometheusRule.groupBy ({{ $g | default "none" }}), so one Prometheus for several
# clusters alerts per cluster. SampleLoss sessions are never DNS failures: the failure alerts select
# status="Failed" and leave SampleLoss out of their denominators.
groups:
  - name: dnstap-analyser
    rules:
{{- with $r.DnstapAnalyserDown }}{{ if .enabled }}
      # An analyser target that exposed dnstap-analyser metrics in the lookback window no longer
      # answers its scrape. Joining `up` with the analyser's own build_info selects its targets
      # whatever the job label (ServiceMonitor: the Service's name; annotations: kubernetes-pods).
      # A pod deleted on purpose leaves service discovery, so its `up` series ends instead of
      # turning 0.
      - alert: DnstapAnalyserDown
        expr: |
          (up == 0)
          and on (job, instance)
            last_over_time(dnstap_analyser_build_info[{{ .lookback }}])
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapAnalyserDown" "rule" . "p" $p) }}
          summary: {{`"dnstap-analyser {{ $labels.instance }} is down"`}}
          description: {{`"Prometheus cannot scrape the dnstap-analyser at {{ $labels.instance }} (job {{ $labels.job }}). The CoreDNS pods it received dnstap from are not observed, and the other dnstap alerts are blind for them."`}}
{{- end }}{{ end }}
{{- with $r.DnstapAnalyserAbsent }}{{ if .enabled }}
      # No analyser exposes metrics at all: every analyser of the group seen in the lookback window
      # is gone, or none was ever scraped (absent). Scrape-style independent: no job selector.
      - alert: DnstapAnalyserAbsent
        expr: |
          (
              count by ({{ $g }}) (last_over_time(dnstap_analyser_build_info[{{ .lookback }}]))
            unless on ({{ $g }})
              count by ({{ $g }}) (dnstap_analyser_build_info)
          )
          or
          absent(dnstap_analyser_build_info)
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapAnalyserAbsent" "rule" . "p" $p) }}
          summary: "No dnstap-analyser is scraped"
          description: "Prometheus has no dnstap-analyser metrics: the analyser is not running, or nothing scrapes it (ServiceMonitor, scrape annotations). CoreDNS traffic is not observed and every other dnstap alert is silent."
{{- end }}{{ end }}
{{- with $r.DnstapDNSFailing }}{{ if .enabled }}
      # Critical tier: over all CoreDNS pods, a large share of the DNS sessions (SampleLoss left
      # out) fail, whatever the cause: clients of the cluster see DNS failing.
      - alert: DnstapDNSFailing
        expr: |
          (
              sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status="Failed"}[5m]))
            /
              sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status!="SampleLoss"}[5m]))
          ) > {{ .ratio }}
          and on ({{ $g }})
            sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status!="SampleLoss"}[5m])) >= {{ .minRate }}
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapDNSFailing" "rule" . "p" $p) }}
          summary: "DNS fails for {{`{{ $value | humanizePercentage }}`}} of the cluster's queries"
          description: "{{`{{ $value | humanizePercentage }}`}} of the DNS sessions of all CoreDNS pods failed over the last 5 minutes (threshold {{ include "dnstap-analyser.percent" .ratio }}; timeouts, error rcodes, no response; SampleLoss sessions are not counted)."
{{- end }}{{ end }}
{{- with $r.DnstapUpstreamTimingOut }}{{ if .enabled }}
      # Per upstream, over all CoreDNS pods: forwarded attempts that got no answer. One upstream
      # outage seen by every CoreDNS pod is one alert. The rate floor keeps a single lost packet on
      # a quiet upstream from paging.
      - alert: DnstapUpstreamTimingOut
        expr: |
          (
              sum by ({{ $gc }}upstream) (rate(dnstap_analyser_upstream_attempts_total{outcome="timeout"}[5m]))
            /
              sum by ({{ $gc }}upstream) (rate(dnstap_analyser_upstream_attempts_total[5m]))
          ) > {{ .ratio }}
          and on ({{ $gc }}upstream)
            sum by ({{ $gc }}upstream) (rate(dnstap_analyser_upstream_attempts_total[5m])) >= {{ .minRate }}
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapUpstreamTimingOut" "rule" . "p" $p) }}
          summary: {{`"Upstream {{ $labels.upstream }} does not answer CoreDNS"`}}
          description: "{{`{{ $value | humanizePercentage }}`}} of the queries the CoreDNS pods forwarded to {{`{{ $labels.upstream }}`}} got no answer in the last 5 minutes (threshold {{ include "dnstap-analyser.percent" .ratio }}). Their clients get SERVFAIL or time out."
{{- end }}{{ end }}
{{- with $r.DnstapErrorRcodesRising }}{{ if .enabled }}
      # Over all CoreDNS pods: sessions that failed with an error rcode (from an upstream or from
      # CoreDNS itself). Timeouts and no-responses have their own alerts.
      - alert: DnstapErrorRcodesRising
        expr: |
          (
              sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status="Failed", cause=~"upstream_error|cached_upstream_error|server_error"}[5m]))
            /
              sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status!="SampleLoss"}[5m]))
          ) > {{ .ratio }}
          and on ({{ $g }})
            sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status!="SampleLoss"}[5m])) >= {{ .minRate }}
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapErrorRcodesRising" "rule" . "p" $p) }}
          summary: "CoreDNS answers {{`{{ $value | humanizePercentage }}`}} of the queries with error rcodes"
          description: "{{`{{ $value | humanizePercentage }}`}} of the DNS sessions of the CoreDNS pods failed with an error rcode (SERVFAIL, REFUSED, ...) over the last 5 minutes (threshold {{ include "dnstap-analyser.percent" .ratio }}; SampleLoss sessions are not counted)."
{{- end }}{{ end }}
{{- with $r.DnstapCoreDNSNotAnswering }}{{ if .enabled }}
      # Over all CoreDNS pods: CoreDNS received the query and never answered it (cause
      # no_response), e.g. at forward's max_concurrent or when a pod is overloaded.
      - alert: DnstapCoreDNSNotAnswering
        expr: |
          (
              sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status="Failed", cause="no_response"}[5m]))
            /
              sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status!="SampleLoss"}[5m]))
          ) > {{ .ratio }}
          and on ({{ $g }})
            sum by ({{ $g }}) (rate(dnstap_analyser_sessions_total{status!="SampleLoss"}[5m])) >= {{ .minRate }}
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapCoreDNSNotAnswering" "rule" . "p" $p) }}
          summary: "CoreDNS leaves {{`{{ $value | humanizePercentage }}`}} of the queries unanswered"
          description: "{{`{{ $value | humanizePercentage }}`}} of the DNS sessions of the CoreDNS pods got no response at all over the last 5 minutes (threshold {{ include "dnstap-analyser.percent" .ratio }}; cause no_response). Clients time out and retry."
{{- end }}{{ end }}
{{- with $r.DnstapCoreDNSDroppingTapMessages }}{{ if .enabled }}
      # Per CoreDNS pod (its own dnstap queue overflows), over all analyser replicas. Not a DNS
      # failure: the sessions come out as SampleLoss and the answers to clients are unaffected.
      - alert: DnstapCoreDNSDroppingTapMessages
        expr: |
          sum by ({{ $gc }}identity) (rate(dnstap_analyser_sessions_total{status="SampleLoss", cause="sender_loss"}[5m])) > {{ .minRate }}
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapCoreDNSDroppingTapMessages" "rule" . "p" $p) }}
          summary: {{`"CoreDNS pod {{ $labels.identity }} drops dnstap messages"`}}
          description: {{`"{{ $value | humanize }} sessions/s of CoreDNS pod {{ $labels.identity }} are incomplete because CoreDNS dropped dnstap messages before sending them (SampleLoss, cause sender_loss). DNS answers are not affected; the analyser's view of this pod is."`}}
{{- end }}{{ end }}
{{- with $r.DnstapAnalyserDropping }}{{ if .enabled }}
      # Per analyser replica: it discards messages because a shard queue or the session table is
      # full, or sessions come out as SampleLoss with cause analyser_loss. Discards that say
      # nothing about load (undecodable messages, bad frames or connections) do not count here.
      # When both halves are true for a replica, the discard reasons are reported, not
      # analyser_loss.
      - alert: DnstapAnalyserDropping
        expr: |
          sum by ({{ $gc }}job, instance, reason) (rate(dnstap_analyser_discarded_messages_total{reason=~"queue_full|queue_disconnected|session_table_full"}[5m])) > {{ .minRate }}
          or on ({{ $gc }}job, instance)
          label_replace(
              sum by ({{ $gc }}job, instance) (rate(dnstap_analyser_sessions_total{cause="analyser_loss"}[5m])) > {{ .minRate }},
              "reason", "analyser_loss", "", ""
          )
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapAnalyserDropping" "rule" . "p" $p) }}
          summary: {{`"dnstap-analyser {{ $labels.instance }} drops events ({{ $labels.reason }})"`}}
          description: {{`"The analyser at {{ $labels.instance }} lost {{ $value | humanize }} messages or sessions per second to {{ $labels.reason }} over the last 5 minutes: it cannot keep up, and the affected sessions come out as SampleLoss."`}}
{{- end }}{{ end }}
{{- with $r.DnstapCoreDNSPodSilent }}{{ if .enabled }}
      # Per CoreDNS pod, over all analyser replicas: it sent dnstap within the lookback window but
      # nothing for silentFor, and its last stream did not end with a clean Frame Streams STOP.
      # A CoreDNS that shuts down cleanly (scale-down, rollout) sends STOP: identity_stopped is 1.
      # The analyser reclaims an idle identity after --identity-idle-timeout and removes all its
      # series, so the rule reads the last value over the window (last_over_time), not the
      # current one, and never needs a series to exist now. identity="reclaimed" is the aggregate
      # of reclaimed identities, not a pod.
      - alert: DnstapCoreDNSPodSilent
        expr: |
          (
              sum by ({{ $gc }}identity) (increase(dnstap_analyser_messages_total{identity!="reclaimed"}[{{ .lookback }}])) > 0
            unless on ({{ $gc }}identity)
              sum by ({{ $gc }}identity) (increase(dnstap_analyser_messages_total[{{ .silentFor }}])) > 0
          )
          unless on ({{ $gc }}identity)
            max by ({{ $gc }}identity) (last_over_time(dnstap_analyser_identity_stopped[{{ .lookback }}])) == 1
{{- include "dnstap-analyser.alertMeta" (dict "name" "DnstapCoreDNSPodSilent" "rule" . "p" $p) }}
          summary: {{`"CoreDNS pod {{ $labels.identity }} stopped sending dnstap"`}}
          description: "CoreDNS pod {{`{{ $labels.identity }}`}} sent dnstap messages within the last {{ .lookback }} but none for at least {{ .silentFor }}, and its stream ended without a clean STOP (a crash, a kill, a lost connection). Its DNS traffic is no longer observed."
{{- end }}{{ end }}
{{- end }}

{{/*
`for`, labels and the runbook link of one alert; the annotations block stays open for the rule's
summary and description. Called with (dict "name" <alert> "rule" <its values> "p" <prometheusRule
values>). Labels: the rule's own over monitoring.prometheusRule.alertLabels over severity.
*/}}
{{- define "dnstap-analyser.alertMeta" }}
        for: {{ .rule.for }}
        labels:
          {{- merge (deepCopy (.rule.labels | default dict)) (.p.alertLabels | default dict) (dict "severity" .rule.severity) | toYaml | nindent 10 }}
        annotations:
          runbook_url: {{ printf "%s#%s" .p.runbookBaseUrl (lower .name) | quote }}
{{- end }}

{{/*
A ratio as a percentage for the descriptions: 0.05 -> "5%" (4 significant digits, so that float
products such as 5.000000000000001 print as 5).
*/}}
{{- define "dnstap-analyser.percent" -}}
{{- printf "%.4g%%" (mulf . 100) }}
{{- end }}
