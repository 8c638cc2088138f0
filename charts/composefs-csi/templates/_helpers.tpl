{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "composefs-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "composefs-csi.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The CSI driver name (BRIEF: fixed). */}}
{{- define "composefs-csi.driverName" -}}csi.composefs.io{{- end -}}

{{- define "composefs-csi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "composefs-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: composefs-csi
{{- end -}}

{{/* Selector labels of one component: call with (list $ "node"). */}}
{{- define "composefs-csi.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "composefs-csi.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "composefs-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "composefs-csi.sidecarImage" -}}
{{- printf "%s:%s" .image.repository .image.tag -}}
{{- end -}}

{{/* Paths ------------------------------------------------------------------------------- */}}

{{- define "composefs-csi.dataDir" -}}{{ trimSuffix "/" .Values.dataDir }}{{- end -}}
{{- define "composefs-csi.storePath" -}}{{ trimSuffix "/" .Values.dataDir }}/store{{- end -}}
{{- define "composefs-csi.mountRoot" -}}{{ trimSuffix "/" .Values.dataDir }}/mnt{{- end -}}
{{- define "composefs-csi.runDir" -}}{{ trimSuffix "/" .Values.runDir }}{{- end -}}
{{- define "composefs-csi.kubeletDir" -}}{{ trimSuffix "/" .Values.kubeletDir }}{{- end -}}
{{- define "composefs-csi.pluginDir" -}}{{ include "composefs-csi.kubeletDir" . }}/plugins/{{ include "composefs-csi.driverName" . }}{{- end -}}
{{- define "composefs-csi.configDir" -}}/etc/composefs-csi{{- end -}}
{{- define "composefs-csi.controllerCache" -}}/var/cache/composefs-csi{{- end -}}

{{/* Where a repository's credential and CA files are mounted. */}}
{{- define "composefs-csi.repoDir" -}}/etc/composefs-csi/repositories/{{ . }}{{- end -}}

{{/* Checks values.schema.json cannot express; each fails with a message naming the value. */}}
{{- define "composefs-csi.validate" -}}
{{- if not (semverCompare .Chart.KubeVersion .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "Kubernetes %s is not supported: this chart needs %s" .Capabilities.KubeVersion.Version .Chart.KubeVersion) -}}
{{- end -}}
{{- $names := list -}}
{{- range $i, $r := .Values.repositories -}}
{{- if has $r.name $names -}}
{{- fail (printf "repositories[%d]: duplicate repository name %q" $i $r.name) -}}
{{- end -}}
{{- $names = append $names $r.name -}}
{{- range $r.urls -}}
{{- if and (hasPrefix "http://" (lower .)) (not $r.allowPlainHttp) -}}
{{- fail (printf "repositories[%d] (%s): plain http URL %q refused; use https, or set allowPlainHttp: true (content is still verified against its digest)" $i $r.name .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.defaultRepository (not (has .Values.defaultRepository $names)) -}}
{{- fail (printf "defaultRepository: %q is not the name of a configured repository (configured: %s)" .Values.defaultRepository (join ", " $names)) -}}
{{- end -}}
{{- if and .Values.store.sizeCap (ge (float64 .Values.store.lowWatermark) (float64 .Values.store.highWatermark)) -}}
{{- fail "store.lowWatermark must be below store.highWatermark" -}}
{{- end -}}
{{- range $i, $sc := .Values.storageClasses -}}
{{- $p := $sc.parameters | default dict -}}
{{- $fromPVC := eq (toString (index $p "imageFromPVCAnnotation" | default "")) "true" -}}
{{- if and $fromPVC (not $.Values.controller.imageFromPVCAnnotation) -}}
{{- fail (printf "storageClasses[%d] (%s): imageFromPVCAnnotation needs controller.imageFromPVCAnnotation: true" $i $sc.name) -}}
{{- end -}}
{{- if and (not $fromPVC) (not (or (index $p "image") (index $p "layers"))) -}}
{{- fail (printf "storageClasses[%d] (%s): parameters need image or layers (or imageFromPVCAnnotation: \"true\")" $i $sc.name) -}}
{{- end -}}
{{- if and (index $p "image") (index $p "layers") -}}
{{- fail (printf "storageClasses[%d] (%s): give either image or layers, not both" $i $sc.name) -}}
{{- end -}}
{{- if and (index $p "repository") (not (has (index $p "repository") $names)) -}}
{{- fail (printf "storageClasses[%d] (%s): repository %q is not configured (configured: %s)" $i $sc.name (index $p "repository") (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.controller.enabled) .Values.storageClasses -}}
{{- fail "storageClasses need the controller (controller.enabled: true)" -}}
{{- end -}}
{{- end -}}

{{/* Configuration file -------------------------------------------------------------------
     The driver's config (csi/config.py): snake_case keys, credentials as file paths. */}}

{{- define "composefs-csi.repositoriesConfig" -}}
{{- $out := list -}}
{{- range $r := .Values.repositories -}}
{{- $dir := include "composefs-csi.repoDir" $r.name -}}
{{- $d := dict "name" $r.name "urls" $r.urls -}}
{{- if $r.allowPlainHttp -}}{{- $_ := set $d "allow_plain_http" true -}}{{- end -}}
{{- with $r.auth -}}
{{- if eq .type "bearer" -}}
{{- $_ := set $d "auth" (dict "type" "bearer" "token_file" (printf "%s/token" $dir)) -}}
{{- else -}}
{{- $_ := set $d "auth" (dict "type" "basic" "username" .username "password_file" (printf "%s/password" $dir)) -}}
{{- end -}}
{{- end -}}
{{- if $r.caBundle -}}{{- $_ := set $d "ca_bundle" (printf "%s/ca.crt" $dir) -}}{{- end -}}
{{- if $r.clientCertificate -}}
{{- $_ := set $d "client_cert" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $d "client_key" (printf "%s/tls.key" $dir) -}}
{{- end -}}
{{- if hasKey $r "concurrency" -}}{{- $_ := set $d "concurrency" $r.concurrency -}}{{- end -}}
{{- if hasKey $r "processes" -}}{{- $_ := set $d "processes" $r.processes -}}{{- end -}}
{{- if hasKey $r "maxImageSize" -}}{{- $_ := set $d "max_image_size" $r.maxImageSize -}}{{- end -}}
{{- if hasKey $r "offlineRefs" -}}{{- $_ := set $d "offline_refs" $r.offlineRefs -}}{{- end -}}
{{- if hasKey $r "offlineMaxStaleness" -}}{{- $_ := set $d "offline_max_staleness" $r.offlineMaxStaleness -}}{{- end -}}
{{- with $r.timeouts -}}{{- $_ := set $d "timeouts" . -}}{{- end -}}
{{- with $r.retries -}}
{{- $rt := dict -}}
{{- if hasKey . "maxAttempts" -}}{{- $_ := set $rt "max_attempts" .maxAttempts -}}{{- end -}}
{{- if hasKey . "baseBackoff" -}}{{- $_ := set $rt "base_backoff" .baseBackoff -}}{{- end -}}
{{- if hasKey . "maxBackoff" -}}{{- $_ := set $rt "max_backoff" .maxBackoff -}}{{- end -}}
{{- $_ := set $d "retries" $rt -}}
{{- end -}}
{{- $out = append $out $d -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* Call with (list $ "node") or (list $ "controller"): the controller keeps its small metadata
     cache in its own pod instead of the node store. */}}
{{- define "composefs-csi.config" -}}
{{- $ := index . 0 -}}
{{- $role := index . 1 -}}
{{- $v := $.Values -}}
{{- $store := dict "high_watermark" $v.store.highWatermark "low_watermark" $v.store.lowWatermark -}}
{{- if eq $role "controller" -}}
{{- $_ := set $store "path" (include "composefs-csi.controllerCache" $) -}}
{{- $_ := set $store "size_cap" $v.controller.cacheSizeCap -}}
{{- else -}}
{{- $_ := set $store "path" (include "composefs-csi.storePath" $) -}}
{{- if $v.store.sizeCap -}}{{- $_ := set $store "size_cap" $v.store.sizeCap -}}{{- end -}}
{{- end -}}
{{- $cfg := dict
  "repositories" (include "composefs-csi.repositoriesConfig" $ | fromYamlArray)
  "default_repository" (default (index $v.repositories 0).name $v.defaultRepository)
  "store" $store
  "fetch" (merge (dict
    "concurrency" $v.fetch.concurrency
    "timeouts" $v.fetch.timeouts
    "retries" (dict "max_attempts" $v.fetch.retries.maxAttempts "base_backoff" $v.fetch.retries.baseBackoff "max_backoff" $v.fetch.retries.maxBackoff)
    "rpc_wait" $v.fetch.rpcWait)
    (ternary (dict "processes" $v.fetch.processes) dict (kindIs "float64" $v.fetch.processes)))
  "dataplane" (dict
    "mountpoint" (include "composefs-csi.mountRoot" $)
    "socket" (printf "%s/dataplane.sock" (include "composefs-csi.runDir" $))
    "metrics_address" (printf ":%d" (int $v.dataplane.metricsPort))
    "read_ahead_kb" $v.dataplane.readAheadKb
    "open_files" $v.dataplane.openFiles
    "readahead_files" $v.dataplane.readaheadFiles
    "mount_options" $v.dataplane.mountOptions)
  "metrics" (dict "address" (printf ":%d" (int (ternary $v.controller.metricsPort $v.node.metricsPort (eq $role "controller")))))
  "node" (dict "kubelet_dir" (include "composefs-csi.kubeletDir" $) "repair_interval" $v.node.repairInterval)
  "controller" (dict "enabled" (ternary true false (and $v.controller.enabled true)))
-}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Volumes holding each repository's credentials and CA: one projected volume per repository
     that needs any, mounted at composefs-csi.repoDir. */}}
{{- define "composefs-csi.repoVolumes" -}}
{{- range $i, $r := .Values.repositories -}}
{{- if or $r.auth $r.caBundle $r.clientCertificate }}
- name: repo-{{ $i }}
  projected:
    defaultMode: 0440
    sources:
    {{- with $r.auth }}
    - secret:
        name: {{ .secretName }}
        items:
        {{- if eq .type "bearer" }}
        - {key: {{ .tokenKey | default "token" }}, path: token}
        {{- else }}
        - {key: {{ .passwordKey | default "password" }}, path: password}
        {{- end }}
    {{- end }}
    {{- with $r.caBundle }}
    {{- if .configMapName }}
    - configMap:
        name: {{ .configMapName }}
        items:
        - {key: {{ .key | default "ca.crt" }}, path: ca.crt}
    {{- else }}
    - secret:
        name: {{ .secretName }}
        items:
        - {key: {{ .key | default "ca.crt" }}, path: ca.crt}
    {{- end }}
    {{- end }}
    {{- with $r.clientCertificate }}
    - secret:
        name: {{ .secretName }}
        items:
        - {key: tls.crt, path: tls.crt}
        - {key: tls.key, path: tls.key}
    {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "composefs-csi.repoVolumeMounts" -}}
{{- range $i, $r := .Values.repositories -}}
{{- if or $r.auth $r.caBundle $r.clientCertificate }}
- name: repo-{{ $i }}
  mountPath: {{ include "composefs-csi.repoDir" $r.name }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* Arguments every driver process takes. */}}
{{- define "composefs-csi.verbosityArgs" -}}
{{- if gt (int .Values.verbosity) 0 }}
- -{{ repeat (int .Values.verbosity) "v" }}
{{- end }}
{{- end -}}

{{/* Pod scheduling of the node-side DaemonSets (identical so they land on the same nodes). */}}
{{- define "composefs-csi.nodeScheduling" -}}
priorityClassName: {{ .Values.node.priorityClassName }}
{{- with .Values.node.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.node.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if or .Values.node.tolerateAllTaints .Values.node.tolerations }}
tolerations:
{{- if .Values.node.tolerateAllTaints }}
  - operator: Exists
{{- end }}
{{- with .Values.node.tolerations }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Quantity ("50Gi", "500M", 1073741824) to bytes, for alert thresholds. */}}
{{- define "composefs-csi.bytes" -}}
{{- $s := toString . | trim -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $s -}}
{{- $unit := trimPrefix $num $s -}}
{{- $mult := dict "" 1.0 "k" 1e3 "K" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 -}}
{{- printf "%.0f" (mulf (float64 $num) (index $mult $unit)) -}}
{{- end -}}
