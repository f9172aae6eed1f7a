{{/*
Names, labels and shared fragments. Everything that more than one template needs lives here so
that the router, worker and etcd templates cannot disagree about a name or a selector.
*/}}

{{- define "allam.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 20 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name. Truncated to 30 characters: worker StatefulSets are <fullname>-worker-<pool> (pool
names up to 12): 30 + 8 + 12 = 50, within the 52 characters a StatefulSet name may have so that
"<name>-<ordinal>" and the controller-revision-hash label ("<name>-<10-char hash>") fit in 63.
*/}}
{{- define "allam.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "allam.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "allam.labels" -}}
helm.sh/chart: {{ include "allam.chart" . }}
app.kubernetes.io/name: {{ include "allam.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: allam-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod template labels: no chart version, so a chart-only upgrade does not restart GPU workers.
*/}}
{{- define "allam.podLabels" -}}
{{ include "allam.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: allam-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "allam.selectorLabels" -}}
app.kubernetes.io/name: {{ include "allam.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "allam.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "allam.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "allam.routerName" -}}
{{- printf "%s-router" (include "allam.fullname" .) -}}
{{- end -}}

{{- define "allam.etcdName" -}}
{{- printf "%s-etcd" (include "allam.fullname" .) -}}
{{- end -}}

{{/* Worker StatefulSet name for a pool. Call with (dict "root" $ "pool" $pool). */}}
{{- define "allam.workerName" -}}
{{- printf "%s-worker-%s" (include "allam.fullname" .root) .pool.name -}}
{{- end -}}

{{/* image reference: call with (dict "image" .Values.router.image "root" $) */}}
{{- define "allam.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion (toString (default "" .image.tag))) -}}
{{- end -}}

{{/*
etcd client endpoints, comma separated. Bundled: every member by its stable DNS name, so the
client can fail over without depending on a Service's endpoint updates.
*/}}
{{- define "allam.etcdEndpoints" -}}
{{- if eq .Values.etcd.mode "external" -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- else -}}
{{- $name := include "allam.etcdName" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s-headless.%s.svc.%s:%d" $name $i $name $.Release.Namespace $.Values.clusterDomain (int $.Values.etcd.bundled.clientPort)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}
{{- end -}}

{{/*
Effective settings of every worker pool, as YAML: {pools: [...]}. worker.* gives the defaults;
a pool's map values are merged one level deep, everything else replaces. Written by hand rather
than with sprig's merge: merge treats false/0/"" in the override as unset, so a pool could not
turn a default off.
*/}}
{{- define "allam.workerPools" -}}
{{- $pools := list -}}
{{- range $pool := .Values.worker.pools -}}
{{- $p := deepCopy $.Values.worker -}}
{{- $_ := unset $p "pools" -}}
{{- range $k, $v := $pool -}}
{{- if and (kindIs "map" $v) (kindIs "map" (index $p $k)) -}}
{{- $m := deepCopy (index $p $k) -}}
{{- range $k2, $v2 := $v -}}
{{- $_ := set $m $k2 $v2 -}}
{{- end -}}
{{- $_ := set $p $k $m -}}
{{- else -}}
{{- $_ := set $p $k $v -}}
{{- end -}}
{{- end -}}
{{- $pools = append $pools $p -}}
{{- end -}}
{{- toYaml (dict "pools" $pools) -}}
{{- end -}}

{{/* terminationGracePeriodSeconds of a worker pool (call with the effective pool). */}}
{{- define "allam.workerGrace" -}}
{{- if kindIs "invalid" .terminationGracePeriodSeconds -}}
{{- add (int .preStopSleepSeconds) (int .shutdownTimeoutSeconds) 15 -}}
{{- else -}}
{{- int .terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Which model source is configured: pvc | download | preset | "" (none) | "many". */}}
{{- define "allam.modelSource" -}}
{{- $sources := list -}}
{{- if .Values.model.pvc.claimName -}}{{- $sources = append $sources "pvc" -}}{{- end -}}
{{- if .Values.model.download.image -}}{{- $sources = append $sources "download" -}}{{- end -}}
{{- if .Values.model.preset -}}{{- $sources = append $sources "preset" -}}{{- end -}}
{{- if gt (len $sources) 1 -}}many{{- else -}}{{- join "" $sources -}}{{- end -}}
{{- end -}}

{{/*
Probe: fills in the port of a grpc / httpGet / tcpSocket probe when values leave it out.
Call with (dict "probe" $probe "grpcPort" N "httpPort" "http").
*/}}
{{- define "allam.probe" -}}
{{- $p := deepCopy .probe -}}
{{- if hasKey $p "grpc" -}}
{{- $g := default (dict) $p.grpc -}}
{{- if not (hasKey $g "port") -}}{{- $_ := set $g "port" (int .grpcPort) -}}{{- end -}}
{{- $_ := set $p "grpc" $g -}}
{{- end -}}
{{- if hasKey $p "httpGet" -}}
{{- $h := default (dict) $p.httpGet -}}
{{- if not (hasKey $h "port") -}}{{- $_ := set $h "port" .httpPort -}}{{- end -}}
{{- $_ := set $p "httpGet" $h -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/*
Model volumes for a pod, by source. The main container mounts "model" read-only at
model.mountPath. Call with (dict "root" $ "sizeLimit" ... "persistent" bool).
*/}}
{{- define "allam.modelVolume" -}}
{{- $src := include "allam.modelSource" .root -}}
{{- if eq $src "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .root.Values.model.pvc.claimName }}
    readOnly: true
{{- else if and (eq $src "download") (not .persistent) }}
- name: model
  emptyDir:
    sizeLimit: {{ .root.Values.model.download.sizeLimit }}
{{- else if eq $src "preset" }}
- name: model
  emptyDir:
    sizeLimit: 2Gi
{{- end }}
{{- end -}}

{{/* The directory passed as --model: the demo preset is written one level down so that
`allam demo-model` creates its own directory instead of filling a mount point. */}}
{{- define "allam.modelDir" -}}
{{- if eq (include "allam.modelSource" .) "preset" -}}
{{- printf "%s/%s" .Values.model.mountPath .Values.model.preset -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "allam.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- if and .Values.model.pvc.claimName .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
{{- end }}
{{- end -}}

{{/*
Init container that fills the "model" volume (download or demo preset); nothing for a PVC.
Call with (dict "root" $ "image" <image values> "role" "router"|"worker").
*/}}
{{- define "allam.modelInit" -}}
{{- $root := .root -}}
{{- $src := include "allam.modelSource" $root -}}
{{- $dl := $root.Values.model.download -}}
{{- if eq $src "download" }}
- name: fetch-model
  image: {{ $dl.image }}
  imagePullPolicy: {{ $dl.pullPolicy }}
  {{- $cmd := $dl.command }}
  {{- $args := $dl.args }}
  {{- if and (eq .role "router") $dl.routerCommand }}
  {{- $cmd = $dl.routerCommand }}
  {{- end }}
  {{- if and (eq .role "router") $dl.routerArgs }}
  {{- $args = $dl.routerArgs }}
  {{- end }}
  {{- with $cmd }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - name: MODEL_DIR
      value: {{ $root.Values.model.mountPath | quote }}
    - name: HOME
      value: /tmp
    {{- with $dl.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $dl.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $dl.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $root.Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- else if eq $src "preset" }}
- name: demo-model
  image: {{ include "allam.image" (dict "image" .image "root" $root) }}
  imagePullPolicy: {{ .image.pullPolicy }}
  args: ["demo-model", "--out", {{ include "allam.modelDir" $root | quote }}]
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $root.Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}
