{{/*
The OpenAI sidecar of a backend pod (backend.modelServer.enabled): `loraplex gateway` on
modelServer.port, talking to its own pod's backend over localhost, so that routers which
pick a model-server pod (InferencePool endpoint picker, AIBrix) can send it OpenAI HTTP.
*/}}
{{- define "loraplex.backend.openaiSidecar" -}}
{{- $b := .Values.backend }}
{{- $m := $b.modelServer }}
{{- $reserved := list "backend" "backend-dns" "host" "port" "api-key" "backend-token" }}
- name: openai
  image: {{ include "loraplex.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- with $b.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  command: ["loraplex"]
  args:
    - "gateway"
    - "--backend"
    - {{ printf "127.0.0.1:%v" $b.grpcPort | quote }}
    - "--host"
    - "0.0.0.0"
    - "--port"
    - {{ $m.port | toString | quote }}
    {{- with include "loraplex.flags" (dict "args" $m.args "reserved" $reserved "what" "backend.modelServer.args") | trim }}
    {{- . | nindent 4 }}
    {{- end }}
  {{- if .Values.backendAuth.enabled }}
  env:
    - name: LORAPLEX_BACKEND_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "loraplex.backendAuth.secretName" . }}
          key: {{ .Values.backendAuth.secretKey }}
  {{- end }}
  ports:
    - name: openai
      containerPort: {{ $m.port }}
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /health
      port: openai
    periodSeconds: 5
    failureThreshold: 2
  livenessProbe:
    tcpSocket:
      port: openai
    periodSeconds: 15
    failureThreshold: 4
  {{- with $m.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
