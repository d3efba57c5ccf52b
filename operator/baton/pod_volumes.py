"""The volumes Baton puts in every engine pod, by name and mount path.

`baton.render.tiers` renders the pods from these. A tier's podTemplate may add volumes and mounts, but not one
named like these or mounted at their paths: Kubernetes refuses a pod with two volumes of one name and a container
with two mounts at one path. The CRD's rules (`baton.api.v1alpha1`) refuse such a spec at admission and the
operator's checks (`baton.render.tiers.reserved_volume_overrides`) for objects admitted before them, both from
these constants. A leaf module, so that the API can import it without importing the renderer, which imports it.
"""

from __future__ import annotations

ENGINE_CONFIG_VOLUME = "engine-config"
ENGINE_CONFIG_DIR = "/etc/baton/engine"
SHM_VOLUME = "dshm"
SHM_MOUNT = "/dev/shm"
MODEL_VOLUME = "model"  # a pvc or hostPath model source
MODEL_MOUNT = "/models"
HF_CACHE_VOLUME = "hf-cache"  # a huggingFace model source
HF_CACHE_MOUNT = "/cache"

# What each of Baton's volumes holds, for messages.
PURPOSE = {
    ENGINE_CONFIG_VOLUME: "engine config",
    SHM_VOLUME: "shared memory",
    MODEL_VOLUME: "checkpoint",
    HF_CACHE_VOLUME: "Hugging Face download cache",
}
