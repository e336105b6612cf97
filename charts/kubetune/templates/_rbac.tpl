{{/* The rules the operator needs in every namespace it serves: exactly the calls of
     operator/src/kubetune/operator/client.py, controller.py, progress.py and kopf's watches. */}}
{{- define "kubetune.namespacedRules" -}}
# FineTuneJobs: listed and watched by kopf (event handlers only: kopf writes no bookkeeping
# to them); the controller merge-patches their status. Nothing reads one by name.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Transitions are posted as Events; while a pod waits for its volumes, the namespace's
# FailedAttachVolume Events are listed (Multi-Attach: the Trained/Serving condition says it).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# Training Jobs, export Jobs and serving Deployments: watched (kopf indexes), applied
# server-side (create + patch) and deleted when a generation is replaced or serving is off.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Run-config ConfigMaps, rendezvous and serving Services: watched (KubeTune's own, by label
# selector) so a deleted or edited one is put back, applied, and deleted with their generation.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# The artifact PVC: watched (a deleted one is created again) and applied; a referenced one is
# checked to exist (never deleted: it holds the checkpoints and models).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Trainer pods are only read: termination messages (final report), scheduling failures, the
# pod a progress token is bound to.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- end -}}
{{/* Only in the Roles of watched namespaces, never cluster-wide: RBAC cannot grant a
     metadata-only read, so `get` here would let the operator read every Secret of the
     cluster. Cluster-wide the operator runs with --no-check-secrets and a missing Secret
     shows as the pods' CreateContainerConfigError in the Trained condition. */}}
{{- define "kubetune.secretRules" -}}
# A referenced Secret (model token) is checked to exist with a metadata-only read; its value
# reaches pods only through secretKeyRef.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}
