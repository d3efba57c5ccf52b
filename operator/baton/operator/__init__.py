"""The Baton operator: kopf handlers (`handlers`), the reconcile pass (`reconciler`), status and
conditions (`status`), drift comparison (`diff`), spec checks beyond the schema (`validation`),
Events (`events`) and Kubernetes access (`kube`)."""
