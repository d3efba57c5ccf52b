"""The local Kubernetes control plane Baton is developed and tested on.

Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler, with KWOK standing in for the
kubelets of fake GPU nodes. Everything listens on 127.0.0.1 and every node and pod address is a
loopback address. Modules: `binaries` (build and locate the pinned binaries), `controlplane` (start,
stop and inspect the processes), `pools` (fake GPU node pools from a declarative file), `cli`.
"""
