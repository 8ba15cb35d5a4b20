{{/*
Shared names, labels and snippets. Object names are fixed (not prefixed
with the release name): the sidecars, the webhook and the README address
the control plane as `outrigger-control-plane.<namespace>.svc`, so one
release per namespace, and one mesh per cluster (the webhook and the
ClusterRole are cluster-wide).
*/}}

{{- define "outrigger.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries; pass (dict "ctx" $ "component" "control-plane"). */}}
{{- define "outrigger.labels" -}}
app.kubernetes.io/name: outrigger-{{ .component }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: outrigger
app.kubernetes.io/version: {{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "outrigger.chart" .ctx }}
{{- end }}

{{/* The immutable subset used in selectors. */}}
{{- define "outrigger.selectorLabels" -}}
app.kubernetes.io/name: outrigger-{{ .component }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- end }}

{{/* repository:tag of the one image (control plane, gateway and sidecars). */}}
{{- define "outrigger.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The sidecar's image: sidecar.image when set, else the chart's image. */}}
{{- define "outrigger.sidecarImage" -}}
{{ .Values.sidecar.image.repository | default .Values.image.repository }}:{{ .Values.sidecar.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "outrigger.initImage" -}}
{{ .Values.sidecar.initImage.repository }}:{{ .Values.sidecar.initImage.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "outrigger.controlPlaneHost" -}}
outrigger-control-plane.{{ .Release.Namespace }}.svc
{{- end }}

{{/*
Pod and container security: a non-root UID (1337, which the sidecars'
traffic redirection also exempts), no privilege escalation, no
capabilities, a read-only root filesystem and the runtime's seccomp profile.
*/}}
{{- define "outrigger.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1337
runAsGroup: 1337
fsGroup: 1337
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "outrigger.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1337
runAsGroup: 1337
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}
